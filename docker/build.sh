#!/usr/bin/env bash
# Builds the patched SGLang wheel for the base image's Python, the sglang-dspark wheel, then the image.
#   bash docker/build.sh [IMAGE_TAG]                      (default tag: sglang-dspark:0.5.15-cu130)
# Environment (all optional):
#   BASE_IMAGE      base image (default lmsysorg/sglang:v0.5.15-cu130; see docker/Dockerfile for the tag's source)
#   IMAGE_PYTHON    the base image's Python as X.Y, IMAGE_ARCH its machine (x86_64 | aarch64); when either is
#                   unset both are read by running python3 in the base image (this pulls it)
#   SGLANG_WHEEL    an official sglang 0.5.15 wheel for that Python to start from, instead of pip download
#   BUILD_NUMBER    N of 0.5.15+dspark.N (default: python/build_wheel.py's, the number of patches)
#   OUT             where the patched wheel is kept (default: dist/ in the repo)
#   PYTHON          the host Python that runs the builders (default python3; needs pip)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
TAG=${1:-sglang-dspark:0.5.15-cu130}
BASE_IMAGE=${BASE_IMAGE:-lmsysorg/sglang:v0.5.15-cu130}
OUT=${OUT:-$REPO/dist}
PY=${PYTHON:-python3}

if [ -n "${SGLANG_WHEEL:-}" ]; then
    WHEEL_ARGS=(--wheel "$SGLANG_WHEEL")
else
    if [ -z "${IMAGE_PYTHON:-}" ] || [ -z "${IMAGE_ARCH:-}" ]; then
        IMAGE_INFO=$(docker run --rm --entrypoint python3 "$BASE_IMAGE" -c \
            'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine())')
        read -r IMAGE_PYTHON IMAGE_ARCH <<< "$IMAGE_INFO"
    fi
    echo "base image $BASE_IMAGE: Python $IMAGE_PYTHON on $IMAGE_ARCH" >&2
    # The official 0.5.15 wheels are tagged manylinux_2_34; pip also accepts older manylinux tags for it.
    WHEEL_ARGS=(--download --python-version "$IMAGE_PYTHON" --platform "manylinux_2_34_$IMAGE_ARCH")
fi
BUILD_ARGS=()
[ -z "${BUILD_NUMBER:-}" ] || BUILD_ARGS=(--build "$BUILD_NUMBER")

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
CONTEXT=$WORK/context
mkdir -p "$CONTEXT/wheels" "$CONTEXT/patches" "$WORK/src"

SGLANG_DSPARK_WHEEL=$("$PY" "$REPO/python/build_wheel.py" "${WHEEL_ARGS[@]}" "${BUILD_ARGS[@]}" --out "$OUT")
cp "$SGLANG_DSPARK_WHEEL" "$CONTEXT/wheels/"
# The plugin is built from a copy, so that setuptools' build/ and egg-info stay out of the checkout.
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/sglang_dspark" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$CONTEXT/wheels" "$WORK/src"
cp -r "$REPO/patches/sglang-0.5.15" "$CONTEXT/patches/"
ls -l "$CONTEXT/wheels" >&2

docker build -f "$REPO/docker/Dockerfile" --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$TAG" "$CONTEXT"
echo "built image $TAG (sglang wheel: $SGLANG_DSPARK_WHEEL)"
