//! `dnsfence manifests [install|crds]`: the Kubernetes install manifests (namespace, RBAC,
//! CRDs, ConfigMap, DaemonSet) or the CRDs alone, as YAML on stdout for `kubectl apply -f -`.
//! The objects come from [`dnsfence_k8s::manifests`]; `deploy/kubernetes/` holds the
//! default output.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dnsfence_k8s::manifests::{self, Options};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ManifestsArgs {
    #[command(subcommand)]
    command: Option<ManifestsCommand>,
    /// Options of `install` (the default).
    #[command(flatten)]
    install: InstallArgs,
}

#[derive(Debug, Subcommand)]
enum ManifestsCommand {
    /// Everything: namespace, ServiceAccount, ClusterRole and binding, CRDs, ConfigMap and
    /// the DaemonSet running the agent and the proxy on every node (the default).
    Install(InstallArgs),
    /// The CustomResourceDefinitions of EgressPolicy and ClusterEgressPolicy alone.
    Crds,
}

#[derive(Debug, Clone, Args)]
struct InstallArgs {
    /// Namespace of the ServiceAccount, ConfigMap and DaemonSet.
    #[arg(long, default_value = manifests::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Container image.
    #[arg(long, default_value_t = manifests::default_image())]
    image: String,
    /// `log.level` of the agent and the proxy (a tracing filter: error, warn, info, debug,
    /// trace, or directives like `info,dnsfence_proxy=debug`).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Address of the cluster's node-local DNS cache (e.g. 169.254.20.10): declared as a
    /// kube-dns endpoint so that policies allowing DNS to kube-dns also allow it.
    #[arg(long, value_name = "ADDR")]
    node_local_dns: Option<IpAddr>,
    /// Also enforce CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy objects (adds
    /// read access to them and to CRDs).
    #[arg(long)]
    watch_cilium_policies: bool,
}

impl InstallArgs {
    fn options(&self) -> Result<Options> {
        if !is_dns_label(&self.namespace) {
            bail!(
                "--namespace {:?}: a namespace is 1 to 63 lowercase letters, digits and '-', \
                 starting and ending with a letter or digit",
                self.namespace
            );
        }
        if self.image.is_empty() {
            bail!(
                "--image: empty; give an image reference (default {})",
                manifests::default_image()
            );
        }
        if self.image.chars().any(char::is_whitespace) {
            bail!("--image {:?}: an image reference has no spaces", self.image);
        }
        if self.log_level.chars().any(char::is_whitespace) {
            bail!("--log-level {:?}: no spaces allowed", self.log_level);
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .with_context(|| format!("--log-level {:?}", self.log_level))?;
        Ok(Options {
            namespace: self.namespace.clone(),
            image: self.image.clone(),
            log_level: self.log_level.clone(),
            node_local_dns: self.node_local_dns,
            watch_cilium_policies: self.watch_cilium_policies,
        })
    }
}

/// The command line that prints `options`, with only the flags that differ from the
/// defaults, for the header of the output.
fn command_line(options: &Options) -> String {
    let default = Options::default();
    let mut line = "dnsfence manifests install".to_owned();
    if options.namespace != default.namespace {
        line.push_str(&format!(" --namespace {}", options.namespace));
    }
    if options.image != default.image {
        line.push_str(&format!(" --image {}", options.image));
    }
    if options.log_level != default.log_level {
        line.push_str(&format!(" --log-level {}", options.log_level));
    }
    if let Some(ip) = options.node_local_dns {
        line.push_str(&format!(" --node-local-dns {ip}"));
    }
    if options.watch_cilium_policies {
        line.push_str(" --watch-cilium-policies");
    }
    line
}

/// A Kubernetes namespace name (an RFC 1123 label).
fn is_dns_label(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| alnum(c) || c == '-')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

pub(crate) fn run(args: &ManifestsArgs) -> Result<ExitCode> {
    let (command, yaml) = match &args.command {
        Some(ManifestsCommand::Crds) => (
            "dnsfence manifests crds".to_owned(),
            manifests::crds_yaml().context("rendering the CRDs")?,
        ),
        Some(ManifestsCommand::Install(install)) => install_manifests(install)?,
        None => install_manifests(&args.install)?,
    };
    let mut out = crate::output::stdout();
    write!(
        out,
        "# Generated by `{command}`. Do not edit: regenerate.\n{yaml}"
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn install_manifests(args: &InstallArgs) -> Result<(String, String)> {
    let options = args.options()?;
    let yaml = manifests::install_yaml(&options).context("rendering the manifests")?;
    Ok((command_line(&options), yaml))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names() {
        for ok in ["dnsfence-system", "a", "kube-system", "x1"] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn header_names_the_non_default_flags() {
        assert_eq!(
            command_line(&Options::default()),
            "dnsfence manifests install"
        );
        let options = Options {
            namespace: "fence".to_owned(),
            node_local_dns: "169.254.20.10".parse().ok(),
            watch_cilium_policies: true,
            ..Options::default()
        };
        assert_eq!(
            command_line(&options),
            "dnsfence manifests install --namespace fence --node-local-dns 169.254.20.10 \
             --watch-cilium-policies"
        );
    }
}
