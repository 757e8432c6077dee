#!/usr/bin/env bash
# Start a private single-node Ray + the service on MODEL, run `python -m loadtest.benchmark` against it
# side by side with the in-process core, then stop everything it started.
#   loadtest/serve_and_benchmark.sh MODEL_DIR OUT.json [benchmark args...]
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(realpath "$1"); out=$2; shift 2
port=${PORT:-8000}; metrics_port=${METRICS_PORT:-8080}
tmp=$(mktemp -d /tmp/rbXXXX)
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python -c "import secrets; print(secrets.token_hex(16))")}
cleanup() {
  # only the cluster started here: without its address `serve shutdown` would find any other local one
  if [ -f "$tmp/ray_current_cluster" ]; then
    RAY_ADDRESS=$(cat "$tmp/ray_current_cluster") serve shutdown -y >/dev/null 2>&1 || true
  fi
  pkill -f "$tmp" || true; sleep 2; pkill -9 -f "$tmp" || true
  rm -rf "$tmp"
}
trap cleanup EXIT
KALM_MODEL=$model ray start --head --num-cpus="${NUM_CPUS:-$(nproc)}" --include-dashboard=false --disable-usage-stats \
  --metrics-export-port="$metrics_port" --temp-dir="$tmp" >/dev/null
export RAY_ADDRESS=$(cat "$tmp/ray_current_cluster")
sed "s/port: 8000/port: $port/" cluster/config.yaml > "$tmp/config.yaml"
serve run --non-blocking "$tmp/config.yaml" > "$tmp/serve.log" 2>&1
for _ in $(seq 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && break
  sleep 1
done
python -m loadtest.benchmark --model "$model" --url "http://127.0.0.1:$port" \
  --ray-address "$RAY_ADDRESS" --json "$out" "$@"
