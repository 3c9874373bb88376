#!/usr/bin/env bash
# The soak run (see bench/soak.rs): the release toolgate at a steady mix of
# allowed, denied, invalid, held and rate-limited calls for MINUTES, checking
# that no unexpected answer appears, memory stays flat, the audit chain
# verifies and holds one decision record per call. Writes bench/SOAK.md.
#
#   bash bench/soak.sh            # 10 minutes at 300 calls/s
#   bash bench/soak.sh 1 500      # 1 minute at 500 calls/s
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin toolgate --example soak
exec target/release/examples/soak "${1:-10}" "${2:-300}"
