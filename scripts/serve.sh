#!/usr/bin/env bash
# Serve the model on http://127.0.0.1:8000 (KALM_MODEL=hub id or local dir overrides the model).
source "$(dirname "$0")/env.sh"
python -m serve_app.core.checkpoint   # fails fast, with what to do, when the model cannot be found
# Serve's proxies bound request ids and answer in OpenAI's error shape (docs/limits.md)
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="${RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH:-serve_app.serve.proxy_fences:middlewares}"
exec serve run cluster/config.yaml "$@"
