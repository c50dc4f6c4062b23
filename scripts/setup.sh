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
# Debian dictionaries and fortune files for the demo's data and held-out sets (docs/data.md): FOLDOC and the Jargon
# File train, GCIDE and the fortunes are held out. Never dict-wn (WordNet: reserved for independent evaluation). Best
# effort: without them the GCIDE / fortunes tests skip and the demo trains and scores on the other sources.
if [ ! -f /usr/share/dictd/gcide.index ] || [ ! -f /usr/share/dictd/foldoc.index ] || [ ! -f /usr/share/dictd/jargon.index ] \
   || [ ! -f /usr/share/games/fortunes/food ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing dict-gcide dict-foldoc dict-jargon fortunes (Debian)" >&2
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends dict-gcide dict-foldoc dict-jargon fortunes; } \
      >/dev/null 2>&1 || echo "[setup] warning: could not install the Debian dictionaries / fortunes; their tests will skip" >&2
  else
    echo "[setup] warning: dict-gcide dict-foldoc dict-jargon fortunes missing (install them as root for the demo data)" >&2
  fi
fi
