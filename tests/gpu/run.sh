#!/usr/bin/env bash
# GPU tests of the SGLang integration. On the GPU machine, from the repo root:
#   SGL_RUN_OUT=$OUT bash .device/sgl-run.sh -- bash tests/gpu/run.sh [WHICH] [ARGS...]
# WHICH: setup (patch SGLang and install the plugin, nothing else), smoke (default: unit checks, then the no-spec server and DSPARK with the perfect and half bigram
#        drafts), more (simulated acceptance, gated head, no CUDA graphs), unit,
#        issue4 (tests/gpu/issue4.py: the tiny pair vs no-spec and the reference loop, the TorchSpec layout,
#        Qwen3-8B shape with dummy weights; within ISSUE4_BUDGET_S, default 500 s from this script's start;
#        ISSUE4_DETERMINISTIC=1 serves the tiny pair with --enable-deterministic-inference, ISSUE4_TP=2 at
#        --tp-size 2 on the two-GPU machine: results issue4-*-tp2.json, part 3 skipped),
#        serving (tests/gpu/serving.py: DSPARK through the OpenAI API, request edge cases, aborts, prefix cache,
#        chunked prefill and a saturation phase on the tiny pair; within SERVING_BUDGET_S, default 500 s from this
#        script's start; SERVING_SATURATION_S (120), SERVING_DETERMINISTIC=1 adds
#        --enable-deterministic-inference and strict token identity; server logs in $SERVING_LOG_DIR
#        (/tmp/serving-logs), packed into $OUT/serving-logs.tar.gz),
#        issue6 (tests/gpu/issue6.py: confidence-scheduled vs full verification vs no speculation on the tiny pair,
#        goodput at concurrency 1/8/32/64, a weak drafter made by benchmark/tiny/weaken.py, greedy identity under
#        --enable-deterministic-inference, the calibration log through benchmark/analysis/calibration.py; within
#        ISSUE6_BUDGET_S, default 500 s from this script's start; ISSUE6_TOGETHER_ROUNDS (5) side-by-side rounds
#        and ISSUE6_ROUNDS_A (2) one-after-the-other rounds of part a, ISSUE6_ROUNDS (2) rounds of part b,
#        ISSUE6_SKIP_IDENTITY=1 skips the identity part, ISSUE6_WEAK_NOISE (2.0), ISSUE6_WEAK_CONF_SHIFT (-3.0, or
#        none); results $OUT/issue6.json and $OUT/issue6-calibration*; server logs in $ISSUE6_LOG_DIR
#        (/tmp/issue6-logs), packed into $OUT/issue6-logs.tar.gz),
#        ragged (tests/gpu/ragged.py: per-request verify lengths, experimental: outputs against no speculation,
#        use, goodput against one width per step; within RAGGED_BUDGET_S, default 500 s; RAGGED_ROUNDS (4)).
#        Each fits in one 10-minute device command.
# Writes $OUT/<test>.json (command, git commit, date, device, checks, raw numbers), $OUT/logs/*.log and
# $OUT/run.json; exits non-zero when a check fails. issue4 keeps its logs in $ISSUE4_LOG_DIR
# (/tmp/issue4-logs) and packs them into $OUT/issue4-logs.tar.gz (a device run returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/../.."
# The command as recorded in the results files, with the knobs it ran under (budgets, switches).
export DSPARK_GPU_COMMAND="$(env | grep -E '^(SERVING|ISSUE4|ISSUE6|RAGGED)_[A-Z0-9_]+=' | grep -v '_T0=' | sort | tr '\n' ' ')bash tests/gpu/run.sh $*"
export ISSUE4_T0=${ISSUE4_T0:-$(date +%s)}
WHICH=${1:-smoke}
shift $(( $# > 0 ? 1 : 0 ))
export OUT=${SGL_RUN_OUT:-${OUT:-$PWD/gpu-out}}
LOGS=$OUT/logs
if [ "$WHICH" = issue4 ]; then export ISSUE4_LOG_DIR=${ISSUE4_LOG_DIR:-/tmp/issue4-logs}; LOGS=$ISSUE4_LOG_DIR; fi
if [ "$WHICH" = issue6 ]; then export ISSUE6_LOG_DIR=${ISSUE6_LOG_DIR:-/tmp/issue6-logs}; LOGS=$ISSUE6_LOG_DIR; fi
mkdir -p "$OUT" "$LOGS"
log() { echo "[run.sh $(date +%H:%M:%S)] $*"; }
: "${SGLANG_SITE:?run this through .device/sgl-run.sh, which unpacks SGLang and sets SGLANG_SITE}"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1; lscpu > "$LOGS/lscpu.txt" 2>&1

log "patching SGLang in $SGLANG_SITE"
python3 -m sglang_dspark.patching apply --site "$SGLANG_SITE" > "$LOGS/patching.log" 2>&1 \
  && python3 -m sglang_dspark.patching check --site "$SGLANG_SITE" >> "$LOGS/patching.log" 2>&1 \
  || { cat "$LOGS/patching.log"; log "patch series does not apply"; exit 2; }
log "installing sglang_dspark (plugin entry point)"
if ! python3 -m pip install --no-deps --no-index --no-build-isolation -e . > "$LOGS/pip-install.log" 2>&1; then
  log "pip install -e failed (see $LOGS/pip-install.log); writing the entry point into \$SGLANG_SITE instead"
  python3 -m sglang_dspark.patching apply --site "$SGLANG_SITE" --entry-point >> "$LOGS/patching.log" 2>&1 || exit 2
fi
python3 -c "from importlib.metadata import entry_points as e; assert any(p.name == 'dspark' for p in e(group='sglang.srt.plugins'))" \
  || { log "the sglang.srt.plugins entry point 'dspark' is not visible"; exit 2; }

declare -A RC
run() { local name=$1; shift; log "start $name"; "$@"; RC[$name]=$?; log "end $name rc=${RC[$name]}"; }
case "$WHICH" in
  setup) ;;  # only the patching and install above (benchmark/perf.sh uses it)
  unit) run unit python3 tests/gpu/unit.py ;;
  smoke) run unit python3 tests/gpu/unit.py; run smoke python3 tests/gpu/smoke.py smoke ;;
  more) run more python3 tests/gpu/smoke.py more ;;
  issue4) run issue4 python3 tests/gpu/issue4.py ;;
  serving) export SERVING_T0=${SERVING_T0:-$ISSUE4_T0}; run serving python3 tests/gpu/serving.py ;;
  issue6) export ISSUE6_T0=${ISSUE6_T0:-$ISSUE4_T0}; run issue6 python3 tests/gpu/issue6.py ;;
  ragged) export RAGGED_T0=${RAGGED_T0:-$ISSUE4_T0}; run ragged python3 tests/gpu/ragged.py ;;
  *) log "unknown WHICH=$WHICH (setup|smoke|more|unit|issue4|serving|issue6|ragged)"; exit 2 ;;
esac

status=0
summary="{\"which\": \"$WHICH\", \"git_commit\": \"$GIT_COMMIT\", \"date\": \"$(date -u +%FT%TZ)\", \"rc\": {"
sep=""
for name in "${!RC[@]}"; do
  summary+="$sep\"$name\": ${RC[$name]}"; sep=", "
  [ "${RC[$name]}" -eq 0 ] || status=1
done
echo "$summary}}" > "$OUT/run.json"
log "done: $(cat "$OUT/run.json")"
exit $status
