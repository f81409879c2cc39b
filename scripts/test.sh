#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest tests "$@"
