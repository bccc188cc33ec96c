#!/usr/bin/env bash
# The main job: set up .venv if needed, then `coautogen run` on the embedded default
# (10 simulated hospitals, sklearn digits, glyph generator, epsilon 1). Extra arguments are
# passed to `coautogen run`, e.g. `bash scripts/run.sh -f Gen` or `... privacy.epsilon=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/coautogen run "$@"
