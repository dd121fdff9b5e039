#!/usr/bin/env bash
# Run every benchmark in --smoke mode (small numbers, bounded in time, loopback only) and fail if any
# of them exits non-zero. For CI or a quick check after changing meterhub; not a performance figure.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
timeout 600 "$py" bench/transport.py --smoke
timeout 300 "$py" bench/pipeline.py --smoke
echo "bench smoke: all scripts exited 0"
