#!/usr/bin/env bash
# System packages the tests use: mosquitto clients (real MQTT clients), the mosquitto broker (the Home
# Assistant tests start their own), Chromium (dashboard tests), nats-server (cluster tests) and haproxy
# (deploy checks and cluster tests behind a balancer).
# Installs with apt-get when something is missing; prints what to do when it cannot.
set -euo pipefail
need=()
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# nats-server: the cluster tests start their own bus (tests/test_cluster*.py).
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
# haproxy: scripts/check-deploy.sh checks deploy/haproxy/haproxy.cfg; tests/test_deploy.py runs it, and
# tests/test_cluster_haproxy.py starts its own balancer (PROXY protocol v2 to the nodes).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages: ${need[*]} (install them with your package manager)" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
