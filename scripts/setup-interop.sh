#!/usr/bin/env bash
# Creates (or reuses) the pinned Python venvs the interop tests use: the MCP
# Python SDK 1.x (protocol 2025-11-25) and 2.x (2026-07-28). Idempotent: a
# venv is rebuilt only when its requirements file changed. Prints the
# variables the tests read, for `eval`.
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
echo "TOOLGATE_PY1=$root/.venv-interop-1/bin/python"
echo "TOOLGATE_PY2=$root/.venv-interop-2/bin/python"
