#!/usr/bin/env bash
# Wheels the offline GPU machine lacks (its python3 3.12 has torch, accelerate, transformers, ... but not diffusers
# or torchsde), downloaded here into .whl/ (git-ignored): name ".whl" in the device tool's carry.
# Then on the GPU machine: bash scripts/gpu_check.sh  (installs .whl/*.whl into /tmp/site first).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 torchsde==0.2.6 trampoline==0.1.2 importlib_metadata==8.7.0
ls -la .whl
