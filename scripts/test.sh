#!/usr/bin/env bash
# The test suite: set up .venv if needed, check formatting and lint with ruff (configured in
# pyproject.toml; fix with `.venv/bin/ruff format . && .venv/bin/ruff check --fix .`), then pytest
# (unit, Message-level, end-to-end through Flower). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not flower"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q "$@"
