#!/usr/bin/env bash
# bench/run.sh: the benchmark suite (`make bench`). See bench/README.md.
#
# One run measures, side by side and against the same mock upstream:
#   direct         the mock upstream itself (the baseline of every round)
#   gateway        our gateway, one uvicorn process, embedded SQLite, no Redis, paid models
#   gateway-redis  the same with Redis (REDIS_URL) on the shared database (scratch PostgreSQL)
#   gateway-2proc  two such processes, one per core, sharing Redis and that database
#   gateway-scale  the plain gateway with SCALE_KEYS keys and SCALE_MODELS models in its DB
#   gateway-httpx  (not default) the gateway with httpx's API on the httpx-aiohttp transport
#   gateway-aiohttp (not default) the gateway with aiohttp's client instead of its own
#   gateway-daphne (not default) the gateway served by daphne instead of uvicorn
#   litellm        the LiteLLM proxy (Python), the first peer
#   portkey        the Portkey AI gateway (Node), the second peer
# For each target and round: JSON and `stream: true` chat completions at 1 connection
# (latency) and TPUT_CONNS connections (throughput), then SLOW_CONNS connections against an
# upstream that waits SLOW_DELAY_MS, and the process RSS sampled under load.
set -euo pipefail
# The whole script is one { ... } block, so bash reads all of it before running: editing this file
# while a run is going on cannot change what that run does.
{

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
cd "$ROOT"
# shellcheck source=lib.sh
source "$BENCH_DIR/lib.sh"

# ------------------------------------------------------------------ knobs
if [[ "${QUICK:-0}" == 1 ]]; then # a check that every target starts and gives numbers, not a measurement
  : "${DURATION:=3s}" "${WARMUP:=1s}" "${ROUNDS:=1}" "${SLOW_DURATION:=3s}" "${FLEX:=0}"
  : "${SCALE_KEYS:=500}" "${SCALE_MODELS:=50}" "${SCALE_USERS:=10}"
fi
DURATION=${DURATION:-10s}          # each measured wrk run
WARMUP=${WARMUP:-2s}               # warm-up before each mode (kept in results.jsonl, not in the tables)
ROUNDS=${ROUNDS:-2}                # every target is measured (and restarted) once per round
TARGETS=${TARGETS:-"direct gateway gateway-redis gateway-2proc gateway-scale litellm portkey"}
MODES=${MODES:-"json stream"}      # json = non-stream chat completion, stream = SSE
LAT_CONNS=${LAT_CONNS:-1}
TPUT_CONNS=${TPUT_CONNS:-32}
SLOW=${SLOW:-1}                    # 0 skips the slow-upstream measurement
SLOW_DELAY_MS=${SLOW_DELAY_MS:-100}
SLOW_CONNS=${SLOW_CONNS:-100}
SLOW_DURATION=${SLOW_DURATION:-$DURATION}
SCALE_KEYS=${SCALE_KEYS:-10000}
SCALE_MODELS=${SCALE_MODELS:-1000}
SCALE_USERS=${SCALE_USERS:-100}
GATEWAY_CPUS=${GATEWAY_CPUS-1}     # one-process servers (gateway, peers); empty = not pinned
LOAD_CPUS=${LOAD_CPUS-0}           # mock upstreams and wrk
TWO_PROC_CPUS=${TWO_PROC_CPUS-"0 1"}       # gateway-2proc: one CPU list per process
TWO_PROC_LOAD_CPUS=${TWO_PROC_LOAD_CPUS-"0,1"}  # gateway-2proc: wrk and the mock upstreams
PAIRS=${PAIRS:-3}                  # gateway-2proc: one process alone, then both, alternated this many times
PAIR_DURATION=${PAIR_DURATION:-5s}
WRK_TIMEOUT=${WRK_TIMEOUT:-10s}
READY_TIMEOUT=${READY_TIMEOUT:-120}
GATEWAY_LIFESPAN=${GATEWAY_LIFESPAN:-off}  # uvicorn --lifespan for the gateway
INPUT_PRICE=${INPUT_PRICE:-0.50}   # tariff of the bench models, credits per 1M tokens
OUTPUT_PRICE=${OUTPUT_PRICE:-1.50}
LIMITS=${LIMITS:-1}                # 1: rate, token and spend limits on the bench key and models, never reached
BENCH_REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/0}
SHARED_DB_ENGINE=${SHARED_DB_ENGINE:-postgres}  # postgres | sqlite: the database of the Redis targets
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
BENCH_LITELLM=${BENCH_LITELLM:-1}  # 0: never run LiteLLM; otherwise it is installed when missing
LITELLM_VENV=${LITELLM_VENV:-/tmp/dwctl-litellm-venv}
LITELLM_VERSION=${LITELLM_VERSION:-1.106.2}
LITELLM_KEY=${BENCH_LITELLM_KEY:-sk-dwctl-bench-master}
BENCH_PORTKEY=${BENCH_PORTKEY:-1}  # 0: never run the Portkey gateway; otherwise installed when missing
PORTKEY_DIR=${PORTKEY_DIR:-/tmp/dwctl-portkey}
PORTKEY_VERSION=${PORTKEY_VERSION:-1.15.2}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$BENCH_DIR/results/$STAMP}
WORK_DIR=${WORK_DIR:-/tmp/dwctl-bench-$STAMP}
LOG_DIR=$OUT_DIR/logs
RESULTS=$OUT_DIR/results.jsonl
REDIS_PREFIX_BASE=dwctl-bench-$STAMP
mkdir -p "$OUT_DIR" "$LOG_DIR" "$WORK_DIR"
: >"$RESULTS"

