#!/usr/bin/env bash
# The CPU test command (README.md "Run the tests"). Exit status is pytest's; "no tests collected" is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest tests/cpu -m "not sglang" -q -p no:cacheprovider "$@"
