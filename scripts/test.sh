#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Triton for its CPU interpreter: the CUDA backend's Triton kernels (sparse attention, top-k, FP4 / FP8 experts,
# mHC) then run their tests here too, on CPU tensors, against the reference. 3.6.0 is the Triton the GPU runs use.
python3 -m pip install -q --disable-pip-version-check "triton==3.6.0"
export TRITON_INTERPRET=1
exec python3 -m pytest tests "$@"
