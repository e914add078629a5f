#!/usr/bin/env bash
# DNS load benchmark: dnsperf against a real upstream (dnsmasq) directly, through dnsdist
# (a peer forwarder, when installed), then through the dnsfence proxy (allowed names whose
# answers carry known IPs), in one run on this machine.
# Prints qps, p50/p99 latency and CPU time per query of the process under test.
#
# Two phases per target: saturated (as many queries per second as it takes, OUTSTANDING in
# flight) for throughput and CPU per query, then a fixed RATE for latency (p50/p99 at a
# load both targets sustain, so the difference is the latency the proxy adds).
#
# Usage: bench/dns-throughput.sh [seconds per run, default 10] [outstanding, default 100] [rate, default 20000]
# ONLY_RATE=1 skips the saturated phase, ONLY_PROXY=1 the baselines (handy while profiling).
# BASELINE=path/to/another/dnsfence adds rows for that binary (an older build, say), each
# run right after this build's, so a change is measured against what it replaces in the
# same run.
# Needs root only to install dnsperf/dnsmasq when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
OUTSTANDING=${2:-100}
RATE=${3:-20000}

need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
[ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release -q -p dnsfence
cargo build --release -q -p dnsfence-proxy --example udp_floor
BIN=target/release/dnsfence

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port)
PX=$(free_port)
DD=$(free_port)
FL=$(free_port)
PB=$(free_port)

# 1000 names, each with one A record, served by dnsmasq from its configuration. (Not in
# 192.0.2.0/24: the machines this runs on have 192.0.2.2 themselves, and the proxy never
# learns a node address.)
: > "$work/dnsmasq.conf"
: > "$work/queries"
for i in $(seq 0 999); do
  echo "host-record=h$i.bench.example.com,198.51.100.$((i % 250 + 1))" >> "$work/dnsmasq.conf"
  echo "h$i.bench.example.com A" >> "$work/queries"
done
/usr/sbin/dnsmasq --keep-in-foreground --conf-file="$work/dnsmasq.conf" --no-resolv --no-hosts \
  --bind-interfaces --listen-address=127.0.0.1 --port="$UP" --user=root --pid-file= \
  --local=/bench.example.com/ --local-ttl=300 --cache-size=0 &
pids+=($!)
UPSTREAM_PID=$!

cat > "$work/policy.yaml" <<YAML
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: bench}}
  egress:
    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
      toPorts:
        - ports: [{port: "$UP", protocol: ANY}]
          rules: {dns: [{matchPattern: "*.bench.example.com"}]}
    - toFQDNs: [{matchPattern: "*.bench.example.com"}]
YAML
cat > "$work/config.yaml" <<YAML
policies: [policy.yaml]
endpoints:
  - {name: bench-client, labels: {app: bench}, ips: [127.0.0.2]}
  - {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [127.0.0.1]}
dns:
  listen: ["127.0.0.1:$PX"]
  upstreams: ["127.0.0.1:$UP"]
  max_inflight_per_client: 100000
api: {socket: $work/api.sock}
YAML
RUST_LOG=warn "$BIN" proxy --config "$work/config.yaml" &
pids+=($!)
PROXY_PID=$!
BASELINE_PID=
if [ -n "${BASELINE:-}" ]; then
  sed -e "s/127.0.0.1:$PX/127.0.0.1:$PB/" -e "s#$work/api.sock#$work/baseline.sock#" \
    "$work/config.yaml" > "$work/baseline.yaml"
  RUST_LOG=warn "$BASELINE" proxy --config "$work/baseline.yaml" &
  pids+=($!)
  BASELINE_PID=$!
