#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use super::*;
use dnsfence_policy::{Endpoint, Labels, PolicyLoader};

fn set(patterns: &[&str], previous: &PolicySet) -> PolicySet {
    let fqdns: Vec<String> = patterns
        .iter()
        .map(|p| format!("{{matchPattern: \"{p}\"}}"))
        .collect();
    let text = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: a, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a}}}}\n  egress:\n    - toFQDNs: [{}]\n",
        fqdns.join(", ")
    );
    let mut loader = PolicyLoader::new();
    loader.add("p.yaml", &text);
    assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
    loader.finish_after(previous).0
}

fn inventory(set: &PolicySet) -> Inventory {
    let labels = Labels::new([("app", "a".to_owned())]).unwrap();
    Inventory::resolve(
        set,
        [(
            "a".to_owned(),
            Endpoint::new("default", labels),
            vec!["10.0.0.2".parse().unwrap()],
        )],
        vec![],
    )
}

fn options() -> Options {
    Options {
        table: "t".into(),
        deny_action: DenyAction::Reject,
        fwmark: 1,
        ct_mark: 0x0040_0000,
        tproxy_port: Some(15053),
        route_table: 100,
        log_group: Some(20053),
        never_learn: vec![
            "127.0.0.0/8".parse().unwrap(),
            "169.254.0.0/16".parse().unwrap(),
            "::ffff:0:0/96".parse().unwrap(),
        ],
        dns_rate_limit: Some(5000),
    }
}

fn upsert(name: &str, ip: &str, sel: SelectorId) -> Change {
    Change::Upsert {
        name: name.into(),
        ip: ip.parse().unwrap(),
        expires: Instant::now() + Duration::from_secs(30),
        selectors: vec![sel].into(),
        new: true,
    }
}

#[test]
fn learned_ips_go_to_the_selector_set_of_their_family() {
    let fake = FakeKernel::default();
    let mut dp = Datapath::new(Box::new(fake.clone()), options()).unwrap();
    let s = set(&["*.example.com"], &PolicySet::default());
    dp.reconcile(&s, &inventory(&s)).unwrap();
    let (id, pattern) = s.fqdn_selectors()[0].clone();
    let n = dp
        .apply(&[
            upsert("a.example.com", "192.0.2.1", id),
            upsert("a.example.com", "2001:db8::1", id),
        ])
        .unwrap();
    assert_eq!(n, 2);
    let log = fake.log.lock().unwrap();
    let batch = &log.batches[0];
    assert!(
        matches!(&batch[0], SetOp::Add { set, .. } if *set == ruleset::fqdn_set_name(&pattern, false))
    );
    assert!(
        matches!(&batch[1], SetOp::Add { set, .. } if *set == ruleset::fqdn_set_name(&pattern, true))
    );
}

#[test]
fn a_policy_update_keeps_selector_ids_and_ignores_retired_ones() {
    let fake = FakeKernel::default();
    let mut dp = Datapath::new(Box::new(fake.clone()), options()).unwrap();
    let s1 = set(&["*.a.com", "*.b.com"], &PolicySet::default());
    dp.reconcile(&s1, &inventory(&s1)).unwrap();
    let a = s1.fqdn_selectors()[0].0;
    let b = s1.fqdn_selectors()[1].0;
    dp.apply(&[
        upsert("x.a.com", "192.0.2.1", a),
        upsert("x.b.com", "192.0.2.2", b),
    ])
    .unwrap();
    // *.a.com disappears: *.b.com keeps its id, and *.c.com gets a fresh one.
    let s2 = set(&["*.b.com", "*.c.com"], &s1);
    assert_eq!(s2.selector_id(&s1.fqdn_selectors()[1].1), Some(b));
    let c = s2
        .fqdn_selectors()
        .iter()
        .find(|(_, p)| p.as_str() == "*.c.com")
        .unwrap()
        .0;
    assert!(c != a && c != b, "a retired id is never reused");
    fake.log.lock().unwrap().listing =
        Some("table inet t {\n\tset fq_1111111111111111_4 {\n\t}\n}\n".into());
    dp.reconcile(&s2, &inventory(&s2)).unwrap();
    let script = fake.log.lock().unwrap().scripts.last().unwrap().clone();
    assert!(script.contains("delete set inet t fq_1111111111111111_4"));
    // A removal for the retired selector writes nothing.
    let n = dp
        .apply(&[Change::Remove {
            name: "x.a.com".into(),
            ip: "192.0.2.1".parse().unwrap(),
            selectors: vec![a].into(),
        }])
        .unwrap();
    assert_eq!(n, 0);
}

