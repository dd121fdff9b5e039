#!/usr/bin/env bash
# Create bench/.venv-amqtt: amqtt 0.12.1 (+ uvloop) in its own virtualenv, apart from meterhub's
# dependencies. Git-ignored; never commit it. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-amqtt"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q 'amqtt==0.12.1' 'uvloop>=0.19'
"$venv/bin/python" -c 'import amqtt, uvloop; print("amqtt", amqtt.__version__, "ready in", "'"$venv"'")'
