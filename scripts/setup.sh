#!/usr/bin/env bash
# Installs ascend-deploy for CPU use: the CPU build of torch first (an unpinned torch pulls a
# multi-GB CUDA build), then the package in editable mode with its test extras.
# NPU users: install the torch that matches their torch-npu, then `pip install -e '.[npu]'`.
# TORCH_INDEX: an index to take torch from. PyPI's Linux x86_64 torch is a CUDA build; for the CPU one there, run
# with TORCH_INDEX=https://download.pytorch.org/whl/cpu (CI's package index serves the CPU build by default).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
