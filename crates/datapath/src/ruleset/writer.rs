//! Writes `nft -f` statements for one table and remembers every chain, set and map it
//! defines (so that the others can be deleted). It knows the script's syntax, not what
//! any rule means: the other modules decide what to write, and in which order.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

/// The script being written, for table `inet <name>`.
pub(super) struct Writer {
    /// `inet <table>`.
    t: String,
    out: String,
    objects: BTreeSet<String>,
}

impl Writer {
    /// A script that starts by creating the table (if it does not exist).
    pub(super) fn new(table: &str) -> Self {
        let mut w = Self {
            t: format!("inet {table}"),
            out: String::new(),
            objects: BTreeSet::new(),
        };
        let _ = writeln!(w.out, "add table {}", w.t);
        w
    }

    /// The script and the objects it defines.
    pub(super) fn finish(self) -> (String, BTreeSet<String>) {
        (self.out, self.objects)
    }

    /// The chains, sets and maps defined so far.
    pub(super) fn objects(&self) -> &BTreeSet<String> {
        &self.objects
    }

    /// Appends a rule to `chain`.
    pub(super) fn rule(&mut self, chain: &str, args: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.out, "add rule {} {chain} {args}", self.t);
    }

    /// A base chain (`spec`: type, hook and priority) that accepts what no rule
    /// refuses, emptied and filled anew by each reconcile.
    pub(super) fn base_chain(&mut self, name: &str, spec: &str) {
        let _ = writeln!(
            self.out,
            "add chain {} {name} {{ type {spec}; policy accept; }}",
            self.t
        );
        let _ = writeln!(self.out, "flush chain {} {name}", self.t);
        self.objects.insert(name.to_owned());
    }

    /// A regular chain, emptied and filled anew by each reconcile.
    pub(super) fn plain_chain(&mut self, name: &str) {
        let _ = writeln!(self.out, "add chain {} {name}", self.t);
        let _ = writeln!(self.out, "flush chain {} {name}", self.t);
        self.objects.insert(name.to_owned());
    }

    /// A set whose elements carry timeouts and which a reconcile never flushes
    /// (`body`: what goes between the braces after `type`).
    pub(super) fn kept_set(&mut self, name: &str, body: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.out, "add set {} {name} {{ {body} }}", self.t);
        self.objects.insert(name.to_owned());
    }

    /// Sets `<base>4` and `<base>6` of `ips`, by family.
    pub(super) fn addr_set(&mut self, base: &str, ips: &[IpAddr]) {
        let v4: Vec<String> = ips
            .iter()
            .filter(|i| i.is_ipv4())
            .map(ToString::to_string)
            .collect();
        let v6: Vec<String> = ips
            .iter()
            .filter(|i| i.is_ipv6())
            .map(ToString::to_string)
            .collect();
        self.map(&format!("{base}4"), "ipv4_addr", "", &v4);
        self.map(&format!("{base}6"), "ipv6_addr", "", &v6);
    }

    /// Interval sets `<base>4` and `<base>6` of `nets`, by family.
    pub(super) fn cidr_set(&mut self, base: &str, nets: &[ipnet::IpNet]) {
        let (v4, v6): (Vec<ipnet::IpNet>, Vec<ipnet::IpNet>) = nets
            .iter()
            .map(ipnet::IpNet::trunc)
            .partition(|n| n.addr().is_ipv4());
        // Interval sets refuse overlapping elements: merge them first.
        let show = |nets: Vec<ipnet::IpNet>| -> Vec<String> {
            ipnet::IpNet::aggregate(&nets)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        self.map(
            &format!("{base}4"),
            "ipv4_addr",
            " flags interval;",
            &show(v4),
        );
        self.map(
            &format!("{base}6"),
            "ipv6_addr",
            " flags interval;",
            &show(v6),
        );
    }

    /// A set or map whose content is replaced (atomically) by each reconcile.
    pub(super) fn map(&mut self, name: &str, ty: &str, flags: &str, elements: &[String]) {
        let kind = if ty.contains(" : ") { "map" } else { "set" };
        let _ = writeln!(
            self.out,
            "add {kind} {} {name} {{ type {ty};{flags} }}",
            self.t
        );
        let _ = writeln!(self.out, "flush {kind} {} {name}", self.t);
        let mut elements = elements.to_vec();
        elements.sort();
        elements.dedup();
        for chunk in elements.chunks(256) {
            let _ = writeln!(
                self.out,
                "add element {} {name} {{ {} }}",
                self.t,
                chunk.join(", ")
            );
        }
        self.objects.insert(name.to_owned());
    }

    /// Empties a chain (before deleting it: its rules may reference sets).
    pub(super) fn flush_chain(&mut self, name: &str) {
        let _ = writeln!(self.out, "flush chain {} {name}", self.t);
    }

    /// Deletes an empty chain nothing jumps to.
    pub(super) fn delete_chain(&mut self, name: &str) {
        let _ = writeln!(self.out, "delete chain {} {name}", self.t);
    }

    /// Deletes a set or map no rule references.
    pub(super) fn delete_set(&mut self, name: &str) {
        let _ = writeln!(self.out, "delete set {} {name}", self.t);
    }
}
