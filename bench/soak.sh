#!/usr/bin/env bash
# The soak run (see bench/soak.rs): the release toolgate at a steady mix of
# allowed, denied, invalid, held and rate-limited calls for MINUTES, checking
# that no unexpected answer appears, memory stays flat, the audit chain
# verifies and holds one decision record per call, and its signed checkpoints
# verify with the key (live with --max-age, stopped with --expect-seq from
# the operator log). Writes bench/SOAK.md for runs of 10 minutes or more,
# target/soak-report.md otherwise.
#
#   bash bench/soak.sh            # 10 minutes at 300 calls/s
#   bash bench/soak.sh 1 500      # 1 minute at 500 calls/s
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet --bin toolgate --example soak
exec target/release/examples/soak "${1:-10}" "${2:-300}"
