#!/usr/bin/env bash
# The speed targets on a GPU machine in one bounded call: DQN vs a Python loop, the EnvPool ceiling,
# PPO / PPO-CfC / A2C / DQN training SPS, then the scorecard (benchmarks/targets.py).
#
#   usage: bash benchmarks/gpu_session.sh [BUDGET_S] [OUT_DIR]
#     BUDGET_S  wall-clock seconds for all of it (default 360); the rows that do not fit are recorded as skipped
#     OUT_DIR   where results/ (every JSON and Markdown file, at most 6) and session.log go
#               (default $OUT when set, else /tmp/jaxatari-gpu-session)
#   environment: ALGO_ENVS (default 64), DQN_ENVS (default 32), ALGOS (default below, in priority order)
#
# On a machine with no package index, build the bundle first (on a machine with one) and carry it:
#   ../shared/tools/offline-bundle.sh .offline 3.12   # .offline/site goes on PYTHONPATH if the Python lacks envpool
# Copy OUT_DIR/results/* into benchmarks/results/ to keep them. Rows run in priority order and the
# throughput files are rewritten (atomically) after each row, so a call killed early keeps what it measured.
set -uo pipefail
budget=${1:-360}
out=${2:-${OUT:-/tmp/jaxatari-gpu-session}}
case $budget in '' | *[!0-9]*) echo "error: BUDGET_S must be a whole number of seconds, got '$budget'." >&2; exit 2 ;; esac
budget=$(( 10#$budget ))  # 0360 is 360 seconds, not octal
[ "$budget" -ge 120 ] || { echo "error: BUDGET_S must be at least 120 s (the ceiling and one row), got $budget." >&2; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2  # relative to where the script was started, before the cd
py=${PYTHON:-python3}
case $py in */*) py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py") || exit 2 ;; esac  # a venv's link stays a link
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
algo_envs=${ALGO_ENVS:-64}
dqn_envs=${DQN_ENVS:-32}
# ppo and ppo-cfc decide two targets; the rest are context, measured if time is left.
algos=${ALGOS:-ppo ppo-cfc ppo-cfc-nature a2c dqn}
# The offline bundle only where this Python lacks the packages (its wheels are built for one Python version).
if [ -d .offline/site ] && ! "$py" -c 'import envpool, tyro, tensorboardX' 2> /dev/null; then
  export PYTHONPATH=$PWD/.offline/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
res=$out/results
mkdir -p "$res" || exit 2
start=$SECONDS
trap '"$py" benchmarks/targets.py --results-dir "$res" > /dev/null 2>&1' EXIT  # a scorecard even if cut short

{
  failed=0
  echo "== versions ($(date -u +%FT%TZ), budget ${budget} s)"
  timeout -k 5 60 "$py" -c 'import sys, jax, flax, optax, chex, orbax.checkpoint as oc, envpool
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__, "| optax", optax.__version__,
      "| chex", chex.__version__, "| orbax", oc.__version__, "| envpool", envpool.__version__)
print("devices", jax.devices())' || failed=1
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

  # DQN: a one-env Python loop and one compiled row, 10 s windows each, bounded to a third of the budget
  # (its files are written at the end: a DQN step that runs out of time leaves none).
  dqn_s=$(( budget / 3 ))
  echo "== dqn_throughput (timeout ${dqn_s} s)"
  timeout -k 5 "$dqn_s" "$py" benchmarks/dqn_throughput.py --num-envs "$dqn_envs" --seconds 10 --out-dir "$res" || failed=1

  # Ceiling, then the training rows in priority order with what is left (15 s spare for the scorecard).
  left=$(( budget - (SECONDS - start) - 15 ))
  if [ "$left" -lt 60 ]; then  # not even the ceiling and one row (and `timeout 0` would mean no limit)
    echo "== throughput skipped: ${left} s of the budget left"
    failed=1
  else
    echo "== throughput (budget ${left} s)"
    # shellcheck disable=SC2086  # $algos is a list of names
    timeout -k 5 "$(( left + 10 ))" "$py" benchmarks/throughput.py --algos $algos --algo-envs $algo_envs \
      --algo-seconds 15 --seconds 3 --repeats 2 --warmup 1 --budget "$left" --out-dir "$res" || failed=1
  fi

  echo "== targets ($(( SECONDS - start )) s in)"
  "$py" benchmarks/targets.py --results-dir "$res" || failed=1
  exit "$failed"
} 2>&1 | tee "$out/session.log"
exit "${PIPESTATUS[0]}"  # 1 when a step failed or was stopped at its limit (budget-cut rows are in the files)
