//! Learned name → IP mappings, with TTLs: the memory of what DNS answers allowed. Pure: it
//! must not read the clock or do I/O (time is a parameter, changes are returned as diffs).
//!
//! Every A/AAAA of an allowed answer is credited to the query name and to each name on its
//! CNAME chain. The TTL is the smallest on the chain, raised to `min_ttl` and capped at
//! `max_ttl` (so a hostile upstream cannot pin an IP open for years). A name keeps at most
//! `max_ips_per_name` IPs; the one closest to expiry goes first. Every change comes back as
//! a [`Change`] so the caller (the datapath) can mirror it, and each name carries the
//! `toFQDNs` selectors it satisfies, so an IP serves every endpoint whose policy selects it.
//!
//! Pure: no clock (time is passed in), no I/O, no async.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_policy::{FoldedName, PolicySet, SelectorId};

/// The shortest time an answer's IPs stay allowed, whatever its TTL: a client connects
/// right after it gets the answer, and a TTL of 0 (common behind load balancers) must not
/// leave it an IP it cannot reach.
pub const CONNECT_GRACE: Duration = Duration::from_secs(1);

/// Smallest extension of a live mapping's expiry that is recorded (and sent on).
pub const REFRESH_GRANULARITY: Duration = Duration::from_secs(1);

/// Limits applied to what is learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// TTLs below this are raised to it (default 0: honour the server).
    pub min_ttl: Duration,
    /// TTLs above this are capped (default 1 day).
    pub max_ttl: Duration,
    /// At most this many IPs per name (default 1000); the one closest to expiry goes first.
    pub max_ips_per_name: usize,
    /// At most this many names (default 100,000); past it, learning a new name forgets
    /// the one whose mapping expires first, so a pod resolving endless names under a
    /// wildcard cannot grow the cache (and the datapath) without bound.
    pub max_names: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            min_ttl: Duration::ZERO,
            max_ttl: Duration::from_secs(86_400),
            max_ips_per_name: 1000,
            max_names: 100_000,
        }
    }
}

/// One change to mirror into the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `ip` is now allowed for `name` (new, or its expiry moved) until `expires`.
    Upsert {
        /// The name (folded).
        name: Arc<str>,
        /// The IP.
        ip: IpAddr,
        /// When it stops being allowed for new connections.
        expires: Instant,
        /// The `toFQDNs` selectors the name satisfies.
        selectors: Arc<[SelectorId]>,
        /// Whether the IP is new for this name (false: a refresh).
        new: bool,
    },
    /// `ip` is no longer allowed for `name`.
    Remove {
        /// The name (folded).
        name: Arc<str>,
        /// The IP.
        ip: IpAddr,
        /// The selectors the name satisfied.
        selectors: Arc<[SelectorId]>,
    },
}

/// A learned IP of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedIp {
    /// The IP.
    pub ip: IpAddr,
    /// When it expires.
    pub expires: Instant,
}

#[derive(Debug)]
struct NameEntry {
    name: Arc<str>,
    ips: Vec<LearnedIp>,
    selectors: Arc<[SelectorId]>,
}

/// The learned mappings.
#[derive(Debug, Default)]
pub struct FqdnCache {
    config: CacheConfig,
    /// Keyed with foldhash (randomly seeded): looked up on every answer, and names come
    /// from answers, not from a party that can pick hash collisions at will.
    names: foldhash::HashMap<Arc<str>, NameEntry>,
    expiry: BTreeSet<(Instant, Arc<str>, IpAddr)>,
}

/// The selectors of `set` that `name` satisfies.
pub fn selectors_of(set: &PolicySet, name: &FoldedName) -> Arc<[SelectorId]> {
    let mut ids = Vec::new();
    let _ = set.for_each_selector_match(name, |id| {
        ids.push(id);
        ControlFlow::<()>::Continue(())
    });
    ids.sort_unstable();
    ids.into()
}

