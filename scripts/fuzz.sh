#!/usr/bin/env bash
# Fuzzes toolgate's input boundaries with cargo-fuzz (libFuzzer):
#   mcp_parse     any bytes an agent can POST, through the JSON-RPC/MCP parser
#   policy_parse  any text as a manifest and as a config
#   decide        arbitrary tool calls against a fixed manifest; property:
#                 never Allow what the manifest does not allow
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET=60] [TARGET...]
#
# Runs on the stable toolchain (no sanitizer, so no nightly flags); cargo-fuzz
# is installed pinned into .ci-cache, and libFuzzer itself is C++ (built by
# libfuzzer-sys), so Debian's g++ is installed when no C++ compiler is there.
# The properties live in fuzz/properties.rs. Every file under
# fuzz/seeds/<target>/ is replayed first here, and by `cargo test` through
# tests/fuzz_seeds.rs, so a finding saved there is a regression test from
# then on. A crash exits non-zero and leaves the input in
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(mcp_parse policy_parse decide)

CARGO_FUZZ_VERSION=0.13.2
ROOT="$PWD/.ci-cache/cargo-fuzz"
if ! "$ROOT/bin/cargo-fuzz" --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION into $ROOT"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$ROOT" --quiet
fi
export PATH="$ROOT/bin:$PATH"

if ! command -v c++ >/dev/null 2>&1; then
  echo "== installing Debian's g++ (libFuzzer is C++)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ >/dev/null
fi

echo "== building fuzz targets"
# cargo-fuzz has no --locked; this fails, as --locked would, when
# fuzz/Cargo.lock is not up to date, and the build then uses it unchanged.
cargo metadata --locked --manifest-path fuzz/Cargo.toml --format-version 1 >/dev/null
cargo fuzz build -s none --fuzz-dir fuzz

for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== fuzzing $t for ${SECONDS_PER_TARGET}s"
  log="fuzz/$t.log"
  if ! cargo fuzz run -s none --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$SECONDS_PER_TARGET" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "FAIL: $t found a crash; the input is in fuzz/artifacts/$t/ (copy it to fuzz/seeds/$t/ once fixed)" >&2
    exit 1
  fi
  runs=$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
  echo "   $t: $runs runs, coverage $cov edges, no crash"
done
