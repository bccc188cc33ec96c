#!/usr/bin/env bash
# The test suite: set up .venv if needed, then pytest (unit, Message-level, end-to-end through
# Flower). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not flower"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q "$@"
