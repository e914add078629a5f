//! The lab, its scratch namespaces and its DNS load generator against the real kernel. Skips unless root with `ip`.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

mod lab;
mod load;
mod netns;
