#!/usr/bin/env bash
# Start the gateway (ASGI) and one flex worker together; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}

# With metrics on, every process (the gateway, the qcluster and its workers) keeps its series in
# a file of this directory and a scrape adds them up (gateway/metrics.py); emptied at each start,
# as prometheus_client requires.
metrics=${GATEWAY_METRICS:-}
case "${metrics,,}" in
  1|true|yes|on)
    export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-$PWD/.metrics}
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db
    ;;
esac

pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop INT TERM EXIT

$PY manage.py qcluster &
pids+=($!)
# uvicorn with the gateway's protocol and defaults, and the open-file limit raised (dwctl_site/server.py).
$PY -m dwctl_site.server --host "$HOST" --port "$PORT" &
pids+=($!)
echo "Gateway on http://$HOST:$PORT/ai/v1 — admin on http://$HOST:$PORT/admin/ (Ctrl-C stops)"
wait -n
