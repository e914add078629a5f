//! Which learned IPs the kernel's selector sets must hold, and for how long.
//!
//! Several names can put the same IP in the same selector set (`a.example.com` and
//! `b.example.com` both behind one CDN address, both matching `*.example.com`): the
//! element lives until the last of them expires, so a name expiring never removes an IP
//! another name still vouches for. Pure bookkeeping; [`crate::Datapath`] turns the
//! resulting operations into one netlink batch.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_fqdncache::Change;
use dnsfence_policy::SelectorId;
use smallvec::SmallVec;

/// The shortest timeout given to the kernel, so that the connection which follows an
/// answer with a zero TTL is not raced by the element's expiry.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A set element operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Add `ip` to the selector's set, or extend it, for `timeout`.
    Add {
        /// The selector.
        selector: SelectorId,
        /// The IP.
        ip: IpAddr,
        /// How long from now.
        timeout: Duration,
    },
    /// Remove `ip` from the selector's set.
    Delete {
        /// The selector.
        selector: SelectorId,
        /// The IP.
        ip: IpAddr,
    },
}

#[derive(Debug)]
struct Entry {
    /// Names vouching for the IP, with their expiry.
    holders: SmallVec<[(Arc<str>, Instant); 1]>,
    /// The expiry the kernel was last given.
    told: Instant,
}

/// The learned IPs per selector.
#[derive(Debug, Default)]
pub struct Learned {
    entries: HashMap<(SelectorId, IpAddr), Entry>,
}

impl Learned {
    /// Number of (selector, IP) elements.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is learned.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies cache changes, appending the kernel operations they need to `out`.
    pub fn apply(&mut self, changes: &[Change], now: Instant, out: &mut Vec<Op>) {
        for change in changes {
            match change {
                Change::Upsert {
                    name,
                    ip,
                    expires,
                    selectors,
                    ..
                } => {
                    for sel in selectors.iter() {
                        self.upsert(*sel, name, *ip, *expires, now, out);
                    }
                }
                Change::Remove {
                    name,
                    ip,
                    selectors,
                } => {
                    for sel in selectors.iter() {
                        self.remove(*sel, name, *ip, out);
                    }
                }
            }
        }
    }

    fn upsert(
        &mut self,
        selector: SelectorId,
        name: &Arc<str>,
        ip: IpAddr,
        expires: Instant,
        now: Instant,
        out: &mut Vec<Op>,
    ) {
        let timeout = |until: Instant| until.saturating_duration_since(now).max(MIN_TIMEOUT);
        match self.entries.get_mut(&(selector, ip)) {
            None => {
                self.entries.insert(
                    (selector, ip),
                    Entry {
                        holders: SmallVec::from_elem((name.clone(), expires), 1),
                        told: expires,
                    },
                );
                out.push(Op::Add {
                    selector,
                    ip,
                    timeout: timeout(expires),
                });
            }
            Some(entry) => {
                match entry.holders.iter_mut().find(|(n, _)| n == name) {
                    Some(h) => h.1 = expires,
                    None => entry.holders.push((name.clone(), expires)),
                }
                if expires > entry.told {
                    entry.told = expires;
                    out.push(Op::Add {
                        selector,
                        ip,
                        timeout: timeout(expires),
                    });
                }
            }
        }
    }

    fn remove(&mut self, selector: SelectorId, name: &Arc<str>, ip: IpAddr, out: &mut Vec<Op>) {
        let Some(entry) = self.entries.get_mut(&(selector, ip)) else {
            return;
        };
        entry.holders.retain(|(n, _)| n != name);
        if entry.holders.is_empty() {
            self.entries.remove(&(selector, ip));
            out.push(Op::Delete { selector, ip });
        }
    }

    /// Forgets selectors for which `keep` is false (their sets were deleted).
    pub fn retain_selectors(&mut self, keep: impl Fn(SelectorId) -> bool) {
        self.entries.retain(|(sel, _), _| keep(*sel));
    }

    /// Every element with the expiry the kernel was given (for a fresh set's contents).
    pub fn elements(&self) -> impl Iterator<Item = (SelectorId, IpAddr, Instant)> + '_ {
        self.entries
            .iter()
            .map(|((sel, ip), e)| (*sel, *ip, e.told))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn up(name: &str, ip: &str, secs: u64, now: Instant, sels: &[u32]) -> Change {
        Change::Upsert {
            name: name.into(),
            ip: ip.parse().unwrap(),
            expires: now + Duration::from_secs(secs),
            selectors: sels.iter().map(|s| SelectorId(*s)).collect(),
            new: true,
        }
    }

    fn rm(name: &str, ip: &str, sels: &[u32]) -> Change {
        Change::Remove {
            name: name.into(),
            ip: ip.parse().unwrap(),
            selectors: sels.iter().map(|s| SelectorId(*s)).collect(),
        }
    }

    #[test]
    fn an_ip_stays_while_any_name_vouches_for_it() {
        let now = Instant::now();
        let mut l = Learned::default();
        let mut ops = Vec::new();
        l.apply(
            &[up("a.example.com", "192.0.2.1", 30, now, &[0])],
            now,
            &mut ops,
        );
        l.apply(
            &[up("b.example.com", "192.0.2.1", 10, now, &[0])],
            now,
            &mut ops,
        );
        // The second name does not shorten the element; nothing more to tell the kernel.
        assert_eq!(ops.len(), 1);
        ops.clear();
        l.apply(&[rm("a.example.com", "192.0.2.1", &[0])], now, &mut ops);
        assert!(ops.is_empty(), "{ops:?}");
        l.apply(&[rm("b.example.com", "192.0.2.1", &[0])], now, &mut ops);
        assert_eq!(
            ops,
            [Op::Delete {
                selector: SelectorId(0),
                ip: "192.0.2.1".parse().unwrap()
            }]
        );
        assert!(l.is_empty());
    }

    #[test]
    fn a_later_expiry_extends_the_element_and_zero_ttl_gets_the_floor() {
        let now = Instant::now();
        let mut l = Learned::default();
        let mut ops = Vec::new();
        l.apply(&[up("a", "2001:db8::1", 0, now, &[3, 4])], now, &mut ops);
        assert_eq!(ops.len(), 2);
        assert!(ops
            .iter()
            .all(|o| matches!(o, Op::Add { timeout, .. } if *timeout == MIN_TIMEOUT)));
        ops.clear();
        l.apply(&[up("a", "2001:db8::1", 60, now, &[3])], now, &mut ops);
        assert_eq!(
            ops,
            [Op::Add {
                selector: SelectorId(3),
                ip: "2001:db8::1".parse().unwrap(),
                timeout: Duration::from_secs(60)
            }]
        );
    }

    #[test]
    fn retired_selectors_are_forgotten() {
        let now = Instant::now();
        let mut l = Learned::default();
        let mut ops = Vec::new();
        l.apply(&[up("a", "192.0.2.1", 5, now, &[1, 2])], now, &mut ops);
        l.retain_selectors(|s| s == SelectorId(2));
        assert_eq!(l.len(), 1);
        ops.clear();
        // A removal for the retired selector is a no-op.
        l.apply(&[rm("a", "192.0.2.1", &[1])], now, &mut ops);
        assert!(ops.is_empty());
    }
}
