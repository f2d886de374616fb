#!/usr/bin/env bash
# The CPU test command (README.md, "Run the tests"):
#   1. the reference, loader and kernel-spec tests on this Python (torch CPU build, no SGLang import);
#   2. the patched-SGLang tests (patch series, plugin, server arguments) in the venv that
#      tests/cpu/sglang/setup_env.sh builds (default .venv-sgl in the repo; SGLANG_VENV overrides).
# Exit status is non-zero if either suite fails; pytest's "no tests collected" (5) is a failure too.
set -euo pipefail
cd "$(dirname "$0")/.."
SGLANG_VENV=${SGLANG_VENV:-$PWD/.venv-sgl}

python3 -m pytest tests/cpu -m "not sglang" -q -p no:cacheprovider "$@"
bash tests/cpu/sglang/setup_env.sh "$SGLANG_VENV"
"$SGLANG_VENV/bin/python" -m pytest tests/cpu/sglang -m sglang -q -p no:cacheprovider "$@"
