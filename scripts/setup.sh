#!/usr/bin/env bash
# Everything a fresh machine needs: a venv at .venv with embforge and its offline extras.
# torch is pinned to the CPU wheel (constraints.txt); a bare `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.embforge-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch (CPU wheel) and embforge[local,eval,dev] into .venv (first time: llama-cpp-python compiles, ~5 min)" >&2
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -m pip install -q -c constraints.txt "torch==2.13.0"
  python -m pip install -q -c constraints.txt -e ".[local,eval,dev]"
  echo "$want" > "$stamp"
fi
