#!/usr/bin/env bash
# Resume benchmark of the main job (issue 9): start `coautogen run`, SIGKILL it and every process it
# started once round 2 is in flight (a crash of the machine), then `coautogen run --resume`, then an
# uninterrupted main job for comparison. Prints the times, the checkpoint size and the ledgers.
#   bash simulations/resume_benchmark.sh OUT_DIR [coautogen run arguments...]
# WAIT_FOR (default "round 2/2:") is the flower.log line after which the kill comes, KILL_DELAY
# (seconds, default 0) how long after it; e.g. a site's local DP-SGD in flight:
#   WAIT_FOR="DP-SGD round 3/" KILL_DELAY=1 bash simulations/resume_benchmark.sh OUT_DIR -tt real ...
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
coautogen="$root/.venv/bin/coautogen"
out="$(realpath -m "${1:?usage: resume_benchmark.sh OUT_DIR [coautogen run arguments...]}")"
shift
rm -rf "$out" && mkdir -p "$out" && cd "$out"
export WANDB_MODE=disabled
start=$(date +%s.%N)
setsid "$coautogen" run --out "$out" --name main "$@" > "$out/first.txt" 2>&1 &
pid=$!
until grep -q "${WAIT_FOR:-round 2/2:}" "$out/main/flower.log" 2>/dev/null; do sleep 0.2; done
sleep "${KILL_DELAY:-0}"
pkill -9 -g "$(ps -o pgid= "$pid" | tr -d ' ')"; pkill -9 -f "$out/main/flower"; sleep 2
echo "killed after $(echo "$(date +%s.%N) - $start" | bc) s; checkpoint.json $(stat -c %s "$out/main/checkpoint.json") bytes"
echo "charged, release not stored (a site killed mid-release): $(find "$out/main/sites" -name '*.intent.json' | sort | tr '\n' ' ')"
t0=$(date +%s.%N)
"$coautogen" run --resume "$out/main" > "$out/resume.txt" 2>&1
echo "resume exit $? in $(echo "$(date +%s.%N) - $t0" | bc) s"
grep -h "resumed run" "$out/main/flower.log"
tail -12 "$out/resume.txt"
for ledger in "$out"/main/sites/site-*/privacy_ledger.json; do
  python3 -c "import json,sys; e=json.load(open(sys.argv[1]))['entries']; print(sys.argv[1].split('/')[-2], [x['round'] for x in e], len({x['run_id'] for x in e}), 'run key(s)')" "$ledger"
done
summary() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], s['status'], 'accuracy_real_test', s['accuracy_real_test'], 'epsilon_spent_max', s['epsilon_spent_max'])" "$1/summary.json" "$2"; }
summary "$out/main" resumed:
t2=$(date +%s.%N)
"$coautogen" run --out "$out" --name whole "$@" > "$out/whole.txt" 2>&1
echo "uninterrupted main job in $(echo "$(date +%s.%N) - $t2" | bc) s"
summary "$out/whole" uninterrupted:
