//! dnsfence's node agent: the node's configuration ([`config`]), and (to come) the desired
//! state, the one reconcile path and the composition of agent and proxy. It parses no
//! arguments and prints nothing: that is the binary's.

pub mod config;
pub mod control;
