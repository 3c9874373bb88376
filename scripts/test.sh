#!/usr/bin/env bash
# Runs every test toolgate has, on a fresh clone: installs the pinned Python
# MCP SDKs (1.x and 2.x) into ignored venvs and the pinned npm packages (the
# TypeScript SDK, MCP servers, the conformance suite, Node 22) into ignored
# node_modules for the interop tests (reused when present), then lints and runs the Rust tests (unit, real-socket, CLI,
# interop). One build profile (dev/test) for all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot build: incremental state would only take disk (2 GB of it in a
# fresh clone), since nothing here is rebuilt after an edit.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  echo "== installing Debian's chromium and chromium-driver (approver page test)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

echo "== interop environments"
eval "$(bash scripts/setup-interop.sh)"
export TOOLGATE_PY1 TOOLGATE_PY2 TOOLGATE_NODE_DIR

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

echo "== tests"
# The conformance parity test (tests/interop_node.rs) leaves its pass counts
# and sets here; cargo hides a passing test's output, so print the file.
report="${CARGO_TARGET_DIR:-target}/conformance-report.txt"
rm -f "$report"
status=0
cargo test --all-targets --locked || status=$?
if [ -f "$report" ]; then
  echo "== conformance report ($report)"
  cat "$report"
fi
[ "$status" -eq 0 ] || exit "$status"

echo "== fuzz smoke (30 s per target; longer runs: bash scripts/fuzz.sh SECONDS)"
bash scripts/fuzz.sh "${TOOLGATE_FUZZ_SECONDS:-30}"
