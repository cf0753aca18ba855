#!/usr/bin/env bash
# The whole test suite on a fresh machine: install (CPU torch first, then the package with its
# test extras), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[dev]"
python -m pytest tests "$@"
