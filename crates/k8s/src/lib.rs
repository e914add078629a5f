//! dnsfence's Kubernetes front end: the custom resources ([`crd`]), the cluster state the
//! watchers feed and the agent reads ([`cluster`]), the watchers themselves ([`watch`]),
//! its configuration section ([`config`]) and the install manifests ([`manifests`]). It
//! must not enforce anything nor depend on the proxy or the agent: it turns the API
//! server's objects into endpoints and policy documents, which the agent puts in force.

pub mod cluster;
pub mod config;
pub mod crd;
pub mod manifests;
pub mod watch;
