//! The datapath against the real kernel, in network namespaces the tests create: the
//! netlink socket, the NFLOG reader, and whole reconciles.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

mod netlink;
mod nflog;
mod reconcile;
