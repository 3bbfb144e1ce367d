#!/usr/bin/env bash
# Run a command from a checkout that is not pip-installed (the GPU machine has no network): the package is
# assembled under /tmp/ksleep-src the way pyproject.toml maps it, and missing packages come from
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
# What the image lacks (FastAPI, uvicorn, pydantic, the gRPC health and reflection services, openai) comes from
# the wheels carried in _carry/wheels, unpacked into a folder of their own ahead of the image's packages.
if compgen -G "$root/_carry/wheels/*.whl" >/dev/null; then
  site=/tmp/ksleep-site-$(ls "$root/_carry/wheels" | md5sum | cut -c1-8)  # unpacked once per set of wheels
  [ -d "$site" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$root"/_carry/wheels/*.whl
  export PYTHONPATH="$site:$PYTHONPATH"
fi
exec "$@"