impl FqdnCache {
    /// An empty cache.
    pub fn new(config: CacheConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The TTL actually applied for an answer whose chain's smallest TTL is `ttl`: never
    /// under [`CONNECT_GRACE`], so an answer with TTL 0 still lets its client connect.
    pub fn effective_ttl(&self, ttl: Duration) -> Duration {
        ttl.max(self.config.min_ttl)
            .min(self.config.max_ttl)
            .max(CONNECT_GRACE)
    }

    /// Records that `names` (the query name and its CNAME chain) resolved to `ips` with
    /// the chain's smallest TTL `ttl`, at `now`. Returns what changed.
    pub fn learn(
        &mut self,
        now: Instant,
        names: &[FoldedName],
        ips: &[IpAddr],
        ttl: Duration,
        set: &PolicySet,
    ) -> Vec<Change> {
        let expires = now + self.effective_ttl(ttl);
        let mut changes = Vec::new();
        // An answer with more IPs than a name may keep: its first ones (those clients
        // try first), never some of it evicting others of it.
        let ips = ips.get(..self.config.max_ips_per_name).unwrap_or(ips);
        for name in names {
            // One lookup for a known name (the usual case); a new one is inserted.
            let entry = match self.names.get_mut(name.as_str()) {
                Some(entry) => entry,
                None => {
                    self.make_room(&mut changes);
                    let key: Arc<str> = name.as_str().into();
                    self.names.entry(key.clone()).or_insert(NameEntry {
                        name: key,
                        ips: Vec::new(),
                        selectors: selectors_of(set, name),
                    })
                }
            };
            for &ip in ips {
                upsert(
                    entry,
                    &mut self.expiry,
                    ip,
                    expires,
                    self.config.max_ips_per_name,
                    ips,
                    &mut changes,
                );
            }
        }
        changes
    }

    /// Forgets names, those whose mapping expires first, until one more fits.
    fn make_room(&mut self, changes: &mut Vec<Change>) {
        while self.names.len() >= self.config.max_names.max(1) {
            let Some((_, name, _)) = self.expiry.first().cloned() else {
                break;
            };
            let Some(entry) = self.names.remove(&name) else {
                break;
            };
            for l in &entry.ips {
                self.expiry.remove(&(l.expires, entry.name.clone(), l.ip));
                changes.push(Change::Remove {
                    name: entry.name.clone(),
                    ip: l.ip,
                    selectors: entry.selectors.clone(),
                });
            }
        }
    }

    /// Removes every mapping that expired at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        while let Some(first) = self.expiry.first() {
            if first.0 > now {
                break;
            }
            let Some((_, name, ip)) = self.expiry.pop_first() else {
                break;
            };
            if let Some(entry) = self.names.get_mut(&name) {
                entry.ips.retain(|l| l.ip != ip);
                changes.push(Change::Remove {
                    name: entry.name.clone(),
                    ip,
                    selectors: entry.selectors.clone(),
                });
                if entry.ips.is_empty() {
                    self.names.remove(&name);
                }
            }
        }
        changes
    }

    /// When the next mapping expires, to schedule [`FqdnCache::expire`].
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiry.first().map(|e| e.0)
    }

    /// Recomputes each name's selectors after a policy change. Returns, for names whose
    /// selectors changed, a `Remove` under the old selectors and an `Upsert` under the new.
    pub fn reselect(&mut self, set: &PolicySet) -> Vec<Change> {
        let mut changes = Vec::new();
        for entry in self.names.values_mut() {
            let Ok(folded) = FoldedName::new(entry.name.as_bytes()) else {
                continue;
            };
            let selectors = selectors_of(set, &folded);
            if selectors == entry.selectors {
                continue;
            }
            for l in &entry.ips {
                changes.push(Change::Remove {
                    name: entry.name.clone(),
                    ip: l.ip,
                    selectors: entry.selectors.clone(),
                });
                changes.push(Change::Upsert {
                    name: entry.name.clone(),
                    ip: l.ip,
                    expires: l.expires,
                    selectors: selectors.clone(),
                    new: true,
                });
            }
            entry.selectors = selectors;
        }
        changes
    }

    /// Forgets `ip` for `name` (folded form) without a change to mirror: for mappings the
    /// datapath never took (its update failed), so the next answer carrying them counts
    /// them as new and they are applied again.
    pub fn forget(&mut self, name: &str, ip: IpAddr) {
        let Some(entry) = self.names.get_mut(name) else {
            return;
        };
        if let Some(at) = entry.ips.iter().position(|l| l.ip == ip) {
            let gone = entry.ips.swap_remove(at);
            self.expiry.remove(&(gone.expires, entry.name.clone(), ip));
        }
        if entry.ips.is_empty() {
            self.names.remove(name);
        }
    }

    /// The IPs learned for `name` (folded form).
    pub fn ips(&self, name: &str) -> &[LearnedIp] {
        self.names.get(name).map(|e| &e.ips[..]).unwrap_or_default()
    }

    /// Every name with its IPs and selectors, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[LearnedIp], &[SelectorId])> {
        self.names
            .values()
            .map(|e| (&*e.name, &e.ips[..], &e.selectors[..]))
    }

    /// Number of names held.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Number of (name, IP) mappings held.
    pub fn mappings(&self) -> usize {
        self.expiry.len()
    }
}

fn upsert(
    entry: &mut NameEntry,
    expiry: &mut BTreeSet<(Instant, Arc<str>, IpAddr)>,
    ip: IpAddr,
    expires: Instant,
    max_ips: usize,
    answer: &[IpAddr],
    changes: &mut Vec<Change>,
) {
    if let Some(have) = entry.ips.iter_mut().find(|l| l.ip == ip) {
        // A shorter TTL never shortens a live allowance: the longest one wins. Extensions
        // under REFRESH_GRANULARITY are not worth a datapath update: the mapping then
        // expires at most that much before the latest answer says (never later).
        if expires <= have.expires + REFRESH_GRANULARITY {
            return;
        }
        expiry.remove(&(have.expires, entry.name.clone(), ip));
        have.expires = expires;
        expiry.insert((expires, entry.name.clone(), ip));
        changes.push(Change::Upsert {
            name: entry.name.clone(),
            ip,
            expires,
            selectors: entry.selectors.clone(),
            new: false,
        });
        return;
    }
    if max_ips == 0 {
        return;
    }
    while entry.ips.len() >= max_ips {
        // Evict the IP closest to expiry (the least recently confirmed), never one of
        // the answer being learned.
        let Some(oldest) = entry
            .ips
            .iter()
            .enumerate()
            .filter(|(_, l)| !answer.contains(&l.ip))
            .min_by_key(|(_, l)| l.expires)
            .map(|(i, _)| i)
        else {
            break;
        };
        let gone = entry.ips.swap_remove(oldest);
        expiry.remove(&(gone.expires, entry.name.clone(), gone.ip));
        changes.push(Change::Remove {
            name: entry.name.clone(),
            ip: gone.ip,
            selectors: entry.selectors.clone(),
        });
    }
    entry.ips.push(LearnedIp { ip, expires });
    expiry.insert((expires, entry.name.clone(), ip));
    changes.push(Change::Upsert {
        name: entry.name.clone(),
        ip,
        expires,
        selectors: entry.selectors.clone(),
        new: true,
    });
}

#[cfg(test)]
mod tests;