fi
# A peer for scale, when installed (`apt-get install dnsdist`; not installed here, as its
# package enables a system service): dnsdist forwarding to the same upstream, no packet
# cache, batched receives.
DNSDIST_PID=
if command -v dnsdist >/dev/null; then
cat > "$work/dnsdist.conf" <<LUA
setLocal("127.0.0.1:$DD")
setUDPMultipleMessagesVectorSize(32)
setSecurityPollSuffix("")
newServer({address="127.0.0.1:$UP", checkName="h0.bench.example.com."})
LUA
dnsdist --supervised --disable-syslog -C "$work/dnsdist.conf" > "$work/dnsdist.log" 2>&1 &
pids+=($!)
DNSDIST_PID=$!
fi
# The floor: a trivial tokio responder (REFUSED to everything), one socket round trip.
target/release/examples/udp_floor "127.0.0.1:$FL" &
pids+=($!)
FLOOR_PID=$!
sleep 1

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
user_ticks() { awk '{print $14}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# Time the hypervisor ran something else while this VM wanted to run (all vCPUs).
steal_ticks() { awk '/^cpu / {print $9}' /proc/stat; }

# run NAME PORT PID [extra dnsperf flags]: dnsperf for DURATION seconds; CPU of PID over the run.
run() {
  local name=$1 port=$2 pid=$3
  shift 3
  # Warm up (the proxy learns every name once).
  dnsperf -s 127.0.0.1 -p "$port" -a 127.0.0.2 -d "$work/queries" -n 1 -q "$OUTSTANDING" >/dev/null 2>&1 || true
  local before; before=$(cpu_ticks "$pid")
  local ubefore; ubefore=$(user_ticks "$pid")
  local sbefore; sbefore=$(steal_ticks)
  dnsperf -s 127.0.0.1 -p "$port" -a 127.0.0.2 -d "$work/queries" -l "$DURATION" -q "$OUTSTANDING" -c 4 -v "$@" \
    > "$work/$name.out" 2>&1 || true
  local after; after=$(cpu_ticks "$pid")
  local uafter; uafter=$(user_ticks "$pid")
  local safter; safter=$(steal_ticks)
  local completed qps
  completed=$(awk '/Queries completed:/ {print $3}' "$work/$name.out")
  qps=$(awk '/Queries per second:/ {print $4}' "$work/$name.out")
  grep -E '^> (NOERROR|REFUSED)' "$work/$name.out" | awk '{print $NF}' | sort -g > "$work/$name.lat"
  local n p50 p99
  n=$(wc -l < "$work/$name.lat")
  p50=$(awk -v n="$n" 'NR == int(n * 0.50) + 1 {printf "%.0f", $1 * 1e6}' "$work/$name.lat")
  p99=$(awk -v n="$n" 'NR == int(n * 0.99) + 1 {printf "%.0f", $1 * 1e6}' "$work/$name.lat")
  local cpu_us
  cpu_us=$(awk -v t=$((after - before)) -v hz="$HZ" -v q="$completed" 'BEGIN {printf "%.1f", t / hz * 1e6 / q}')
  local user_us
  user_us=$(awk -v t=$((uafter - ubefore)) -v hz="$HZ" -v q="$completed" 'BEGIN {printf "%.1f", t / hz * 1e6 / q}')
  local lost; lost=$(awk '/Queries lost:/ {print $3}' "$work/$name.out")
  local steal
  steal=$(awk -v t=$((safter - sbefore)) -v hz="$HZ" -v s="$DURATION" -v n="$(nproc)" 'BEGIN {printf "%.0f%%", t / hz / s / n * 100}')
  printf '%-26s %10.0f %9s %9s %12s %8s %8s %10s %6s\n' "$name" "$qps" "$p50" "$p99" "$cpu_us" "$user_us" "$lost" "$completed" "$steal"
}

echo "dnsperf: ${DURATION}s per run, $OUTSTANDING outstanding, 1000 names, 2 cores shared by all processes"
# On a VM, waking an idle vCPU can cost tens of microseconds unless the guest polls before
# halting; the latency at a fixed rate depends on it (see BENCHMARKS.md).
poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
[ -r "$poll" ] && echo "guest halt polling (cpuidle-haltpoll): $(cat "$poll") ns"
printf '%-26s %10s %9s %9s %12s %8s %8s %10s %6s\n' "target" "qps" "p50_us" "p99_us" "cpu_us/query" "of_user" "lost" "queries" "steal"
base=${ONLY_PROXY:-}
peer=$([ -n "$DNSDIST_PID" ] || echo none)
[ -n "${ONLY_RATE:-}$base" ] || run "floor-echo" "$FL" "$FLOOR_PID"
[ -n "${ONLY_RATE:-}$base" ] || run "upstream-direct" "$UP" "$UPSTREAM_PID"
[ -n "${ONLY_RATE:-}$base$peer" ] || run "dnsdist-forward" "$DD" "$DNSDIST_PID"
[ -n "${ONLY_RATE:-}" ] || run "through-dnsfence" "$PX" "$PROXY_PID"
[ -n "${ONLY_RATE:-}" ] || [ -z "$BASELINE_PID" ] || run "through-baseline" "$PB" "$BASELINE_PID"
[ -n "$base" ] || run "floor-echo@$RATE" "$FL" "$FLOOR_PID" -Q "$RATE"
[ -n "$base" ] || run "upstream-direct@$RATE" "$UP" "$UPSTREAM_PID" -Q "$RATE"
[ -n "$base$peer" ] || run "dnsdist-forward@$RATE" "$DD" "$DNSDIST_PID" -Q "$RATE"
run "through-dnsfence@$RATE" "$PX" "$PROXY_PID" -Q "$RATE"
[ -z "$BASELINE_PID" ] || run "through-baseline@$RATE" "$PB" "$BASELINE_PID" -Q "$RATE"
[ -z "$peer" ] || echo "(dnsdist is not installed: no peer row; apt-get install dnsdist adds it)"
echo "(cpu_us/query: CPU time of the process under test: the trivial responder, dnsmasq, dnsdist, or the dnsfence proxy;"
echo " of_user: the part of it spent in user space, the rest is the kernel's;"
echo " steal: the share of the VM's vCPU time the hypervisor gave to others during the run)"
