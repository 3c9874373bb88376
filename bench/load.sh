#!/usr/bin/env bash
# The load benchmark: the same tools/call load against the upstream directly,
# through a bare pass-through (bench/passthrough.rs), and through toolgate
# (JWT + schema validation + rate limit + audit), at concurrency 1 and 64,
# with wrk. Prints throughput, p50, p99, the ratios against the targets,
# toolgate's RSS and CPU per call (from /proc), and rewrites BENCHMARKS.md.
#
#   bash bench/load.sh                 # DURATION=10s by default
#   DURATION=30s bash bench/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
OUT=${OUT:-BENCHMARKS.md}

if ! command -v wrk >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet --bin toolgate --example bench-upstream --example passthrough
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); PT=$(free_port); TG=$(free_port); ADM=$(free_port)

"$bin/examples/bench-upstream" "127.0.0.1:$UP" > "$work/up.log" 2>&1 & pids+=($!); UP_PID=$!
"$bin/examples/passthrough" "127.0.0.1:$PT" "127.0.0.1:$UP" > "$work/pt.log" 2>&1 & pids+=($!); PT_PID=$!

mkdir -p "$work/tool-manifests"
cat > "$work/toolgate.yaml" <<YAML
listen: 127.0.0.1:$TG
admin: { listen: 127.0.0.1:$ADM, metrics_public: true }
manifests: tool-manifests
state: sqlite://state.db
audit: { path: audit.jsonl }
auth:
  agents:
    issuer: bench
    audience: toolgate
    keys: [ { hs256: { secret_env: BENCH_SECRET } } ]
  approvers:
    issuer: bench
    audience: toolgate-admin
    keys: [ { hs256: { secret_env: BENCH_SECRET } } ]
upstreams:
  - name: billing
    url: http://127.0.0.1:$UP/mcp
limits: { upstream_timeout: 10s }
YAML
cat > "$work/tool-manifests/bench-bot.yaml" <<'YAML'
agent: bench-bot
rate_limit: { rate: 1000000/s, burst: 1000000 }
tools:
  - name: billing__get_invoice
    rate_limit: { rate: 1000000/s, burst: 1000000 }
    arguments:
      type: object
      properties:
        invoice_id: { type: string, pattern: "^INV-[0-9]{6}$" }
      required: [invoice_id]
      additionalProperties: false
deny:
  - name: "*__delete_*"
YAML
export BENCH_SECRET=bench-secret-0123456789abcdef0123456789
RUST_LOG=warn "$bin/toolgate" serve --config "$work/toolgate.yaml" > "$work/tg.log" 2>&1 & pids+=($!); TG_PID=$!
TOKEN=$("$bin/toolgate" token --config "$work/toolgate.yaml" --agent bench-bot --ttl 2h)
export TOKEN
for p in $UP $PT $TG; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
declare -A RPS P50 P99 REQ CPU
run() { # name port pid conc
  local name=$1 port=$2 pid=$3 c=$4 threads=1
  [ "$c" -gt 1 ] && threads=2
  wrk -t$threads -c"$c" -d2s -s bench/call.lua "http://127.0.0.1:$port/mcp" >/dev/null 2>&1 || true   # warm-up
  local before; before=$(cpu_ticks "$pid")
  local line; line=$(wrk -t$threads -c"$c" -d"$DURATION" --latency -s bench/call.lua "http://127.0.0.1:$port/mcp" | grep '^BENCH')
  local after; after=$(cpu_ticks "$pid")
  local k="$name/$c"
  RPS[$k]=$(sed -E 's/.*rps=([0-9.]+).*/\1/' <<<"$line")
  P50[$k]=$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$line")
  P99[$k]=$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$line")
  REQ[$k]=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
  local bad; bad=$(sed -E 's/.*non_200=([0-9]+).*/\1/' <<<"$line")
  [ "$bad" = "0" ] || { echo "$k: $bad non-200 answers" >&2; exit 1; }
  CPU[$k]=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="${REQ[$k]}" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  printf '%-12s c=%-3s %10s req/s  p50 %6s us  p99 %6s us  cpu/call %6s us\n' "$name" "$c" "${RPS[$k]}" "${P50[$k]}" "${P99[$k]}" "${CPU[$k]}"
}
for c in 1 64; do
  run direct "$UP" "$UP_PID" $c
  run passthrough "$PT" "$PT_PID" $c
  run toolgate "$TG" "$TG_PID" $c
