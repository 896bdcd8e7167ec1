# shellcheck shell=bash
# bench/lib.sh: helpers for bench/run.sh (sourced, not run).
#
# Process rule: every server is started with setsid, so it leads its own process group,
# and it is stopped through that group by the PID recorded at start. Nothing is ever
# stopped by name. stop_all runs from the EXIT trap of run.sh.

STARTED_PIDS=()

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# has_target NAME / drop_target NAME: membership in, and removal from, the list TARGETS.
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
drop_target() {
  local t out=""
  for t in $TARGETS; do [[ "$t" != "$1" ]] && out+="$t "; done
  TARGETS=${out% }
}

# record KEY=VALUE... [JSON_OBJECT]: append one JSON line to $RESULTS. Values that look like
# numbers are written as numbers; the optional last argument (a JSON object from wrk) is merged in.
record() {
  python3 - "$RESULTS" "$@" <<'PYEOF'
import json, sys
path, args = sys.argv[1], sys.argv[2:]
rec = {}
for a in args:
    if a.startswith("{"):
        rec.update(json.loads(a))
        continue
    k, _, v = a.partition("=")
    try:
        rec[k] = int(v)
    except ValueError:
        try:
            rec[k] = float(v)
        except ValueError:
            rec[k] = v
with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")
PYEOF
}

# pin_to CPUS -> sets the array PIN to (taskset -c CPUS), or to () when CPUS is empty or
# taskset is missing. Use it as: pin_to 1; "${PIN[@]}" command args...
pin_to() {
  # shellcheck disable=SC2034  # read by the caller
  PIN=()
  if [[ -n "${1:-}" ]] && command -v taskset >/dev/null 2>&1; then
    # shellcheck disable=SC2034
    PIN=(taskset -c "$1")
  fi
}

# port_in_use PORT -> status 0 when something accepts connections on 127.0.0.1:PORT.
port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# free_port BASE -> prints the first free port in BASE..BASE+49.
free_port() {
  local p
  for ((p = $1; p < $1 + 50; p++)); do
    if ! port_in_use "$p"; then
      printf '%s' "$p"
      return 0
    fi
  done
  die "no free port in $1..$(($1 + 49))"
}

# start_bg LOGFILE CMD... -> runs CMD in its own session/process group and sets BG_PID.
# (Call it directly, not inside $(...), so the PID is recorded in this shell.)
# The PID is the group id too, because setsid makes the process the group leader
# (a background child of a non-interactive shell is never a group leader already,
# so setsid does not fork and $! is the server itself).
start_bg() {
  local logfile=$1
  shift
  setsid "$@" >"$logfile" 2>&1 </dev/null &
  BG_PID=$!
  STARTED_PIDS+=("$BG_PID")
}

# stop_pid PID: TERM to its process group, wait up to 10 s, then KILL.
stop_pid() {
  local pid=$1 i
  [[ -z "$pid" ]] && return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  local kept=() p
  for p in "${STARTED_PIDS[@]}"; do
    [[ "$p" != "$pid" ]] && kept+=("$p")
  done
  STARTED_PIDS=("${kept[@]}")
}

stop_all() {
  local p
  for p in "${STARTED_PIDS[@]}"; do
    stop_pid "$p"
  done
}

# wait_http URL TIMEOUT_S PID [AUTH_KEY] -> waits for a 200 from GET URL. Fails early
# when PID has exited.
wait_http() {
  local url=$1 timeout=$2 pid=$3 key=${4:-} code deadline
  deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "process $pid exited while waiting for $url"
      return 1
    fi
    if [[ -n "$key" ]]; then
      code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 -H "Authorization: Bearer $key" "$url" || true)
    else
      code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 "$url" || true)
    fi
    [[ "$code" == 200 ]] && return 0
    sleep 0.2
  done
  log "timed out after ${timeout}s waiting for 200 from $url (last status ${code:-none})"
  return 1
}

# rss_kb PID -> VmRSS in kB (empty when the process is gone).
rss_kb() {
  awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true
}

# RSS sampler: a background loop of our own that appends "epoch_s rss_kb" every
# RSS_INTERVAL seconds while PID lives. Sets SAMPLER_PID; stopped by that PID.
start_rss_sampler() {
  local pid=$1 out=$2
  (
    while kill -0 "$pid" 2>/dev/null; do
      r=$(rss_kb "$pid")
      [[ -n "$r" ]] && printf '%s %s\n' "$(date +%s)" "$r"
      sleep "${RSS_INTERVAL:-0.5}"
    done
  ) >>"$out" 2>/dev/null &
  # shellcheck disable=SC2034  # read by run.sh
  SAMPLER_PID=$!
}

stop_rss_sampler() {
  local spid=$1
  [[ -z "$spid" ]] && return 0
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
}

# max_rss_kb FILE -> the largest sample in FILE (0 when empty).
max_rss_kb() {
  awk 'BEGIN {m = 0} $2 > m {m = $2} END {print m}' "$1" 2>/dev/null || echo 0
}

# apt_install PACKAGE...: Debian packages, as root or through sudo.
apt_install() {
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null
}

# ensure_wrk: install wrk from Debian's packages when it is missing.
ensure_wrk() {
  command -v wrk >/dev/null 2>&1 && return 0
  log "wrk not found: installing it with apt-get"
  apt_install wrk
  command -v wrk >/dev/null 2>&1 || die "could not install wrk"
}
