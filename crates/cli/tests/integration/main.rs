//! The `dnsfence` binary end to end, one test binary with a module per area: the
//! command line, the lab (network namespaces with real nftables, DNS servers and clients), the
//! split form's faults, Kubernetes mode against the fake API server. `tests/fairness.rs`, a
//! flood that measures, runs on its own.
//!
//! Run one area: `cargo test -p dnsfence --test integration redteam::`.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

mod bypass;
mod cli;
mod common;
mod docs;
mod features;
mod grafana;
mod kubernetes;
mod lab;
mod lifecycle;
mod limits;
mod manifests;
mod observe;
mod proxy_cli;
mod redteam;
mod robustness;
mod split;
mod transparent;
