#!/usr/bin/env bash
# Run every benchmark in --smoke mode (small numbers, bounded in time, loopback only) and fail if any
# of them exits non-zero. For CI or a quick check after changing meterhub, the SDK or the simulator;
# not a performance figure (docs/benchmarks.md and docs/benchmarks-fleet.md have the real runs).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
timeout 600 "$py" bench/transport.py --smoke
timeout 300 "$py" bench/pipeline.py --smoke
timeout 600 "$py" bench/fleet.py --smoke
timeout 600 "$py" bench/fanout.py --smoke
timeout 300 "$py" bench/backpressure.py --smoke
timeout 120 "$py" bench/login_flood.py --smoke
timeout 120 "$py" bench/burst.py --smoke
timeout 180 "$py" bench/cluster.py --smoke
timeout 300 "$py" bench/compare.py --smoke --storm 50
timeout 120 "$py" bench/writer_cost.py --smoke
timeout 120 "$py" bench/storage.py --smoke
echo "bench smoke: all scripts exited 0"
