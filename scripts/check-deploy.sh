#!/usr/bin/env bash
# Check the shipped deployment files (make test runs this):
#   haproxy -c               deploy/haproxy/haproxy.cfg (with and without PROXY protocol)
#   kubernetes-validate      deploy/kubernetes/*.yaml, strict, against the bundled schemas (offline)
#   systemd-analyze verify   deploy/systemd/meterhub@.service (skipped, with a message, when the
#                            binary is absent); its ExecStart path is pointed at this checkout's
#                            meterhub for the check, since /opt/meterhub does not exist here
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
k8s_version="${K8S_VERSION:-1.30.0}"

haproxy_bin="$(command -v haproxy || echo /usr/sbin/haproxy)"
for pp in true false; do
  MH_PROXY_PROTOCOL=$pp "$haproxy_bin" -c -q -f deploy/haproxy/haproxy.cfg
done
echo "haproxy -c: deploy/haproxy/haproxy.cfg is valid"

"$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s_version" deploy/kubernetes/*.yaml
echo "kubernetes-validate $k8s_version (strict): deploy/kubernetes/*.yaml valid"

if command -v systemd-analyze >/dev/null 2>&1; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  sed "s|^ExecStart=/opt/meterhub/bin/meterhub|ExecStart=$PWD/$venv/bin/meterhub|" \
    deploy/systemd/meterhub@.service >"$tmp/meterhub@.service"
  out="$(systemd-analyze verify "$tmp/meterhub@.service" 2>&1)" || { echo "$out" >&2; exit 1; }
  # unknown keys are only warnings for systemd-analyze: any output is a failure here
  if [ -n "$out" ]; then echo "$out" >&2; exit 1; fi
  echo "systemd-analyze verify: deploy/systemd/meterhub@.service is valid"
else
  echo "systemd-analyze not found: deploy/systemd/meterhub@.service was NOT verified"
fi