# shellcheck source=peers.sh
source "$BENCH_DIR/peers.sh"
# shellcheck source=gateway.sh
source "$BENCH_DIR/gateway.sh"
# shellcheck source=targets.sh
source "$BENCH_DIR/targets.sh"

REDIS_USED=0 SCRATCH_DB=""
finish() { # servers first: the scratch database cannot be dropped while they hold connections
  stop_all
  shared_db_drop
  if [[ $REDIS_USED == 1 ]]; then redis_forget "$REDIS_PREFIX_BASE"; fi
  REDIS_USED=0
}
trap 'finish' EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ prerequisites
ensure_wrk

GATEWAY_OK=1
if [[ ! -f "$ROOT/manage.py" ]]; then
  log "WARNING: $ROOT/manage.py not found: skipping the gateway targets"
  GATEWAY_OK=0
fi
if [[ ! -x "$PY" ]] && [[ -f "$ROOT/requirements.txt" ]]; then
  log "creating the project venv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/requirements.txt"
fi
if [[ -x "$PY" ]]; then
  if ! "$PY" -c 'import uvloop, httptools, orjson' 2>/dev/null; then
    log "installing uvloop, httptools and orjson into $VENV"
    "$VENV/bin/pip" install -q uvloop httptools orjson
  fi
  MOCK_PY=$PY
else
  MOCK_PY=$(command -v python3)
  GATEWAY_OK=0
fi
if [[ $GATEWAY_OK == 0 ]]; then
  for t in $TARGETS; do [[ $t == gateway* ]] && drop_target "$t"; done
fi
if (has_target gateway-redis || has_target gateway-2proc) && ! redis_ok; then
  log "WARNING: no Redis at $BENCH_REDIS_URL: skipping gateway-redis and gateway-2proc"
  record kind=error target=gateway-redis what=redis log=-
  drop_target gateway-redis
  drop_target gateway-2proc
fi
want_peer litellm "$BENCH_LITELLM" ensure_litellm
want_peer portkey "$BENCH_PORTKEY" ensure_portkey
[[ -n "$TARGETS" ]] || die "no target left to run"

# ------------------------------------------------------------------ mock upstreams
MOCK_PORT=$(free_port "${MOCK_PORT:-18001}")
pin_to "$LOAD_CPUS"
start_bg "$LOG_DIR/mock.log" "${PIN[@]}" "$MOCK_PY" "$BENCH_DIR/mock_upstream.py" --port "$MOCK_PORT"
MOCK_PID=$BG_PID
wait_http "http://127.0.0.1:$MOCK_PORT/health" 20 "$MOCK_PID" || die "mock upstream did not start"

SLOW_PORT=$(free_port "$((MOCK_PORT + 1))")
start_bg "$LOG_DIR/mock-slow.log" "${PIN[@]}" "$MOCK_PY" "$BENCH_DIR/mock_upstream.py" \
  --port "$SLOW_PORT" --delay-ms "$SLOW_DELAY_MS"
SLOW_PID=$BG_PID
wait_http "http://127.0.0.1:$SLOW_PORT/health" 20 "$SLOW_PID" || die "slow mock upstream did not start"
MOCK_BASE=http://127.0.0.1:$MOCK_PORT/v1
SLOW_BASE=http://127.0.0.1:$SLOW_PORT/v1
log "mock upstreams: $MOCK_BASE (pid $MOCK_PID), $SLOW_BASE with ${SLOW_DELAY_MS} ms (pid $SLOW_PID)"

GATEWAY_PORT=$(free_port "${GATEWAY_PORT:-18100}")
GATEWAY_PORT2=$(free_port "$((GATEWAY_PORT + 1))")
LITELLM_PORT=$(free_port "${LITELLM_PORT:-18200}")
PORTKEY_PORT=$(free_port "${PORTKEY_PORT:-18300}")

