#!/usr/bin/env bash
# Start the gateway (ASGI) and one flex worker together; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
URL="http://$HOST:$PORT"
# What `ensure_admin` said (make run): shown in the box below, kept out of the servers' environments.
admin_note=${ADMIN_NOTE:-}
unset ADMIN_NOTE

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

# The first minute: once the gateway answers, where to log in, with what, and what to do next.
welcome() {
  local user=admin password="as set before" line width=0
  [[ $admin_note =~ \'([^\']+)\' ]] && user=${BASH_REMATCH[1]}
  case "$admin_note" in
    *"with password: "*) password="${admin_note##*with password: }  (shown this once)" ;;
    *ADMIN_PASSWORD*) password="the one in ADMIN_PASSWORD" ;;
  esac
  local lines=(
    "dwctl is running (Ctrl-C stops it)"
    ""
    "Admin:     $URL/admin/"
    "User:      $user"
    "Password:  $password"
    "Forgot it: .venv/bin/python manage.py changepassword $user"
    "API:       $URL/ai/v1"
    ""
    "Next: a first request, on a demo model the gateway serves itself:"
    "  .venv/bin/python manage.py demo --url $URL"
  )
  for line in "${lines[@]}"; do if ((${#line} > width)); then width=${#line}; fi; done
  local rule
  rule=$(printf '%*s' $((width + 2)) '' | sed 's/ /─/g')
  printf '┌%s┐\n' "$rule"
  for line in "${lines[@]}"; do printf '│ %-*s │\n' "$width" "$line"; done
  printf '└%s┘\n' "$rule"
}
for _ in $(seq 1 150); do
  if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
    welcome
    break
  fi
  sleep 0.2
done
wait -n