#[test]
fn the_worker_batches_concurrent_requests_and_reports_failures() {
    let fake = FakeKernel::default();
    let mut dp = Datapath::new(Box::new(fake.clone()), options()).unwrap();
    let s = set(&["*.example.com"], &PolicySet::default());
    dp.reconcile(&s, &inventory(&s)).unwrap();
    let id = s.fqdn_selectors()[0].0;
    let worker = Worker::spawn(dp).unwrap();
    let (tx, rx) = mpsc::channel();
    for i in 0..20 {
        let tx = tx.clone();
        worker.apply(
            vec![upsert("a.example.com", &format!("192.0.2.{i}"), id)],
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
    }
    for _ in 0..20 {
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    }
    let log = fake.log.lock().unwrap().clone();
    let total: usize = log.batches.iter().map(Vec::len).sum();
    assert_eq!(total, 20);
    assert!(log.batches.len() <= 20);
    fake.log.lock().unwrap().fail_next_batch = true;
    let (tx, rx) = mpsc::channel();
    worker.apply(
        vec![upsert("b.example.com", "192.0.2.200", id)],
        Box::new(move |r| tx.send(r.is_ok()).unwrap()),
    );
    assert!(!rx.recv_timeout(Duration::from_secs(5)).unwrap());
}

#[test]
fn learned_ips_are_written_again_for_a_table_recreated_meanwhile() {
    let fake = FakeKernel::default();
    let mut dp = Datapath::elements_only(Box::new(fake.clone()), options());
    let s = set(&["*.example.com"], &PolicySet::default());
    dp.use_selectors(&s);
    let (id, pattern) = s.fqdn_selectors()[0].clone();
    dp.apply(&[
        upsert("a.example.com", "192.0.2.1", id),
        upsert("b.example.com", "2001:db8::2", id),
    ])
    .unwrap();
    // A rewrite puts every live element back, with the time it has left, though the
    // bookkeeping believes the kernel holds them.
    assert_eq!(dp.rewrite_learned().unwrap(), 2);
    let log = fake.log.lock().unwrap();
    let last = log.batches.last().unwrap();
    assert_eq!(last.len(), 2);
    for op in last {
        let SetOp::Add { set, timeout, .. } = op else {
            panic!("{op:?}");
        };
        assert!(
            *set == ruleset::fqdn_set_name(&pattern, false)
                || *set == ruleset::fqdn_set_name(&pattern, true)
        );
        assert!(*timeout > Duration::from_secs(25) && *timeout <= Duration::from_secs(30));
    }
}

#[test]
fn each_set_the_kernel_refuses_leaves_the_batch_until_the_retries_run_out() {
    let fake = FakeKernel::default();
    let mut dp = Datapath::new(Box::new(fake.clone()), options()).unwrap();
    let s = set(&["*.a.com", "*.b.com", "*.c.com"], &PolicySet::default());
    dp.reconcile(&s, &inventory(&s)).unwrap();
    let ids: Vec<SelectorId> = s.fqdn_selectors().iter().map(|(id, _)| *id).collect();
    let names: Vec<String> = s
        .fqdn_selectors()
        .iter()
        .flat_map(|(_, p)| {
            [
                ruleset::fqdn_set_name(p, false),
                ruleset::fqdn_set_name(p, true),
            ]
        })
        .collect();
    let changes = |n: u8| -> Vec<Change> {
        ids.iter()
            .flat_map(|id| {
                [
                    upsert("x", &format!("192.0.2.{n}"), *id),
                    upsert("x", &format!("2001:db8::{n}"), *id),
                ]
            })
            .collect()
    };
    // Two sets gone: the other four get their IPs.
    fake.log.lock().unwrap().refused_sets = names[..2].iter().cloned().collect();
    assert_eq!(dp.apply(&changes(1)).unwrap(), 4);
    // Five gone: after four refusals the batch gives up, naming them.
    fake.log.lock().unwrap().refused_sets = names[..5].iter().cloned().collect();
    let err = dp.apply(&changes(2)).unwrap_err();
    let SysError::SetsRefused {
        table,
        sets,
        source,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(table, "t");
    assert_eq!(sets.len(), 4);
    assert!(sets.iter().all(|s| names[..5].contains(s)), "{sets:?}");
    assert!(
        matches!(source, NetlinkError::Rejected { set, .. } if *set == sets[3]),
        "{source:?}"
    );
    assert!(err.to_string().contains(&sets.join(", ")), "{err}");
}

#[test]
fn a_slow_reconcile_times_out_while_the_thread_keeps_working() {
    let fake = FakeKernel::default();
    let dp = Datapath::new(Box::new(fake.clone()), options()).unwrap();
    let worker = Worker::spawn(dp).unwrap();
    let s = Arc::new(set(&["*.example.com"], &PolicySet::default()));
    // The kernel hangs (the thread waits for the fake's lock) while the caller waits.
    let hung = fake.log.lock().unwrap();
    let waited = Duration::from_millis(20);
    let err = worker
        .reconcile_within(s.clone(), Arc::new(inventory(&s)), waited)
        .unwrap_err();
    drop(hung);
    assert!(
        matches!(err, SysError::WorkerTimeout { waited: w } if w == waited),
        "{err:?}"
    );
    assert!(err.to_string().contains("still running"), "{err}");
    // It was slow, not dead: the reconcile lands, and the next one answers.
    worker
        .reconcile(s.clone(), Arc::new(inventory(&s)))
        .unwrap();
    assert_eq!(fake.log.lock().unwrap().scripts.len(), 2);
}

#[test]
fn a_dead_thread_is_reported_as_stopped() {
    let fake = FakeKernel::default();
    let dp = Datapath::new(Box::new(fake.clone()), options()).unwrap();
    let worker = Worker::spawn(dp).unwrap();
    let s = Arc::new(set(&["*.example.com"], &PolicySet::default()));
    // The thread panics (the test output shows it) in the middle of the reconcile.
    fake.log.lock().unwrap().crash_next_script = true;
    let err = worker
        .reconcile(s.clone(), Arc::new(inventory(&s)))
        .unwrap_err();
    assert!(matches!(err, SysError::WorkerStopped), "{err:?}");
    // Later requests are refused at once, with the same error.
    let err = worker
        .reconcile(s.clone(), Arc::new(inventory(&s)))
        .unwrap_err();
    assert!(matches!(err, SysError::WorkerStopped), "{err:?}");
    let (tx, rx) = mpsc::channel();
    worker.apply(
        vec![upsert(
            "a.example.com",
            "192.0.2.1",
            s.fqdn_selectors()[0].0,
        )],
        Box::new(move |r| tx.send(r).unwrap()),
    );
    let result = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(
            result.as_ref().map_err(|e| &**e),
            Err(SysError::WorkerStopped)
        ),
        "{result:?}"
    );
}
