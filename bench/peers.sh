# shellcheck shell=bash
# bench/peers.sh: the two peers the gateway is measured against, installed outside the work tree
# (sourced by run.sh after lib.sh and the knobs; defines functions only).
#
#   litellm  the LiteLLM proxy (Python): litellm[proxy]==LITELLM_VERSION in the venv LITELLM_VENV,
#            started from bench/litellm.yaml with one worker and no database (master key only)
#   portkey  the Portkey AI gateway (Node): @portkey-ai/gateway@PORTKEY_VERSION under PORTKEY_DIR,
#            started headless; it has no model list: every request names its provider and upstream
#            in headers (portkey_headers below)

PORTKEY_SERVER=$PORTKEY_DIR/node_modules/@portkey-ai/gateway/build/start-server.js

ensure_litellm() {
  if [[ -x "$LITELLM_VENV/bin/litellm" ]]; then
    local have
    have=$("$LITELLM_VENV/bin/python" -c 'from importlib.metadata import version; print(version("litellm"))' 2>/dev/null)
    [[ "$have" == "$LITELLM_VERSION" ]] || log "note: $LITELLM_VENV has LiteLLM ${have:-?}, not $LITELLM_VERSION (kept)"
    return 0
  fi
  log "installing litellm[proxy]==$LITELLM_VERSION into $LITELLM_VENV (a few minutes)"
  { python3 -m venv "$LITELLM_VENV" && "$LITELLM_VENV/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION"; } \
    >"$LOG_DIR/litellm-install.log" 2>&1
}

# The gateway's package asks for its web server (@hono/node-server) and hono by ranges; their newer
# releases give the fetch Response's immutable headers to the gateway, which then fails every stream
# ("TypeError: immutable" when it adds its own headers). The versions below are the ones in the
# gateway's own lock file for this release, which stream correctly.
PORTKEY_SERVER_PIN=1.13.5
PORTKEY_PINS='"@hono/node-server": "'$PORTKEY_SERVER_PIN'", "hono": "4.9.7"'

portkey_version() { # portkey_version [PACKAGE] -> the installed version of PACKAGE (the gateway's by default)
  node -p 'require(process.argv[1]).version' \
    "$PORTKEY_DIR/node_modules/${1:-@portkey-ai/gateway}/package.json" 2>/dev/null
}

ensure_portkey() {
  if [[ -f "$PORTKEY_SERVER" && "$(portkey_version)" == "$PORTKEY_VERSION" ]]; then
    [[ "$(portkey_version @hono/node-server)" == "$PORTKEY_SERVER_PIN" ]] && return 0
    log "$PORTKEY_DIR has @hono/node-server $(portkey_version @hono/node-server), whose streams fail: reinstalling"
  fi
  if ! command -v npm >/dev/null 2>&1; then
    log "npm not found: installing Node.js with apt-get"
    apt_install nodejs npm || return 1
  fi
  log "installing @portkey-ai/gateway@$PORTKEY_VERSION into $PORTKEY_DIR"
  mkdir -p "$PORTKEY_DIR"
  printf '{"name": "dwctl-bench-portkey", "private": true,\n "dependencies": {"@portkey-ai/gateway": "%s"},\n "overrides": {%s}}\n' \
    "$PORTKEY_VERSION" "$PORTKEY_PINS" >"$PORTKEY_DIR/package.json"
  (cd "$PORTKEY_DIR" && npm install --no-audit --no-fund) >"$LOG_DIR/portkey-install.log" 2>&1 &&
    [[ -f "$PORTKEY_SERVER" ]]
}

# want_peer NAME SWITCH INSTALLER: keeps NAME in TARGETS when SWITCH is not 0 and it is (or can be)
# installed; drops it with a line saying why otherwise.
want_peer() {
  local name=$1 switch=$2 installer=$3
  has_target "$name" || return 0
  if [[ "$switch" == 0 ]]; then
    drop_target "$name"
  elif ! "$installer"; then
    log "WARNING: $name could not be installed (see $LOG_DIR/$name-install.log): skipping it"
    record kind=error target="$name" what=install log="logs/$name-install.log"
    drop_target "$name"
  fi
}

# portkey_headers UPSTREAM_BASE -> the routing headers of one request (wrk/post.lua's HEADERS form):
# the provider whose API the upstream speaks, and where that upstream is.
portkey_headers() {
  printf 'x-portkey-provider: openai;x-portkey-custom-host: %s' "$1"
}

# litellm_start LOGFILE / portkey_start LOGFILE: one process each, pinned like the gateway; set BG_PID.
litellm_start() {
  pin_to "$GATEWAY_CPUS"
  start_bg "$1" env BENCH_MOCK_BASE="$MOCK_BASE" BENCH_SLOW_MOCK_BASE="$SLOW_BASE" \
    BENCH_LITELLM_KEY="$LITELLM_KEY" LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
    "${PIN[@]}" "$LITELLM_VENV/bin/litellm" --config "$BENCH_DIR/litellm.yaml" \
    --host 127.0.0.1 --port "$LITELLM_PORT" --num_workers 1
}

portkey_start() {
  # NODE_ENV=production and --headless: no web console and no log stream to it, as in a deployment.
  pin_to "$GATEWAY_CPUS"
  start_bg "$1" env NODE_ENV=production "${PIN[@]}" node "$PORTKEY_SERVER" --port="$PORTKEY_PORT" --headless
}