# ------------------------------------------------------------------ gateway setup
if [[ -n "${BENCH_DATABASE_URL:-}" ]]; then
  GW_DB=$BENCH_DATABASE_URL          # must point at an empty database
else
  GW_DB=sqlite:///$WORK_DIR/bench.sqlite3
fi
SCALE_DB=${BENCH_SCALE_DATABASE_URL:-sqlite:///$WORK_DIR/scale.sqlite3}
if [[ -n "${BENCH_DATABASE_URL:-}" && -z "${BENCH_SCALE_DATABASE_URL:-}" ]] && has_target gateway-scale; then
  log "BENCH_DATABASE_URL is set but BENCH_SCALE_DATABASE_URL is not: skipping gateway-scale"
  drop_target gateway-scale
fi
GW_KEY="" SHARED_KEY="" SCALE_KEY="" SHARED_DB="" SHARED_DB_KIND="" SEED_SECONDS=""

if has_target gateway; then
  if setup_database gateway "$GW_DB" "$LOG_DIR/gateway-setup.log"; then GW_KEY=$SETUP_KEY; else drop_target gateway; fi
fi
if has_target gateway-redis || has_target gateway-2proc; then
  shared_db_create
  REDIS_USED=1
  if setup_database gateway-redis "$SHARED_DB" "$LOG_DIR/shared-setup.log"; then
    SHARED_KEY=$SETUP_KEY
  else
    drop_target gateway-redis
    drop_target gateway-2proc
  fi
fi
if has_target gateway-scale; then
  t0=$(date +%s.%N)
  if setup_database gateway-scale "$SCALE_DB" "$LOG_DIR/scale-setup.log"; then
    SCALE_KEY=$SETUP_KEY
    log "gateway-scale: seeding $SCALE_KEYS keys, $SCALE_MODELS models, $SCALE_USERS users"
    gw_env "$SCALE_DB"
    if env "${GW_ENV[@]}" SEED_KEYS="$SCALE_KEYS" SEED_MODELS="$SCALE_MODELS" SEED_USERS="$SCALE_USERS" \
      SEED_ENDPOINT=mock "$PY" manage.py shell <"$BENCH_DIR/seed_scale.py" >>"$LOG_DIR/scale-setup.log" 2>&1; then
      SEED_SECONDS=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)")
      log "gateway-scale seeded in ${SEED_SECONDS}s: $(tail -n 1 "$LOG_DIR/scale-setup.log")"
    else
      log "WARNING: gateway-scale seeding failed (see $LOG_DIR/scale-setup.log): skipping it"
      record kind=error target=gateway-scale what=setup log=logs/scale-setup.log
      drop_target gateway-scale
    fi
  else
    drop_target gateway-scale
  fi
fi
[[ -n "$TARGETS" ]] || die "no target left to run"

# ------------------------------------------------------------------ meta.json
META_STAMP=$STAMP META_PY=$PY META_MOCK_PY=$MOCK_PY META_ROOT=$ROOT META_TARGETS=$TARGETS META_MODES=$MODES \
  META_ROUNDS=$ROUNDS META_DURATION=$DURATION META_WARMUP=$WARMUP META_LAT_CONNS=$LAT_CONNS \
  META_TPUT_CONNS=$TPUT_CONNS META_SLOW=$SLOW META_SLOW_DELAY_MS=$SLOW_DELAY_MS META_SLOW_CONNS=$SLOW_CONNS \
  META_SLOW_DURATION=$SLOW_DURATION META_INPUT_PRICE=$INPUT_PRICE META_OUTPUT_PRICE=$OUTPUT_PRICE \
  META_SCALE_KEYS=$SCALE_KEYS META_SCALE_MODELS=$SCALE_MODELS META_SCALE_USERS=$SCALE_USERS \
  META_SCALE_SEED_SECONDS=$SEED_SECONDS META_GATEWAY_CPUS=$GATEWAY_CPUS META_LOAD_CPUS=$LOAD_CPUS \
  META_TWO_PROC_CPUS=$TWO_PROC_CPUS META_TWO_PROC_LOAD_CPUS=$TWO_PROC_LOAD_CPUS \
  META_PAIRS=$PAIRS META_PAIR_DURATION=$PAIR_DURATION \
  META_GATEWAY_LIFESPAN=$GATEWAY_LIFESPAN META_GATEWAY_DB=${GW_DB%%:*} META_SHARED_DB=$SHARED_DB_KIND \
  META_REDIS=$([[ $REDIS_USED == 1 ]] && printf '%s (prefix %s:…)' "$BENCH_REDIS_URL" "$REDIS_PREFIX_BASE") \
  META_LIMITS=$LIMITS META_LITELLM_VENV=$LITELLM_VENV META_PORTKEY_DIR=$PORTKEY_DIR \
  python3 "$BENCH_DIR/meta.py" "$OUT_DIR/meta.json"

