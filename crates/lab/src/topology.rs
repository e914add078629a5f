//! The lab's topology: which namespaces, links, addresses and routes it creates, and the
//! `ip` scripts that create them.
//!
//! ```text
//!  pod i  eth0 10.200.i.2/24 fd00:200:i::2/64 ── pod<i> 10.200.i.1 fd00:200:i::1 ┐ node
//!  world  eth0 10.201.0.2/24 fd00:201::2/64  ── world  10.201.0.1 fd00:201::1   ┘ (forwarding)
//! ```
//! The node routes the documentation ranges to the world, where every address of them is
//! local (AnyIP routes on `lo`); pods and the world route everything else via the node.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The most pods a lab can have (one `10.200.<i>.0/24` each).
pub const MAX_PODS: usize = 250;

/// The ranges the world owns, every address of them: `192.0.2.0/24`, `198.51.100.0/24`,
/// `203.0.113.0/24` and `2001:db8::/32`.
pub const WORLD_PREFIXES: [&str; 4] = [
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "2001:db8::/32",
];

/// The node's interface towards the world.
pub const NODE_WORLD_INTERFACE: &str = "world";

/// Interfaces inside pods and the world.
const INNER_INTERFACE: &str = "eth0";

const WORLD_NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const WORLD_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const WORLD_NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);
const WORLD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 2);

/// Addresses of pod `index`'s link: (pod, node) for IPv4 and IPv6.
pub(crate) fn pod_addresses(index: usize) -> ((Ipv4Addr, Ipv4Addr), (Ipv6Addr, Ipv6Addr)) {
    let i = u8::try_from(index).unwrap_or(u8::MAX);
    let v6 = |host| Ipv6Addr::new(0xfd00, 0x200, u16::from(i), 0, 0, 0, 0, host);
    (
        (Ipv4Addr::new(10, 200, i, 2), Ipv4Addr::new(10, 200, i, 1)),
        (v6(2), v6(1)),
    )
}

/// The node's interface towards pod `index`.
pub(crate) fn pod_interface(index: usize) -> String {
    format!("pod{index}")
}

/// Sysctls every namespace gets: no duplicate address detection, so IPv6 addresses are
/// usable at once.
pub(crate) const COMMON_SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

/// The node forwards (set before any IPv6 address: forwarding changes how they behave).
pub(crate) const NODE_SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
];

/// The world may send from (and bind) any address of its AnyIP ranges over IPv6 too.
pub(crate) const WORLD_SYSCTLS: [(&str, &str); 1] = [("net/ipv6/ip_nonlocal_bind", "1")];

/// The node's script: the veth pairs (created from inside the node, their far ends placed
/// straight into the pods and the world), its addresses and its routes to the world.
pub(crate) fn node_script(pods: &[String], world: &str) -> String {
    let mut s = String::from("link set lo up\n");
    for (index, pod) in pods.iter().enumerate() {
        let ((_, v4), (_, v6)) = pod_addresses(index);
        let dev = pod_interface(index);
        s += &format!("link add {dev} type veth peer name {INNER_INTERFACE} netns {pod}\n");
        s += &format!("addr add {v4}/24 dev {dev}\n");
        s += &format!("addr add {v6}/64 dev {dev} nodad\n");
        s += &format!("link set {dev} up\n");
    }
    let dev = NODE_WORLD_INTERFACE;
    s += &format!("link add {dev} type veth peer name {INNER_INTERFACE} netns {world}\n");
    s += &format!("addr add {WORLD_NODE_V4}/24 dev {dev}\n");
    s += &format!("addr add {WORLD_NODE_V6}/64 dev {dev} nodad\n");
    s += &format!("link set {dev} up\n");
    for prefix in WORLD_PREFIXES {
        let via = if prefix.contains(':') {
            WORLD_V6.to_string()
        } else {
            WORLD_V4.to_string()
        };
        s += &format!("route add {prefix} via {via} dev {dev}\n");
    }
    s
}

/// Pod `index`'s script: its addresses and default routes via the node.
pub(crate) fn pod_script(index: usize) -> String {
    let ((v4, gw4), (v6, gw6)) = pod_addresses(index);
    let dev = INNER_INTERFACE;
    format!(
        "link set lo up\n\
         addr add {v4}/24 dev {dev}\n\
         addr add {v6}/64 dev {dev} nodad\n\
         link set {dev} up\n\
         route add default via {gw4} dev {dev}\n\
         route add default via {gw6} dev {dev}\n"
    )
}

/// The world's script: its link to the node, AnyIP routes making every address of the
/// documentation ranges local, and default routes back via the node.
pub(crate) fn world_script() -> String {
    let dev = INNER_INTERFACE;
    let mut s = format!(
        "link set lo up\n\
         addr add {WORLD_V4}/24 dev {dev}\n\
         addr add {WORLD_V6}/64 dev {dev} nodad\n\
         link set {dev} up\n"
    );
    for prefix in WORLD_PREFIXES {
        s += &format!("route add local {prefix} dev lo\n");
    }
    s += &format!("route add default via {WORLD_NODE_V4} dev {dev}\n");
    s += &format!("route add default via {WORLD_NODE_V6} dev {dev}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_their_own_subnets() {
        let ((v4, gw4), (v6, gw6)) = pod_addresses(3);
        assert_eq!(
            (v4.to_string(), gw4.to_string()),
            ("10.200.3.2".into(), "10.200.3.1".into())
        );
        assert_eq!(
            (v6.to_string(), gw6.to_string()),
            ("fd00:200:3::2".into(), "fd00:200:3::1".into())
        );
    }

    #[test]
    fn interface_names_fit_in_ifnamsiz() {
        assert!(pod_interface(MAX_PODS - 1).len() <= 15);
        assert!(NODE_WORLD_INTERFACE.len() <= 15);
    }

    #[test]
    fn scripts_route_the_documentation_ranges() {
        let node = node_script(&["p0".into()], "w");
        assert!(node.contains("route add 2001:db8::/32 via fd00:201::2 dev world"));
        assert!(node.contains("link add pod0 type veth peer name eth0 netns p0"));
        assert!(world_script().contains("route add local 198.51.100.0/24 dev lo"));
        assert!(pod_script(1).contains("route add default via fd00:200:1::1 dev eth0"));
    }
}
