//! The floor for the DNS load benchmark: the cheapest possible tokio UDP responder (answers
//! every datagram with REFUSED, in place). `bench/dns-throughput.sh` measures it beside the
//! proxy, so that per-query CPU is read against what one socket round trip costs on the
//! same machine.
//!
//! Usage: `udp_floor 127.0.0.1:5999`

use std::net::SocketAddr;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5999)));
    let socket = tokio::net::UdpSocket::bind(addr).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        if let Some(flags) = buf.get_mut(2..4) {
            flags[0] |= 0x80;
            flags[1] = (flags[1] & 0xf0) | 5;
        }
        let _ = socket.send_to(buf.get(..n).unwrap_or_default(), from).await;
    }
}
