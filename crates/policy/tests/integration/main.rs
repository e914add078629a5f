//! The policy engine through its public API: parsing and validation, and the conformance
//! cases of `conformance/`.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

mod conformance;
mod parse;
