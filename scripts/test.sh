#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Triton for its CPU interpreter: the CUDA backend's Triton kernels (sparse attention, top-k, FP4 / FP8 experts,
# mHC) then run their tests here too, on CPU tensors, against the reference. 3.6.0 is the Triton the GPU runs use.
python3 -m pip install -q --disable-pip-version-check "triton==3.6.0"
export TRITON_INTERPRET=1
# Two worker processes (pytest-xdist), one per core of the 2-core CI machine: the interpreted kernels are
# single-threaded Python. On such a machine the suite took 1,120 s against 1,899 s in one process (2026-12-01);
# a later `-n N` in the arguments overrides it (`-n 0`: one process).
exec python3 -m pytest tests -n 2 "$@"