# ------------------------------------------------------------------ rounds
log "targets: $TARGETS | modes: $MODES | rounds: $ROUNDS | duration: $DURATION | results: $OUT_DIR"
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  order=$TARGETS
  if ((ROUND % 2 == 0)); then # even rounds go through the targets backwards
    read -ra names <<<"$TARGETS"
    order=$(printf '%s\n' "${names[@]}" | tac | tr '\n' ' ')
  fi
  for name in $order; do
    log "round $ROUND: $name"
    credits_before=""
    if [[ $name == gateway* ]]; then credits_before=$(balance_of "$name"); fi
    if ! target_start "$name"; then
      log "WARNING: $name did not start, see $LOG_DIR/$name-r$ROUND.log"
      tail -n 20 "$LOG_DIR/$name-r$ROUND.log" >&2 2>/dev/null || true
      record kind=error round="$ROUND" target="$name" what=start log="logs/$name-r$ROUND.log"
      target_stop
      continue
    fi
    SAMPLER_PID="" rss_file=$LOG_DIR/rss-r$ROUND-$name.txt
    if [[ -n "$T_PID" ]]; then
      idle_kb=$(rss_kb "$T_PID")
      start_rss_sampler "$T_PID" "$rss_file"
    fi
    measure_target "$name"
    if [[ -n "$T_PID" ]]; then
      end_kb=$(rss_kb "$T_PID")
      stop_rss_sampler "$SAMPLER_PID"
      peak_kb=$(max_rss_kb "$rss_file")
      record kind=rss round="$ROUND" target="$name" pid="$T_PID" ready_s="$T_READY_S" \
        idle_kb="${idle_kb:-0}" peak_kb="$peak_kb" end_kb="${end_kb:-0}"
      log "round $ROUND $name: ready in ${T_READY_S}s, RSS idle $((${idle_kb:-0} / 1024)) MiB," \
        "peak under load $((peak_kb / 1024)) MiB"
    fi
    target_stop
    if [[ -n "$credits_before" ]]; then
      # Billing check: what the user was charged while this server ran (pending usage is
      # written when the server stops). summarize.py compares it with the requests sent.
      record kind=billing round="$ROUND" target="$name" credits_before="$credits_before" \
        credits_after="$(balance_of "$name")"
    fi
  done
done

# ------------------------------------------------------------------ (c) the journal's cost per call
log "journal cost: bench/journal_cost.py"
pin_to "$GATEWAY_CPUS"
journal_line=$("${PIN[@]}" "$PY" "$BENCH_DIR/journal_cost.py" 2>>"$LOG_DIR/journal.log" | grep '^BENCHJSON ')
if [[ -n "$journal_line" ]]; then
  record kind=journal "${journal_line#BENCHJSON }"
else
  record kind=error target=journal what=run log=logs/journal.log
fi

# ------------------------------------------------------------------ (d) flex queue hook
# Flex (batch/async queue) figures are added by bench/flex.py when it exists. It gets the
# run's context in the environment and may append JSON lines (with "kind": "flex") to
# $BENCH_RESULTS; the summary lists them in their own section.
if [[ -f "$BENCH_DIR/flex.py" && "${FLEX:-1}" == 1 ]]; then
  log "flex queue benchmark: bench/flex.py"
  BENCH_RESULTS=$RESULTS BENCH_OUT_DIR=$OUT_DIR BENCH_WORK_DIR=$WORK_DIR BENCH_LOG_DIR=$LOG_DIR \
    BENCH_MOCK_BASE=$MOCK_BASE BENCH_SLOW_MOCK_BASE=$SLOW_BASE BENCH_DURATION=$DURATION \
    BENCH_GATEWAY_CPUS=$GATEWAY_CPUS BENCH_LOAD_CPUS=$LOAD_CPUS BENCH_PYTHON=$PY \
    BENCH_GATEWAY_PORT=$GATEWAY_PORT BENCH_DATABASE_URL=sqlite:///$WORK_DIR/flex.sqlite3 \
    timeout "${FLEX_TIMEOUT:-1200}" "$PY" "$BENCH_DIR/flex.py" 2>&1 | tee "$LOG_DIR/flex.log" ||
    record kind=error target=flex what=run log=logs/flex.log
else
  log "flex queue benchmark: skipped (no bench/flex.py, or FLEX=0)"
fi

# ------------------------------------------------------------------ report
finish
python3 "$BENCH_DIR/summarize.py" "$OUT_DIR"
log "results: $OUT_DIR/summary.md, $OUT_DIR/summary.jsonl, raw lines in $RESULTS"
exit 0
}
