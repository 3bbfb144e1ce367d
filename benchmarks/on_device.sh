#!/usr/bin/env bash
# Run a command from a checkout that is not pip-installed (the GPU machine has no network): the package is
# assembled under /tmp/ksleep-src the way pyproject.toml maps it, and missing test tools come from
# _carry/wheels when that folder was carried along.
#   bash benchmarks/on_device.sh python benchmarks/worker_core.py --json "$OUT/worker_core.json"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=/tmp/ksleep-src
rm -rf "$src" && mkdir -p "$src/ksleep"
for pkg in worker supervisor client; do
  if [ -d "$root/$pkg" ]; then ln -s "$root/$pkg" "$src/ksleep/$pkg"; fi
done
ln -s "$root/proto/ksleep/v1" "$src/ksleep/v1"
export PYTHONPATH="$src:$root${PYTHONPATH:+:$PYTHONPATH}"
# Install, from carried wheels, what the image lacks (pure-Python packages only).
if [ -d "$root/_carry/wheels" ]; then
  for pair in pytest:pytest pytest_timeout:pytest-timeout pluggy:pluggy iniconfig:iniconfig grpc_health:grpcio-health-checking \
              grpc_reflection:grpcio-reflection prometheus_client:prometheus-client rich:rich markdown_it:markdown-it-py \
              mdurl:mdurl pygments:pygments hypothesis:hypothesis attr:attrs sortedcontainers:sortedcontainers; do
    python3 -c "import ${pair%%:*}" 2>/dev/null || \
      python3 -m pip install -q --no-deps --no-index --find-links "$root/_carry/wheels" "${pair##*:}" >/dev/null
  done
fi
exec "$@"
