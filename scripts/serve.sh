#!/usr/bin/env bash
# Serve the model on http://127.0.0.1:8000: scripts/serve.sh [--port N] [more `serve run` options]
# (KALM_MODEL=hub id or local dir overrides the model). Prints one line once the service answers.
source "$(dirname "$0")/env.sh"
python -m serve_app.core.checkpoint   # fails fast, with what to do, when the model cannot be found
# Serve's proxies bound request ids, time out unfinished headers and answer in OpenAI's error shape (docs/limits.md)
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="${RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH:-serve_app.serve.proxy_fences:middlewares}"
# Serve's controller loop (10/s) and its metrics export (10/s per replica and proxy) slowed: on a
# 2-core host Ray's idle work took a tenth of the CPU from the model (docs/operations.md).
export RAY_SERVE_CONTROL_LOOP_INTERVAL_S="${RAY_SERVE_CONTROL_LOOP_INTERVAL_S:-0.5}"
export RAY_SERVE_METRICS_EXPORT_INTERVAL_MS="${RAY_SERVE_METRICS_EXPORT_INTERVAL_MS:-1000}"
# Ray's token auth explicitly (Ray's default for a new local Ray today, not a promise), with a private token file.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ -z "${RAY_ADDRESS:-}" ]; then
  # The Ray that `serve run` starts here is this machine's alone: its node address is 127.0.0.1, so
  # its GCS, raylet, dashboard and metrics listen on loopback only (Ray's switch for single-machine
  # Ray on macOS/Windows; docs/operations.md lists what stays on all interfaces).
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}"
  if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    # the token Ray would write itself (`ray get-auth-token --generate`), but never readable by others
    [ -s "$token_file" ] || (umask 077 && mkdir -p "$(dirname "$token_file")" &&
      python -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' > "$token_file")
    chmod 600 "$token_file"
  fi
fi
config=cluster/config.yaml
tmp_config_dir=
if [ "${1:-}" = "--port" ]; then
  # `serve run` takes the port from the config file only: serve a copy with http_options.port changed
  # (removed by the ready line's watcher once serve run has read it, or when serve run ends).
  tmp_config_dir="$(mktemp -d)"
  config="$tmp_config_dir/config.yaml"
  python -c 'import sys, yaml
c = yaml.safe_load(open("cluster/config.yaml"))
c["http_options"]["port"] = int(sys.argv[1])
yaml.safe_dump(c, open(sys.argv[2], "w"), sort_keys=False)' "$2" "$config"
  shift 2
fi
python -m serve_app.serve.ready_line "$config" --check-port || { [ -n "$tmp_config_dir" ] && rm -rf "$tmp_config_dir"; exit 1; }
# `exec` keeps this pid for serve run (Ctrl-C reaches it as before); the watcher polls it until ready.
python -m serve_app.serve.ready_line "$config" --while-pid $$ ${tmp_config_dir:+--remove "$tmp_config_dir"} &
exec serve run "$config" "$@"
