#!/usr/bin/env bash
# Serve the model on http://127.0.0.1:8000: scripts/serve.sh [--port N] [more `serve run` options]
# (KALM_MODEL=hub id or local dir overrides the model).
source "$(dirname "$0")/env.sh"
python -m serve_app.core.checkpoint   # fails fast, with what to do, when the model cannot be found
# Serve's proxies bound request ids and answer in OpenAI's error shape (docs/limits.md)
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="${RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH:-serve_app.serve.proxy_fences:middlewares}"
# Serve's controller loop (10/s) and its metrics export (10/s per replica and proxy) slowed: on a
# 2-core host Ray's idle work took a tenth of the CPU from the model (docs/operations.md).
export RAY_SERVE_CONTROL_LOOP_INTERVAL_S="${RAY_SERVE_CONTROL_LOOP_INTERVAL_S:-0.5}"
export RAY_SERVE_METRICS_EXPORT_INTERVAL_MS="${RAY_SERVE_METRICS_EXPORT_INTERVAL_MS:-1000}"
config=cluster/config.yaml
if [ "${1:-}" = "--port" ]; then
  # `serve run` takes the port from the config file only: serve a copy with http_options.port changed.
  config="$(mktemp -d)/config.yaml"
  python -c 'import sys, yaml
c = yaml.safe_load(open("cluster/config.yaml"))
c["http_options"]["port"] = int(sys.argv[1])
yaml.safe_dump(c, open(sys.argv[2], "w"), sort_keys=False)' "$2" "$config"
  shift 2
fi
exec serve run "$config" "$@"