done
RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$TG_PID/status")

# Every toolgate request must have been an allowed, forwarded call.
ALLOWED=$(curl -s "http://127.0.0.1:$ADM/metrics" | awk '/^toolgate_decisions_total\{event="call",decision="allow"\}/ {print $2}')
[ "$ALLOWED" -gt 0 ] || { echo "toolgate allowed nothing" >&2; exit 1; }

ratio=$(awk -v a="${RPS[toolgate/64]}" -v b="${RPS[passthrough/64]}" 'BEGIN { printf "%.2f", a / b }')
added=$(( ${P50[toolgate/1]} - ${P50[passthrough/1]} ))
cpu_more=$(awk -v a="${CPU[toolgate/64]}" -v b="${CPU[passthrough/64]}" 'BEGIN { printf "%.1f", a - b }')
verdict() { if awk "BEGIN { exit !($1) }"; then echo "met"; else echo "**not met**"; fi; }
echo
echo "throughput ratio at c=64: $ratio (target >= 0.70: $(verdict "$ratio >= 0.70"))"
echo "added p50 at c=1: ${added} us (target <= 30 us: $(verdict "$added <= 30"))"
echo "extra CPU per call: ${cpu_more} us (target <= 20 us: $(verdict "$cpu_more <= 20"))"
echo "toolgate RSS: $((RSS_KB / 1024)) MiB; allowed calls audited: $ALLOWED"

{
  echo "# Benchmarks"
  echo
  echo "Generated by \`bash bench/load.sh\` (DURATION=$DURATION per run) on $(date -u +%Y-%m-%d): $(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2/1048576}' /proc/meminfo), $(uname -r)."
  echo "wrk, the upstream, the pass-through and toolgate share the machine, so absolute numbers are low; the ratios are what matter."
  echo
  echo "Method: the same 2026-07-28 \`tools/call\` (JSON body ~250 bytes) against the bundled demo tool server directly, through a bare"
  echo "hyper pass-through (\`bench/passthrough.rs\`: no auth, no parsing, no policy), and through toolgate with an HS256 JWT,"
  echo "schema validation, agent and tool rate limits and the audit log on. CPU per call is the server process's utime+stime"
  echo "(from /proc) over the run divided by the requests served."
  echo
  echo "| target | conc | req/s | p50 µs | p99 µs | CPU µs/call |"
  echo "|---|---|---|---|---|---|"
  for c in 1 64; do for n in direct passthrough toolgate; do
    k="$n/$c"; echo "| $n | $c | ${RPS[$k]} | ${P50[$k]} | ${P99[$k]} | ${CPU[$k]} |"
  done; done
  echo
  echo "| goal | target | measured | |"
  echo "|---|---|---|---|"
  echo "| throughput vs pass-through, c=64 | ≥ 0.70 | $ratio | $(verdict "$ratio >= 0.70") |"
  echo "| added median latency, c=1 | ≤ 30 µs | ${added} µs | $(verdict "$added <= 30") |"
  echo "| extra CPU per call | ≤ 20 µs | ${cpu_more} µs | $(verdict "$cpu_more <= 20") |"
  echo "| toolgate RSS after the runs | — | $((RSS_KB / 1024)) MiB | |"
  echo
  echo "Micro-benchmarks of the decision path, parsing, JWT verification and audit hashing: \`cargo bench\` (criterion; see \`benches/\`)."
} > "$OUT.tmp"
if [ -f "$OUT" ] && grep -q '^## Criterion' "$OUT"; then
  sed -n '/^## Criterion/,$p' "$OUT" >> "$OUT.tmp"
fi
mv "$OUT.tmp" "$OUT"
echo "wrote $OUT"
