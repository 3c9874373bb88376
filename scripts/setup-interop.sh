#!/usr/bin/env bash
# Creates (or reuses) the pinned environments the interop tests use: Python
# venvs with the MCP Python SDK 1.x (protocol 2025-11-25) and 2.x
# (2026-07-28), and the npm packages from package-lock.json files (the
# TypeScript SDK, server-everything, server-filesystem, the conformance suite
# and the Node 22 it needs; the TypeScript example). Idempotent: each is
# rebuilt only when its pinned list changed. Prints the variables the tests
# read, for `eval`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
for n in 1 2; do
  req="$root/tests/interop/requirements-$n.txt"
  venv="$root/.venv-interop-$n"
  stamp="$venv/.requirements.sha256"
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up $venv (mcp $(grep -E '^mcp==' "$req" | cut -d= -f3))" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$req" >&2
    echo "$want" > "$stamp"
  fi
done
if ! command -v npm >/dev/null 2>&1; then
  echo "installing Debian's nodejs and npm" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >&2
fi
for dir in "$root/tests/interop/node" "$root/examples/typescript"; do
  stamp="$dir/node_modules/.package-lock.sha256"
  want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing the pinned npm packages of $dir" >&2
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) >&2
    echo "$want" > "$stamp"
  fi
done
echo "TOOLGATE_NODE_DIR=$root/tests/interop/node"
echo "TOOLGATE_PY1=$root/.venv-interop-1/bin/python"
echo "TOOLGATE_PY2=$root/.venv-interop-2/bin/python"
