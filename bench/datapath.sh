#!/usr/bin/env bash
# Datapath benchmark against the real kernel, in a network namespace of its own (root).
# Prints the time from handing the datapath new IPs to the kernel confirming them (what
# the proxy holds an answer for), p50/p99 for 1, 10 and 100 new IPs per answer, and the
# sustained rate of new IPs per second. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench/datapath.sh: run as root (it creates a network namespace)" >&2
  exit 2
fi
command -v nft >/dev/null || { echo "needs nft (apt install nftables)" >&2; exit 2; }
cargo run --quiet --release -p dnsfence-datapath --example datapath_bench
