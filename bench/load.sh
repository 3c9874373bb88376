#!/usr/bin/env bash
# The load benchmark: the same tools/call load against the upstream directly,
# through a bare pass-through (bench/passthrough.rs), and through toolgate
# (JWT + schema validation + rate limit + audit, with 10,000 other agents'
# manifests loaded), at concurrency 1 and 64, with wrk; then again at 64
# while manifests are edited and reloaded, checking that no call fails; then
# the memory benchmark (bench/memory.rs). Prints throughput, p50, p99, the
# ratios against the targets, toolgate's RSS and CPU per call (from /proc),
# and rewrites BENCHMARKS.md.
#
#   bash bench/load.sh                 # ROUNDS=5 rounds of DURATION=4s
#   ROUNDS=9 DURATION=10s bash bench/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-4s}
RELOAD_DURATION=${RELOAD_DURATION:-10s}
OUT=${OUT:-BENCHMARKS.md}

if ! command -v wrk >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet --bin toolgate --example bench-upstream --example passthrough --example memory
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
# 10,000 other agents, so the decision runs against a realistic policy set.
python3 - "$work/tool-manifests" <<'PY'
import sys
d = sys.argv[1]
tool = """  - name: svc__tool_{t}
    rate_limit: 600/min
    arguments:
      type: object
      properties:
        invoice_id: {{ type: string, pattern: "^INV-[0-9]{{6}}$" }}
      required: [invoice_id]
      additionalProperties: false
"""
for a in range(10000):
    with open(f"{d}/agent-{a}.yaml", "w") as f:
        f.write(f"agent: agent-{a}\nrate_limit: 120/min\ntools:\n" + "".join(tool.format(t=t) for t in range(20)) + 'deny:\n  - name: "*__delete_*"\n')
PY
export BENCH_SECRET=bench-secret-0123456789abcdef0123456789
RUST_LOG=warn "$bin/toolgate" serve --config "$work/toolgate.yaml" > "$work/tg.log" 2>&1 & pids+=($!); TG_PID=$!
TOKEN=$("$bin/toolgate" token --config "$work/toolgate.yaml" --agent bench-bot --ttl 2h)
export TOKEN
for p in $UP $PT $TG; do
  for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
