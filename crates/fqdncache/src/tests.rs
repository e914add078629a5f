use super::*;
use dnsfence_policy::PolicyLoader;

fn set() -> PolicySet {
    let mut l = PolicyLoader::new();
    l.add(
        "t.yaml",
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: t}
spec:
  endpointSelector: {}
  egress:
    - toFQDNs: [{matchPattern: "*.example.com"}, {matchName: cdn.example.net}]
"#,
    );
    assert!(!l.has_errors(), "{:?}", l.diagnostics());
    l.finish().0
}

fn n(s: &str) -> FoldedName {
    FoldedName::new(s.as_bytes()).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn upserts(changes: &[Change]) -> Vec<(String, IpAddr, bool)> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Upsert { name, ip, new, .. } => Some((name.to_string(), *ip, *new)),
            Change::Remove { .. } => None,
        })
        .collect()
}

fn removes(changes: &[Change]) -> Vec<(String, IpAddr)> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Remove { name, ip, .. } => Some((name.to_string(), *ip)),
            Change::Upsert { .. } => None,
        })
        .collect()
}

#[test]
fn credits_every_name_on_the_chain_with_selectors() {
    let set = set();
    let mut c = FqdnCache::new(CacheConfig::default());
    let t0 = Instant::now();
    let changes = c.learn(
        t0,
        &[n("www.example.com"), n("cdn.example.net")],
        &[ip("192.0.2.1"), ip("2001:db8::1")],
        Duration::from_secs(30),
        &set,
    );
    assert_eq!(changes.len(), 4);
    assert_eq!(c.len(), 2);
    assert_eq!(c.mappings(), 4);
    assert_eq!(c.ips("www.example.com").len(), 2);
    assert_eq!(
        c.ips("cdn.example.net")[0].expires,
        t0 + Duration::from_secs(30)
    );
    let sel: Vec<_> = c
        .iter()
        .map(|(name, _, s)| (name.to_owned(), s.len()))
        .collect();
    assert!(sel.contains(&("www.example.com".to_owned(), 1)));
    assert!(sel.contains(&("cdn.example.net".to_owned(), 1)));
}

#[test]
fn ttl_is_raised_and_capped() {
    let set = set();
    let cfg = CacheConfig {
        min_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(3600),
        max_ips_per_name: 10,
        ..CacheConfig::default()
    };
    let mut c = FqdnCache::new(cfg);
    let t0 = Instant::now();
    c.learn(
        t0,
        &[n("a.example.com")],
        &[ip("192.0.2.1")],
        Duration::from_secs(5),
        &set,
    );
    assert_eq!(
        c.ips("a.example.com")[0].expires,
        t0 + Duration::from_secs(60)
    );
    c.learn(
        t0,
        &[n("b.example.com")],
        &[ip("192.0.2.2")],
        Duration::from_secs(10 * 365 * 86400),
        &set,
    );
    assert_eq!(
        c.ips("b.example.com")[0].expires,
        t0 + Duration::from_secs(3600)
    );
}

#[test]
fn refresh_extends_and_never_shortens() {
    let set = set();
    let mut c = FqdnCache::new(CacheConfig::default());
    let t0 = Instant::now();
    let a = [n("a.example.com")];
    let ips = [ip("192.0.2.1")];
    c.learn(t0, &a, &ips, Duration::from_secs(30), &set);
    let later = c.learn(
        t0 + Duration::from_secs(10),
        &a,
        &ips,
        Duration::from_secs(30),
        &set,
    );
    assert_eq!(
        upserts(&later),
        [("a.example.com".to_owned(), ips[0], false)]
    );
    assert_eq!(
        c.ips("a.example.com")[0].expires,
        t0 + Duration::from_secs(40)
    );
    let shorter = c.learn(
        t0 + Duration::from_secs(11),
        &a,
        &ips,
        Duration::from_secs(1),
        &set,
    );
    assert!(shorter.is_empty());
    assert_eq!(c.mappings(), 1);
}

#[test]
fn expiry_emits_removals_in_time_order() {
    let set = set();
    let mut c = FqdnCache::new(CacheConfig::default());
    let t0 = Instant::now();
    c.learn(
        t0,
        &[n("a.example.com")],
        &[ip("192.0.2.1")],
        Duration::from_secs(10),
        &set,
    );
    c.learn(
        t0,
        &[n("b.example.com")],
        &[ip("192.0.2.2")],
        Duration::from_secs(20),
        &set,
    );
    assert_eq!(c.next_expiry(), Some(t0 + Duration::from_secs(10)));
    assert!(c.expire(t0 + Duration::from_secs(9)).is_empty());
    assert_eq!(
        removes(&c.expire(t0 + Duration::from_secs(10))),
        [("a.example.com".to_owned(), ip("192.0.2.1"))]
    );
    assert_eq!(c.len(), 1);
    assert_eq!(removes(&c.expire(t0 + Duration::from_secs(60))).len(), 1);
    assert!(c.is_empty());
    assert_eq!(c.next_expiry(), None);
}

#[test]
fn at_most_max_ips_per_name_oldest_out_first() {
    let set = set();
    let mut c = FqdnCache::new(CacheConfig {
        max_ips_per_name: 2,
        ..CacheConfig::default()
    });
    let t0 = Instant::now();
    let a = [n("a.example.com")];
    c.learn(t0, &a, &[ip("192.0.2.1")], Duration::from_secs(10), &set);
    c.learn(t0, &a, &[ip("192.0.2.2")], Duration::from_secs(20), &set);
    let ch = c.learn(t0, &a, &[ip("192.0.2.3")], Duration::from_secs(30), &set);
    assert_eq!(
        removes(&ch),
        [("a.example.com".to_owned(), ip("192.0.2.1"))]
    );
    let held: Vec<IpAddr> = c.ips("a.example.com").iter().map(|l| l.ip).collect();
    assert_eq!(held.len(), 2);
    assert!(!held.contains(&ip("192.0.2.1")));
    assert_eq!(c.mappings(), 2);
    // The evicted IP's expiry entry is gone too: nothing is removed twice.
    assert_eq!(removes(&c.expire(t0 + Duration::from_secs(100))).len(), 2);
}

