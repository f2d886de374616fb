#!/usr/bin/env bash
# Builds the CPU environment in which SGLang 0.5.15 imports, for the tests marked `sglang`.
#   bash tests/cpu/sglang/setup_env.sh [VENV_DIR]      (default: .venv-sgl in the repo)
# A clean venv (no system site-packages): SGLang needs torch 2.14.1 + torchvision 0.29.1 (a CUDA build that
# imports on CPU), its own transformers pin, and the patch series applied to its site-packages. The system
# Python (torch 2.13 CPU, used by the reference tests) is not touched.
# Idempotent: re-running reuses the venv, skips installed packages and re-checks the patch series.
set -euo pipefail
VENV=${1:-$(cd "$(dirname "$0")/../../.." && pwd)/.venv-sgl}
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
SGLANG_VERSION=0.5.15

[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --no-warn-conflicts)  # sglang's GPU pins are knowingly unmet

"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
# sglang's own pins (torch==2.11.0, sglang-kernel, flashinfer, ...) are GPU-only: install it alone. The wheel
# is kept in the venv (the patch-series tests read pristine files from it) and reinstalled on every run, so the
# current series is applied to pristine files even when the venv was patched by an older series.
WHEELS="$VENV/share/sglang-dspark"
mkdir -p "$WHEELS"
ls "$WHEELS"/sglang-"$SGLANG_VERSION"-*.whl >/dev/null 2>&1 \
    || "$PY" -m pip download --quiet --no-deps "sglang==$SGLANG_VERSION" -d "$WHEELS"
"${PIP[@]}" --no-deps --force-reinstall "$WHEELS"/sglang-"$SGLANG_VERSION"-*.whl
# What `import sglang.launch_server` and the scheduler/model-runner modules need on CPU
# (see shared/reference/sglang-on-cpu.md); transformers must stay at SGLang's pin.
"${PIP[@]}" transformers==5.12.1 "tokenizers<=0.23.0" orjson pybase64 starlette ipython pyzmq uvicorn fastapi \
    setproctitle datasets openai partial-json-parser msgspec compressed-tensors gguf jsonschema soundfile \
    python-multipart zstandard safetensors aiohttp requests tqdm psutil prometheus-client pillow einops \
    scipy sentencepiece tiktoken uvloop pyyaml jinja2 huggingface-hub numba \
    distro loguru opentelemetry-api pytest numpy
# The plugin package itself: editable, no deps (its torch/numpy pins are already satisfied above).
"${PIP[@]}" --no-deps -e "$REPO"

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -m sglang_dspark.patching apply --site "$SITE"
"$PY" -m sglang_dspark.patching check --site "$SITE"
echo "SGLang CPU env ready: $VENV (run: $VENV/bin/python -m pytest -m sglang tests/cpu/sglang)"
