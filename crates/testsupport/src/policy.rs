//! Policy YAML for tests: the common "pods may resolve these names through this DNS
//! server and reach them" shape, written once.

/// Which DNS servers the policy's DNS rule covers.
#[derive(Debug, Clone, Copy)]
pub enum DnsPeer<'a> {
    /// kube-dns: `k8s-app=kube-dns` pods of `kube-system`.
    KubeDns,
    /// These CIDRs.
    Cidrs(&'a [&'a str]),
}

/// A `CiliumNetworkPolicy` named `web` in `default`, for pods labelled `app=<app>`:
/// DNS to `peer` on `port` (protocol ANY) may resolve `dns` (matchPattern each), and the
/// answers' IPs for `fqdns` (matchPattern each) are allowed on every port.
pub fn dns_policy(app: &str, peer: DnsPeer<'_>, port: u16, dns: &[&str], fqdns: &[&str]) -> String {
    let l3 = match peer {
        DnsPeer::KubeDns => {
            "toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]"
                .to_owned()
        }
        DnsPeer::Cidrs(c) => format!(
            "toCIDR: [{}]",
            c.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", ")
        ),
    };
    let patterns = |ps: &[&str]| {
        ps.iter()
            .map(|p| format!("{{matchPattern: {p:?}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut y = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: web, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: {app}}}}}\n  egress:\n    - {l3}\n      toPorts:\n        - ports: [{{port: \"{port}\", protocol: ANY}}]\n          rules: {{dns: [{}]}}\n",
        patterns(dns)
    );
    if !fqdns.is_empty() {
        y.push_str(&format!("    - toFQDNs: [{}]\n", patterns(fqdns)));
    }
    y
}
