#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use super::*;
use dnsfence_policy::PolicyDoc;
use dnsfence_proxy::{NoopSink, Proxy, ProxyMetrics};

/// `n` policies, each with its own DNS rule and `toFQDNs` selectors.
fn snapshot_data(n: usize) -> SnapshotData {
    let text: String = (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: n}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{i}}}}}\n  egress:\n    - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}}}]\n      toPorts: [{{ports: [{{port: \"53\", protocol: ANY}}], rules: {{dns: [{{matchPattern: \"*.s{i}.example.com\"}}]}}}}]\n    - toFQDNs: [{{matchName: api.s{i}.example.com}}, {{matchPattern: \"*.cdn{i}.example.com\"}}]\n"
            )
        })
        .collect();
    SnapshotData {
        policies: vec![PolicyDoc {
            file: "policies.yaml".to_owned(),
            text,
        }],
        endpoints: Vec::new(),
        host_ips: Vec::new(),
        selectors: Vec::new(),
        table: None,
        audit: false,
    }
}

/// Applying a snapshot must not stall the single DNS thread: compiling it (and saving
/// it) happen on a blocking thread while the runtime keeps running its other tasks.
#[tokio::test(flavor = "current_thread")]
async fn a_snapshot_is_compiled_off_the_dns_thread() {
    let dir = std::env::temp_dir().join(format!("dnsfence-follow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = NodeConfig::parse("c.yaml", "").unwrap();
    config.state_dir = dir.clone();
    // Big enough that compiling it takes a while, even on a fast machine.
    let mut n = 500;
    let (data, took) = loop {
        let data = snapshot_data(n);
        let started = Instant::now();
        compile_data(&data, None, &config, &PolicySet::default()).unwrap();
        let took = started.elapsed();
        if took >= Duration::from_millis(300) || n >= 64_000 {
            break (data, took);
        }
        n *= 2;
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let flows = dnsfence_proxy::flows::FlowLog::new(
        &config.flows,
        dnsfence_proxy::flows::FlowMetrics::default(),
    );
    let proxy = Proxy::start(
        config.dns.clone(),
        compile_data(&snapshot_data(1), None, &config, &PolicySet::default()).unwrap(),
        Arc::new(NoopSink),
        ProxyMetrics::register(&mut registry),
        flows,
    )
    .await
    .unwrap();
    // A task standing for the DNS listeners: how long does it wait for its turn?
    let longest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let ticker = tokio::spawn({
        let longest = longest.clone();
        async move {
            loop {
                let before = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                let gap = before.elapsed();
                let mut l = longest.lock().unwrap();
                *l = (*l).max(gap);
            }
        }
    });
    tokio::task::yield_now().await;
    let (_tx, reports) = tokio::sync::mpsc::channel(1);
    let follower = Follower {
        connector: Connector::Unix(dir.join("agent.sock")),
        worker: None,
        shares_agent_datapath: false,
        saves: true,
        version: 0,
        reports,
        dropped: Arc::default(),
    };
    let reply = take_snapshot(proxy.shared(), &follower, &config, 7, Box::new(data), None).await;
    ticker.abort();
    assert!(matches!(reply, Message::Ack { version: 7 }), "{reply:?}");
    assert_eq!(proxy.shared().snapshot().policies().policies().len(), n);
    assert!(persist::load(&persist::snapshot_file(&config))
        .unwrap()
        .is_some());
    let longest = *longest.lock().unwrap();
    assert!(
        longest < took / 2,
        "the runtime stalled {longest:?} while a snapshot that takes {took:?} to compile was applied"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
