#!/usr/bin/env bash
# The performance benchmark on the GPU machine (issue #5), one engine per device command:
#   SGL_RUN_OUT=$OUT bash .device/sgl-run.sh -- bash benchmark/perf.sh ours [PERF ARGS...]
#   SGL_RUN_OUT=$OUT bash .device17/sgl-run.sh --kit 0.5.17 -- bash benchmark/perf.sh sglang-0.5.17 [PERF ARGS...]
# "ours" patches the 0.5.15 kit and installs the plugin first (tests/gpu/run.sh setup); SGLang 0.5.17 runs as
# shipped. Writes $OUT/perf-<engine>.json and $OUT/perf-<engine>-logs.tar.gz (benchmark/perf.py says what
# is measured). Pass GIT_COMMIT=<sha> from the caller: the device copy of the tree has no git.
set -uo pipefail
cd "$(dirname "$0")/.."
export PERF_T0=$(date +%s)
ENGINE=${1:?usage: perf.sh ours|sglang-0.5.17 [ARGS...]}; shift
export OUT=${SGL_RUN_OUT:-${OUT:-$PWD/gpu-out}}
export DSPARK_GPU_COMMAND="bash benchmark/perf.sh $ENGINE $*"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
if [ "$ENGINE" = ours ]; then
  SGL_RUN_OUT= OUT=/tmp/perf-setup bash tests/gpu/run.sh setup > /tmp/perf-setup.log 2>&1 || { cat /tmp/perf-setup.log; exit 2; }
fi
python3 benchmark/perf.py --engine "$ENGINE" "$@"
