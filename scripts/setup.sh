#!/usr/bin/env bash
# Everything a fresh machine needs: a venv at .venv holding exactly requirements/lock.txt, plus embforge (editable).
# The lock pins every direct and transitive dependency (scripts/lock.sh makes it); installs never take "whatever is
# newest". torch is the CPU wheel on disk (2.13.0+cpu); a bare `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.embforge-installed
want="$(cat pyproject.toml constraints.txt requirements/lock.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # A changed lock rebuilds the venv from scratch, so nothing the old lock installed lingers (pip's wheel cache
  # keeps the rebuild quick on a machine that has built llama-cpp-python once).
  rm -rf .venv
  "$PY" -m venv .venv
  . .venv/bin/activate
  echo "[setup] installing requirements/lock.txt + embforge into .venv (first time: llama-cpp-python compiles, ~5 min)" >&2
  grep -E '^(pip|setuptools|wheel)==' requirements/lock.txt > .venv/bootstrap.txt
  python -m pip install -q -r .venv/bootstrap.txt
  python -m pip install -q --no-deps -r requirements/lock.txt
  python -m pip install -q --no-deps --no-build-isolation -e .
  python -m pip check
  echo "$want" > "$stamp"
fi