# Space-separated samples per target/concurrency, one per round.
declare -A RPS P50 P99 REQ CPU
run() { # name port pid conc
  local name=$1 port=$2 pid=$3 c=$4 threads=1
  [ "$c" -gt 1 ] && threads=2
  wrk -t$threads -c"$c" -d1s -s bench/call.lua "http://127.0.0.1:$port/mcp" >/dev/null 2>&1 || true   # warm-up
  local before; before=$(cpu_ticks "$pid")
  local line; line=$(wrk -t$threads -c"$c" -d"$DURATION" --latency -s bench/call.lua "http://127.0.0.1:$port/mcp" | grep '^BENCH')
  local after; after=$(cpu_ticks "$pid")
  local k="$name/$c"
  local rps p50 p99 req cpu bad
  rps=$(sed -E 's/.*rps=([0-9.]+).*/\1/' <<<"$line")
  p50=$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$line")
  p99=$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$line")
  req=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
  bad=$(sed -E 's/.*non_200=([0-9]+).*/\1/' <<<"$line")
  [ "$bad" = "0" ] || { echo "$k: $bad non-200 answers" >&2; exit 1; }
  cpu=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="$req" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  RPS[$k]+="$rps "; P50[$k]+="$p50 "; P99[$k]+="$p99 "; REQ[$k]+="$req "; CPU[$k]+="$cpu "
  printf '%-12s c=%-3s %10s req/s  p50 %6s us  p99 %6s us  cpu/call %6s us\n' "$name" "$c" "$rps" "$p50" "$p99" "$cpu"
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# The machine is shared and noisy (runs of one binary vary by 30%), so the
# three targets are measured in turn, ROUNDS times: each comparison is
# between runs minutes apart at most, and the medians are reported.
ROUNDS=${ROUNDS:-5}
for r in $(seq "$ROUNDS"); do
  echo "round $r of $ROUNDS"
  for c in 1 64; do
    run direct "$UP" "$UP_PID" $c
    run passthrough "$PT" "$PT_PID" $c
    run toolgate "$TG" "$TG_PID" $c
  done
done
# Per-round comparisons (toolgate against the pass-through run just before
# it), then their medians.
pair() { # metric-array-name target-a target-b op printf-format
  local -n m=$1
  paste -d' ' <(tr ' ' '\n' <<<"${m[$2]}" | grep .) <(tr ' ' '\n' <<<"${m[$3]}" | grep .) \
    | awk "{ printf \"%s$5\", (NR > 1 ? \" \" : \"\"), $4 }"
}
RATIOS=$(pair RPS toolgate/64 passthrough/64 '$1 / $2' '%.2f')
ADDED=$(pair P50 toolgate/1 passthrough/1 '$1 - $2' '%d')
CPU_MORE=$(pair CPU toolgate/64 passthrough/64 '$1 - $2' '%.1f')
for k in "${!RPS[@]}"; do
  RPS[$k]=$(median <<<"${RPS[$k]}"); P50[$k]=$(median <<<"${P50[$k]}")
  P99[$k]=$(median <<<"${P99[$k]}"); CPU[$k]=$(median <<<"${CPU[$k]}")
done
RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$TG_PID/status")

# Under load, edit a manifest (the watcher reloads) and ask for reloads
# (POST /v1/reload) every 250 ms: no call may fail.
ADMIN_TOKEN=$("$bin/toolgate" token --config "$work/toolgate.yaml" --agent bench-admin --plane admin --roles approver --ttl 1h)
reloads_accepted() { curl -s "http://127.0.0.1:$ADM/metrics" | awk '/^toolgate_reloads_total\{result="accepted"\}/ {print $2}' | head -1; }
reloads_rejected() { curl -s "http://127.0.0.1:$ADM/metrics" | awk '/^toolgate_reloads_total\{result="rejected"\}/ {print $2}' | head -1; }
R0=$(reloads_accepted); R0=${R0:-0}
cp "$work/tool-manifests/agent-1234.yaml" "$work/agent-1234.orig"
(
  end=$((SECONDS + ${RELOAD_DURATION%s}))
  i=0
  while [ $SECONDS -lt $end ]; do
    i=$((i + 1))
    m="$work/tool-manifests/agent-1234.yaml"
    { cat "$work/agent-1234.orig"; echo "description: edit $i"; } > "$m.tmp" && mv "$m.tmp" "$m"
    curl -s -o /dev/null -X POST -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$ADM/v1/reload"
    sleep 0.25
  done
) &
EDITOR=$!
line=$(wrk -t2 -c64 -d"$RELOAD_DURATION" --latency -s bench/call_check.lua "http://127.0.0.1:$TG/mcp" | grep '^BENCH')
wait $EDITOR || true
R1=$(reloads_accepted); R1=${R1:-0}
RELOADS=$(awk -v a="$R1" -v b="$R0" 'BEGIN { printf "%d", a - b }')
RL_REQ=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
RL_RPS=$(sed -E 's/.*rps=([0-9.]+).*/\1/' <<<"$line")
RL_FAILED=$(sed -E 's/.*failed=([0-9]+).*/\1/' <<<"$line")
RL_NON200=$(sed -E 's/.*non_200=([0-9]+).*/\1/' <<<"$line")
printf 'during reloads c=64 %10s req/s  %s calls, %s failed, %s non-200, %s reloads accepted\n' "$RL_RPS" "$RL_REQ" "$RL_FAILED" "$RL_NON200" "$RELOADS"
[ "$RELOADS" -gt 0 ] || { echo "no reload happened during the run" >&2; exit 1; }
REJECTED=$(reloads_rejected)
[ "${REJECTED:-0}" = "0" ] || { echo "$REJECTED reloads were rejected: the edits must be valid" >&2; exit 1; }

# Memory and compile time at scale, in a process of its own.
MEM=$("$bin/examples/memory" | grep '^MEMORY') || { echo "memory benchmark failed: $MEM" >&2; exit 1; }
echo "$MEM"
mem() { sed -E "s/.* $1=([0-9.]+).*/\1/" <<<"$MEM"; }

# Every toolgate request must have been an allowed, forwarded call.
ALLOWED=$(curl -s "http://127.0.0.1:$ADM/metrics" | awk '/^toolgate_decisions_total\{event="call",decision="allow"\}/ {print $2}')
[ "$ALLOWED" -gt 0 ] || { echo "toolgate allowed nothing" >&2; exit 1; }

ratio=$(median <<<"$RATIOS")
added=$(median <<<"$ADDED")
cpu_more=$(median <<<"$CPU_MORE")
verdict() { if awk "BEGIN { exit !($1) }"; then echo "met"; else echo "**not met**"; fi; }
echo
echo "throughput ratio at c=64: $ratio (target >= 0.70: $(verdict "$ratio >= 0.70")); per round: $RATIOS"
echo "added p50 at c=1: ${added} us (target <= 30 us: $(verdict "$added <= 30")); per round: $ADDED"
echo "extra CPU per call: ${cpu_more} us (target <= 20 us: $(verdict "$cpu_more <= 20")); per round: $CPU_MORE"
echo "toolgate RSS: $((RSS_KB / 1024)) MiB; allowed calls audited: $ALLOWED"
echo "calls failed during $RELOADS reloads: $RL_FAILED of $RL_REQ (target 0: $(verdict "$RL_FAILED == 0 && $RL_NON200 == 0"))"
echo "RSS with 10k manifests x 20 tools and $(mem keys) rate-limit keys: $(mem rss_keys_mib) MiB (target <= 100 MB: $(verdict "$(mem rss_keys_mib) * 1048576 <= 100000000")); idle keys after reclaim: $(mem keys_after_reclaim)"

{
  echo "# Benchmarks"
  echo
  echo "Generated by \`bash bench/load.sh\` (DURATION=$DURATION per run) on $(date -u +%Y-%m-%d): $(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2/1048576}' /proc/meminfo), $(uname -r)."
  echo "wrk, the upstream, the pass-through and toolgate share the machine, so absolute numbers are low; the ratios are what matter."
  echo
  echo "Method: the same 2026-07-28 \`tools/call\` (JSON body ~250 bytes) against the bundled demo tool server directly, through a bare"
  echo "hyper pass-through (\`bench/passthrough.rs\`: no auth, no parsing, no policy), and through toolgate with an HS256 JWT,"
  echo "schema validation, agent and tool rate limits and the audit log on, and 10,000 other agents' manifests (20 tools each)"
  echo "loaded. CPU per call is the server process's utime+stime (from /proc) over the run divided by the requests served."
  echo "The machine is shared and noisy, so the three are measured in turn, $ROUNDS rounds of $DURATION each (after a 1 s warm-up);"
  echo "the table shows each metric's median over the rounds, and each goal is the median of the per-round comparisons"
  echo "(toolgate against the pass-through run of the same round), listed after it."
  echo
  echo "| target | conc | req/s | p50 µs | p99 µs | CPU µs/call |"
  echo "|---|---|---|---|---|---|"
  for c in 1 64; do for n in direct passthrough toolgate; do
    k="$n/$c"; echo "| $n | $c | ${RPS[$k]} | ${P50[$k]} | ${P99[$k]} | ${CPU[$k]} |"
  done; done
  echo
  echo "| goal | target | measured | |"
  echo "|---|---|---|---|"
  echo "| throughput vs pass-through, c=64 | ≥ 0.70 | $ratio (rounds: $RATIOS) | $(verdict "$ratio >= 0.70") |"
  echo "| added median latency, c=1 | ≤ 30 µs | ${added} µs (rounds: $ADDED) | $(verdict "$added <= 30") |"
  echo "| extra CPU per call, c=64 | ≤ 20 µs | ${cpu_more} µs (rounds: $CPU_MORE) | $(verdict "$cpu_more <= 20") |"
  echo "| toolgate RSS after the runs (10k manifests loaded) | ≤ 100 MB | $((RSS_KB / 1024)) MiB | $(verdict "$RSS_KB * 1024 <= 100000000") |"
  echo "| failed calls during reloads under load (c=64, $RELOADS reloads, $RL_REQ calls) | 0 | $RL_FAILED | $(verdict "$RL_FAILED == 0 && $RL_NON200 == 0") |"
  echo "| RSS, 10k manifests x 20 tools + $(mem keys) limiter keys (\`bench/memory.rs\`) | ≤ 100 MB | $(mem rss_keys_mib) MiB | $(verdict "$(mem rss_keys_mib) * 1048576 <= 100000000") |"
  echo "| idle limiter keys after reclaim | 0 | $(mem keys_after_reclaim) | $(verdict "$(mem keys_after_reclaim) == 0") |"
  echo "| cold compile of 10k manifests (all changed) | < 1 s | $(mem compile_ms) ms | $(verdict "$(mem compile_ms) < 1000") |"
  echo
  echo "Micro-benchmarks of the decision path, parsing, JWT verification and audit hashing: \`cargo bench\` (criterion; see \`benches/\`)."
  echo
} > "$OUT.tmp"
if [ -f "$OUT" ] && grep -q '^## Criterion' "$OUT"; then
  sed -n '/^## Criterion/,$p' "$OUT" >> "$OUT.tmp"
fi
mv "$OUT.tmp" "$OUT"
echo "wrote $OUT"
