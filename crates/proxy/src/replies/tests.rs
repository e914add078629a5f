#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use super::*;

fn addr(i: usize) -> SocketAddr {
    let [hi, lo] = u16::try_from(i).unwrap().to_be_bytes();
    (std::net::Ipv4Addr::new(127, 77, hi, lo), 53).into()
}

fn client(i: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, i])
}

/// Opens path `n` (counting every open).
fn opener(opened: &mut usize) -> impl FnOnce() -> io::Result<usize> + '_ {
    move || {
        *opened += 1;
        Ok(*opened)
    }
}

#[test]
fn a_known_server_costs_no_open_and_no_budget() {
    let mut pool = Pool::new(8, 1);
    let mut opened = 0;
    let t = Instant::now();
    let first = pool
        .get(addr(0), client(1), t, opener(&mut opened))
        .unwrap();
    assert_eq!(first, Path::Via(1));
    for _ in 0..1000 {
        assert_eq!(
            pool.get(addr(0), client(1), t, opener(&mut opened))
                .unwrap(),
            Path::Via(1)
        );
    }
    assert_eq!(opened, 1);
}

#[test]
fn each_client_opens_its_share_of_new_paths_per_second_and_no_more() {
    // 5 per second, bursts of 10.
    let mut pool = Pool::new(1000, 5);
    let mut opened = 0;
    let t = Instant::now();
    let mut refused = 0;
    let mut reports = 0;
    for i in 0..100 {
        match pool
            .get(addr(i), client(1), t, opener(&mut opened))
            .unwrap()
        {
            Path::Via(_) => {}
            Path::OverBudget { report } => {
                refused += 1;
                reports += usize::from(report);
            }
        }
    }
    assert_eq!((opened, refused), (10, 90));
    assert_eq!(reports, 1, "one report per client per second");
    // Another client is not affected.
    assert!(matches!(
        pool.get(addr(500), client(2), t, opener(&mut opened))
            .unwrap(),
        Path::Via(_)
    ));
    // Its servers already pooled still answer; the budget refills with time.
    assert!(matches!(
        pool.get(addr(3), client(1), t, opener(&mut opened))
            .unwrap(),
        Path::Via(_)
    ));
    let later = t + Duration::from_millis(400);
    let opened_before = opened;
    for i in 200..210 {
        let _ = pool
            .get(addr(i), client(1), later, opener(&mut opened))
            .unwrap();
    }
    assert_eq!(opened - opened_before, 2, "0.4 s at 5/s");
    let much_later = t + Duration::from_secs(60);
    let opened_before = opened;
    for i in 300..340 {
        let _ = pool
            .get(addr(i), client(1), much_later, opener(&mut opened))
            .unwrap();
    }
    assert_eq!(
        opened - opened_before,
        10,
        "the burst, not a minute's worth"
    );
}

#[test]
fn the_least_recently_used_path_goes_first() {
    let mut pool = Pool::new(4, 1000);
    let mut opened = 0;
    let t = Instant::now();
    for i in 0..4 {
        pool.get(addr(i), client(1), t, opener(&mut opened))
            .unwrap();
    }
    // 0 is used again; 1 is now the oldest.
    pool.get(addr(0), client(1), t, opener(&mut opened))
        .unwrap();
    pool.get(addr(4), client(1), t, opener(&mut opened))
        .unwrap();
    assert_eq!(pool.len(), 4);
    assert_eq!(opened, 5);
    // 0, 2, 3 and 4 are still pooled; 1 is opened anew.
    for i in [0, 2, 3, 4] {
        pool.get(addr(i), client(1), t, opener(&mut opened))
            .unwrap();
    }
    assert_eq!(opened, 5);
    pool.get(addr(1), client(1), t, opener(&mut opened))
        .unwrap();
    assert_eq!(opened, 6);
    assert_eq!(pool.len(), 4);
    // Many paths through a small pool: it never grows, and the order stays in step.
    for i in 10..2000 {
        pool.get(addr(i), client(1), t, opener(&mut opened))
            .unwrap();
        pool.get(addr(0), client(1), t, opener(&mut opened))
            .unwrap();
        assert_eq!(pool.len(), 4);
        assert_eq!(pool.order.len(), 4);
    }
    // 0 was used all along: never evicted.
    let before = opened;
    pool.get(addr(0), client(1), t, opener(&mut opened))
        .unwrap();
    assert_eq!(opened, before);
}

#[test]
fn a_failed_open_is_an_error_and_pools_nothing() {
    let mut pool: Pool<usize> = Pool::new(4, 10);
    let t = Instant::now();
    let err = pool
        .get(addr(0), client(1), t, || {
            Err(io::Error::from(io::ErrorKind::AddrNotAvailable))
        })
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
    assert_eq!(pool.len(), 0);
}

#[test]
fn idle_clients_are_forgotten_past_the_bound() {
    let mut pool = Pool::new(4, 1);
    let mut opened = 0;
    let t = Instant::now();
    for i in 0..MAX_CLIENTS {
        let c = IpAddr::from(u32::try_from(i).unwrap().to_be_bytes());
        let _ = pool.get(addr(0), c, t, opener(&mut opened));
        // Hits touch no budget: make each client miss once.
        let _ = pool.get(addr(i + 10), c, t, opener(&mut opened));
    }
    assert!(pool.clients.len() <= MAX_CLIENTS);
    let later = t + CLIENT_IDLE;
    let _ = pool.get(addr(60_000), client(200), later, opener(&mut opened));
    assert_eq!(pool.clients.len(), 1);
}

#[tokio::test]
async fn reply_sockets_are_bound_to_the_server_and_pooled() {
    let mut replies = ReplySockets::new(1000);
    let socket = |via: Path<ReplyVia>| match via {
        Path::Via(ReplyVia::Socket(s)) => s,
        Path::Via(ReplyVia::Raw { from, .. }) => panic!("{from}: nothing else holds it"),
        Path::OverBudget { .. } => panic!("over budget"),
    };
    let t = Instant::now();
    let first = match replies.get(addr(0), client(1), t) {
        Ok(s) => socket(s),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: transparent sockets need CAP_NET_ADMIN");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(first.local_addr().unwrap(), addr(0));
    let again = socket(replies.get(addr(0), client(2), t).unwrap());
    assert!(Arc::ptr_eq(&first, &again));
}
