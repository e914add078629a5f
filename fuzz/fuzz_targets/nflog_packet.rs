//! The NFLOG message parser: never panics, and whatever it reads is consistent (ports only
//! for protocols that have them, an ICMP type only for ICMP).
#![no_main]

use dnsfence_datapath::netlink::nflog::parse_packet_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(p) = parse_packet_message(data) {
        if p.icmp_type.is_some() {
            assert!(matches!(p.protocol, 1 | 58), "{p:?}");
            assert!(p.dst_port.is_none());
        }
        if p.dst_port.is_some() {
            assert!(p.icmp_type.is_none());
        }
        assert_eq!(p.src.is_ipv4(), p.dst.is_ipv4());
    }
});
