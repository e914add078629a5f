//! dnsfence's Kubernetes front end: the custom resources ([`crd`]), the cluster state the
//! watchers feed and the agent reads ([`cluster`]), the watchers themselves ([`watch`]),
//! and the install manifests ([`manifests`]).

pub mod cluster;
pub mod config;
pub mod crd;
pub mod manifests;
pub mod watch;
