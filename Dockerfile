# The dnsfence image: one binary, run by the DaemonSet's two containers (`dnsfence agent`,
# `dnsfence proxy --agent`; see `dnsfence manifests`).
#
#   docker build -t ghcr.io/dnsfence/dnsfence:VERSION .
#
# VERSION is the workspace version (Cargo.toml), the tag `dnsfence manifests` uses unless
# given --image.
#
# No Docker engine runs on the development machines or in CI: this file is checked by
# review, not built there.

# Builder: the toolchain rust-toolchain.toml pins, on the same Debian release as the runtime
# (the binary links glibc dynamically).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p dnsfence \
 && install -m 0755 target/release/dnsfence /dnsfence

# Runtime: the binary and the two tools it runs. The datapath applies the skeleton of its
# nftables table with `nft -f -` (nftables) and manages routing rules and routes with `ip`
# (iproute2); everything else (learned IPs, NFLOG) is netlink from the binary itself.
# ca-certificates: the system roots the Kubernetes client's TLS verifier also trusts.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /dnsfence /usr/local/bin/dnsfence
# Root, because nftables, TPROXY and transparent sockets need CAP_NET_ADMIN and CAP_NET_RAW;
# the DaemonSet grants only those two capabilities (all others dropped), not privileged,
# and a read-only root filesystem.
USER root
ENTRYPOINT ["/usr/local/bin/dnsfence"]