#[test]
fn an_answer_over_max_ips_per_name_keeps_its_first_ips_and_evicts_older_ones() {
    let set = set();
    let mut c = FqdnCache::new(CacheConfig {
        max_ips_per_name: 3,
        ..CacheConfig::default()
    });
    let t0 = Instant::now();
    let a = [n("a.example.com")];
    let held = |c: &FqdnCache| {
        let mut v: Vec<IpAddr> = c.ips("a.example.com").iter().map(|l| l.ip).collect();
        v.sort();
        v
    };
    // One answer of five: the first three, whatever the order of the rest.
    let five: Vec<IpAddr> = (1..=5).map(|i| ip(&format!("192.0.2.{i}"))).collect();
    let ch = c.learn(t0, &a, &five, Duration::from_secs(10), &set);
    assert_eq!(held(&c), five[..3]);
    assert!(removes(&ch).is_empty(), "{ch:?}");
    // A later answer with a shorter TTL than what is held: its IPs replace the older
    // ones, not each other.
    let later: Vec<IpAddr> = (11..=14).map(|i| ip(&format!("192.0.2.{i}"))).collect();
    c.learn(
        t0 + Duration::from_secs(1),
        &a,
        &five,
        Duration::from_secs(3600),
        &set,
    );
    let ch = c.learn(
        t0 + Duration::from_secs(2),
        &a,
        &later,
        Duration::from_secs(5),
        &set,
    );
    assert_eq!(held(&c), later[..3]);
    assert_eq!(removes(&ch).len(), 3, "{ch:?}");
}

#[test]
fn reselect_moves_ips_to_new_selectors() {
    let mut c = FqdnCache::new(CacheConfig::default());
    let t0 = Instant::now();
    let empty = PolicySet::default();
    c.learn(
        t0,
        &[n("a.example.com")],
        &[ip("192.0.2.1")],
        Duration::from_secs(10),
        &empty,
    );
    assert_eq!(c.iter().next().unwrap().2.len(), 0);
    let ch = c.reselect(&set());
    assert_eq!(removes(&ch).len(), 1);
    assert_eq!(upserts(&ch).len(), 1);
    assert_eq!(c.iter().next().unwrap().2.len(), 1);
    assert!(c.reselect(&set()).is_empty(), "no change, no diff");
}

#[test]
fn a_zero_ttl_still_allows_the_ip_long_enough_to_connect() {
    let set = set();
    let mut c = FqdnCache::new(CacheConfig::default());
    let t0 = Instant::now();
    let changes = c.learn(
        t0,
        &[n("a.example.com")],
        &[ip("192.0.2.1")],
        Duration::ZERO,
        &set,
    );
    assert!(
        matches!(&changes[..], [Change::Upsert { expires, new: true, .. }] if *expires == t0 + CONNECT_GRACE)
    );
    assert!(c.expire(t0).is_empty(), "not gone at once");
    assert_eq!(c.expire(t0 + CONNECT_GRACE).len(), 1);
}

#[test]
fn past_max_names_the_name_expiring_first_is_forgotten() {
    let set = set();
    let mut c = FqdnCache::new(CacheConfig {
        max_names: 2,
        ..CacheConfig::default()
    });
    let t0 = Instant::now();
    let secs = Duration::from_secs;
    c.learn(
        t0,
        &[n("a.example.com")],
        &[ip("192.0.2.1")],
        secs(300),
        &set,
    );
    c.learn(
        t0,
        &[n("b.example.com")],
        &[ip("192.0.2.2")],
        secs(60),
        &set,
    );
    let changes = c.learn(
        t0,
        &[n("c.example.com")],
        &[ip("192.0.2.3")],
        secs(120),
        &set,
    );
    // b expires first: it goes, and the datapath is told.
    assert!(changes
        .iter()
        .any(|ch| matches!(ch, Change::Remove { name, .. } if &**name == "b.example.com")));
    assert!(c.ips("b.example.com").is_empty());
    assert_eq!(c.ips("a.example.com").len(), 1);
    assert_eq!(c.ips("c.example.com").len(), 1);
    assert_eq!(c.next_expiry(), Some(t0 + secs(120)));
    // A known name is refreshed without forgetting anything.
    let changes = c.learn(
        t0 + secs(10),
        &[n("a.example.com")],
        &[ip("192.0.2.1")],
        secs(300),
        &set,
    );
    assert!(changes
        .iter()
        .all(|ch| !matches!(ch, Change::Remove { .. })));
}

#[test]
fn a_forgotten_mapping_is_new_again() {
    let set = set();
    let mut c = FqdnCache::new(CacheConfig::default());
    let t0 = Instant::now();
    let learn = |c: &mut FqdnCache| {
        c.learn(
            t0,
            &[n("a.example.com")],
            &[ip("192.0.2.1")],
            Duration::from_secs(60),
            &set,
        )
    };
    learn(&mut c);
    assert!(learn(&mut c).is_empty(), "known: nothing to apply");
    c.forget("a.example.com", ip("192.0.2.1"));
    assert!(c.ips("a.example.com").is_empty());
    assert_eq!(c.next_expiry(), None);
    assert!(matches!(
        &learn(&mut c)[..],
        [Change::Upsert { new: true, .. }]
    ));
}
