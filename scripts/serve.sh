#!/usr/bin/env bash
# Serve the model on http://127.0.0.1:8000 (KALM_MODEL=hub id or local dir overrides the model).
source "$(dirname "$0")/env.sh"
python -m serve_app.core.checkpoint   # fails fast, with what to do, when the model cannot be found
exec serve run cluster/config.yaml "$@"
