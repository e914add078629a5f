//! An authoritative DNS server built on hickory-server, serving zones the test describes:
//! CNAME chains, many-IP names, AAAA, short TTLs. It lives in the lab crate (whose world
//! serves DNS with it) and is re-exported here for the tests that use it on loopback.

pub use dnsfence_lab::dns::{Authority, Rec};
