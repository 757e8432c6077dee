#!/usr/bin/env bash
# Serve the model on http://127.0.0.1:8000 (KALM_MODEL=hub id or local dir overrides the model).
source "$(dirname "$0")/env.sh"
exec serve run cluster/config.yaml "$@"
