#!/usr/bin/env bash
# Fetch the GPU-only wheels pinned in requirements/lock-gpu.txt into .whl/ (git-ignored) for the device machine:
# CPython 3.12, manylinux x86-64. bench/gpu_suite.sh installs whatever lies in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' requirements/lock-gpu.txt | grep . | while read -r pin; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pin"
done
ls .whl
