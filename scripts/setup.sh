#!/usr/bin/env bash
# Installs ascend-deploy for CPU use: the CPU build of torch first (an unpinned torch pulls a
# multi-GB CUDA build), then the package in editable mode with its test extras.
# NPU users: install the torch that matches their torch-npu, then `pip install -e '.[npu]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
