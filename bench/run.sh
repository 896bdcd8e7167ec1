#!/usr/bin/env bash
# bench/run.sh: the benchmark suite (`make bench`). See bench/README.md.
#
# One run measures, side by side and against the same mock upstream:
#   direct         the mock upstream itself (the baseline of every round)
#   gateway        our gateway (uvicorn, one process) with a real user, key, model and tariff
#   gateway-scale  the same gateway with SCALE_KEYS keys and SCALE_MODELS models in its DB
#   gateway-httpx  (not default) the gateway with httpx's API on the httpx-aiohttp transport
#   gateway-daphne (not default) the gateway served by daphne instead of uvicorn
#   litellm        the LiteLLM proxy as the peer, when it is installed
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
DURATION=${DURATION:-10s}          # each measured wrk run
WARMUP=${WARMUP:-2s}               # warm-up before each mode (kept in results.jsonl, not in the tables)
ROUNDS=${ROUNDS:-2}                # every target is measured (and restarted) once per round
TARGETS=${TARGETS:-"direct gateway gateway-scale litellm"}
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
GATEWAY_CPUS=${GATEWAY_CPUS-1}     # empty = not pinned
LOAD_CPUS=${LOAD_CPUS-0}           # mock upstreams and wrk
WRK_TIMEOUT=${WRK_TIMEOUT:-10s}
READY_TIMEOUT=${READY_TIMEOUT:-120}
GATEWAY_LIFESPAN=${GATEWAY_LIFESPAN:-off}  # uvicorn --lifespan for the gateway
INPUT_PRICE=${INPUT_PRICE:-0.50}   # tariff of the bench models, credits per 1M tokens
OUTPUT_PRICE=${OUTPUT_PRICE:-1.50}
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
LITELLM_VENV=${LITELLM_VENV:-/tmp/dwctl-litellm-venv}
BENCH_LITELLM=${BENCH_LITELLM:-}   # 1: install if missing and run; 0: never; unset: run if installed
LITELLM_KEY=${BENCH_LITELLM_KEY:-sk-dwctl-bench-master}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$BENCH_DIR/results/$STAMP}
WORK_DIR=${WORK_DIR:-/tmp/dwctl-bench-$STAMP}
LOG_DIR=$OUT_DIR/logs
RESULTS=$OUT_DIR/results.jsonl
mkdir -p "$OUT_DIR" "$LOG_DIR" "$WORK_DIR"
: >"$RESULTS"

trap 'stop_all' EXIT
trap 'exit 130' INT TERM

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
drop_target() {
  local t out=""
  for t in $TARGETS; do [[ "$t" != "$1" ]] && out+="$t "; done
  TARGETS=${out% }
}

# record KEY=VALUE... [JSON_OBJECT]: append one JSON line to results.jsonl. Values that
# look like numbers are written as numbers; the optional last argument (a JSON object
# from wrk) is merged in.
record() {
  python3 - "$RESULTS" "$@" <<'EOF'
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
EOF
}

# ------------------------------------------------------------------ prerequisites
ensure_wrk

GATEWAY_OK=1
if has_target gateway || has_target gateway-scale; then
  if [[ ! -f "$ROOT/manage.py" ]]; then
    log "WARNING: $ROOT/manage.py not found: skipping the gateway targets"
    GATEWAY_OK=0
  fi
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
  drop_target gateway
  drop_target gateway-scale
fi

if has_target litellm || [[ "$BENCH_LITELLM" == 1 ]]; then
  if [[ "$BENCH_LITELLM" == 0 ]]; then
    drop_target litellm
  elif [[ ! -x "$LITELLM_VENV/bin/litellm" ]]; then
    if [[ "$BENCH_LITELLM" == 1 ]]; then
      log "installing litellm[proxy] into $LITELLM_VENV (takes a few minutes)"
      python3 -m venv "$LITELLM_VENV"
      "$LITELLM_VENV/bin/pip" install -q 'litellm[proxy]' >"$LOG_DIR/litellm-install.log" 2>&1 \
        || die "litellm install failed, see $LOG_DIR/litellm-install.log"
    else
      log "LiteLLM not installed in $LITELLM_VENV: skipping it (BENCH_LITELLM=1 installs it)"
      drop_target litellm
    fi
  fi
fi
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
LITELLM_PORT=$(free_port "${LITELLM_PORT:-18200}")

# ------------------------------------------------------------------ gateway setup
# gw_env DB_URL: sets GW_ENV, the environment every gateway command runs with.
gw_env() {
  GW_ENV=("DATABASE_URL=$1" DJANGO_SECRET_KEY=bench-secret DJANGO_DEBUG=0 'ALLOWED_HOSTS=*')
}
manage() { # manage DB_URL ARGS...
  gw_env "$1"
  shift
  env "${GW_ENV[@]}" "$PY" manage.py "$@"
}

# gateway_setup DB_URL LOGFILE -> sets SETUP_KEY. Only the management-command interface.
gateway_setup() {
  local db=$1 lf=$2 out
  {
    manage "$db" migrate --noinput &&
      manage "$db" add_endpoint mock "$MOCK_BASE" &&
      manage "$db" add_endpoint mock-slow "$SLOW_BASE" &&
      manage "$db" add_model bench-model --endpoint mock --upstream-model bench-model \
        --input-price "$INPUT_PRICE" --output-price "$OUTPUT_PRICE" --public &&
      manage "$db" add_model bench-slow --endpoint mock-slow --upstream-model bench-model \
        --input-price "$INPUT_PRICE" --output-price "$OUTPUT_PRICE" --public &&
      manage "$db" create_user bench --credits 1000000
  } >>"$lf" 2>&1 || return 1
  out=$(manage "$db" create_api_key bench --purpose realtime --name bench 2>>"$lf") || return 1
  printf '%s\n' "$out" >>"$lf"
  SETUP_KEY=$(printf '%s\n' "$out" | tail -n 1 | tr -d '[:space:]')
  [[ -n "$SETUP_KEY" ]]
}

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

SEED_SECONDS=""
if has_target gateway; then
  log "gateway setup (user, key, endpoints, paid models) in $GW_DB"
  if gateway_setup "$GW_DB" "$LOG_DIR/gateway-setup.log"; then
    GW_KEY=$SETUP_KEY
  else
    log "WARNING: gateway setup failed (see $LOG_DIR/gateway-setup.log): skipping gateway"
    tail -n 20 "$LOG_DIR/gateway-setup.log" >&2 || true
    record kind=error target=gateway what=setup log=logs/gateway-setup.log
    drop_target gateway
  fi
fi
if has_target gateway-scale; then
  log "gateway-scale setup: $SCALE_KEYS keys, $SCALE_MODELS models, $SCALE_USERS users in $SCALE_DB"
  t0=$(date +%s.%N)
  gw_env "$SCALE_DB"
  if gateway_setup "$SCALE_DB" "$LOG_DIR/scale-setup.log" && SCALE_KEY=$SETUP_KEY &&
    env "${GW_ENV[@]}" SEED_KEYS="$SCALE_KEYS" SEED_MODELS="$SCALE_MODELS" SEED_USERS="$SCALE_USERS" \
      SEED_ENDPOINT=mock "$PY" manage.py shell <"$BENCH_DIR/seed_scale.py" >>"$LOG_DIR/scale-setup.log" 2>&1; then
    SEED_SECONDS=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)")
    log "gateway-scale seeded in ${SEED_SECONDS}s: $(tail -n 1 "$LOG_DIR/scale-setup.log")"
  else
    log "WARNING: gateway-scale setup failed (see $LOG_DIR/scale-setup.log): skipping it"
    tail -n 20 "$LOG_DIR/scale-setup.log" >&2 || true
    record kind=error target=gateway-scale what=setup log=logs/scale-setup.log
    drop_target gateway-scale
  fi
fi

# balance_of TARGET -> the bench user's credits in that target's database.
balance_of() {
  local db=$GW_DB
  [[ $1 == gateway-scale ]] && db=$SCALE_DB
  manage "$db" balance bench 2>>"$LOG_DIR/balance.log" | tail -n 1 | tr -d '[:space:]' || true
}

# ------------------------------------------------------------------ meta.json
python3 - "$OUT_DIR/meta.json" <<EOF
import json, os, platform, subprocess, sys
def out(cmd):
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        return r.stdout.strip()
    except Exception:
        return ""
cpu = ""
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass
meta = {
    "stamp": "$STAMP", "host_cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
    "python": out(["$MOCK_PY", "-c", "import sys; print(sys.version.split()[0])"]),
    "django": out(["$PY", "-c", "import django; print(django.get_version())"]) if os.path.exists("$PY") else "",
    "uvicorn": out(["$PY", "-c", "import uvicorn; print(uvicorn.__version__)"]) if os.path.exists("$PY") else "",
    "litellm": out(["$LITELLM_VENV/bin/python", "-c", "import importlib.metadata as m; print(m.version('litellm'))"]) if os.path.exists("$LITELLM_VENV/bin/python") else "",
    "wrk": (out(["wrk", "-v"]).splitlines() or [""])[0].split(" Copyright")[0],
    "git_rev": out(["git", "-C", "$ROOT", "rev-parse", "--short", "HEAD"]),
    "targets": "$TARGETS".split(), "modes": "$MODES".split(), "rounds": $ROUNDS,
    "duration": "$DURATION", "warmup": "$WARMUP", "lat_conns": $LAT_CONNS, "tput_conns": $TPUT_CONNS,
    "slow": $SLOW, "slow_delay_ms": $SLOW_DELAY_MS, "slow_conns": $SLOW_CONNS, "slow_duration": "$SLOW_DURATION",
    "input_price": $INPUT_PRICE, "output_price": $OUTPUT_PRICE,
    "scale_keys": $SCALE_KEYS, "scale_models": $SCALE_MODELS, "scale_users": $SCALE_USERS,
    "scale_seed_seconds": "$SEED_SECONDS",
    "gateway_cpus": "$GATEWAY_CPUS", "load_cpus": "$LOAD_CPUS", "gateway_lifespan": "$GATEWAY_LIFESPAN",
    "gateway_db": "sqlite" if "$GW_DB".startswith("sqlite") else "external",
}
json.dump(meta, open(sys.argv[1], "w"), indent=2)
EOF

# ------------------------------------------------------------------ targets
# target_start NAME: starts NAME if it is a server and sets T_PID (the process whose RSS
# is sampled, empty for direct), T_URL, T_KEY, T_MODEL, T_SLOW_URL, T_SLOW_MODEL, T_READY_S.
target_start() {
  local name=$1 t0
  T_PID="" T_SLOW_URL="" T_SLOW_MODEL="" T_READY_S=""
  t0=$(date +%s.%N)
  case "$name" in
    direct)
      T_URL=$MOCK_BASE/chat/completions T_KEY=sk-direct T_MODEL=bench-model
      T_SLOW_URL=$SLOW_BASE/chat/completions T_SLOW_MODEL=bench-model
      return 0
      ;;
    gateway | gateway-scale | gateway-httpx | gateway-daphne)
      local db=$GW_DB key=${GW_KEY:-}
      if [[ $name == gateway-scale ]]; then db=$SCALE_DB key=$SCALE_KEY; fi
      gw_env "$db"
      # Variants: the upstream client on httpx's API (httpx-aiohttp transport), or daphne as the server.
      if [[ $name == gateway-httpx ]]; then GW_ENV+=(GATEWAY_UPSTREAM_TRANSPORT=httpx); fi
      # The production launcher: uvicorn (uvloop + httptools) with the gateway's protocol.
      local server=("$PY" -m dwctl_site.server --host 127.0.0.1 --port "$GATEWAY_PORT"
        --log-level warning --lifespan "$GATEWAY_LIFESPAN")
      if [[ $name == gateway-daphne ]]; then
        server=("$VENV/bin/daphne" -v 0 -b 127.0.0.1 -p "$GATEWAY_PORT" dwctl_site.asgi:application)
      fi
      pin_to "$GATEWAY_CPUS"
      start_bg "$LOG_DIR/$name-r$ROUND.log" env "${GW_ENV[@]}" "${PIN[@]}" "${server[@]}"
      T_PID=$BG_PID
      T_URL=http://127.0.0.1:$GATEWAY_PORT/ai/v1/chat/completions T_KEY=$key T_MODEL=bench-model
      if [[ $name != gateway-scale ]]; then
        T_SLOW_URL=$T_URL T_SLOW_MODEL=bench-slow
      fi
      wait_http "http://127.0.0.1:$GATEWAY_PORT/ai/v1/models" "$READY_TIMEOUT" "$T_PID" "$key" || return 1
      ;;
    litellm)
      pin_to "$GATEWAY_CPUS"
      start_bg "$LOG_DIR/litellm-r$ROUND.log" env BENCH_MOCK_BASE="$MOCK_BASE" BENCH_SLOW_MOCK_BASE="$SLOW_BASE" \
        BENCH_LITELLM_KEY="$LITELLM_KEY" LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
        "${PIN[@]}" "$LITELLM_VENV/bin/litellm" --config "$BENCH_DIR/litellm.yaml" \
        --host 127.0.0.1 --port "$LITELLM_PORT" --num_workers 1
      T_PID=$BG_PID
      T_URL=http://127.0.0.1:$LITELLM_PORT/v1/chat/completions T_KEY=$LITELLM_KEY T_MODEL=bench-model
      T_SLOW_URL=$T_URL T_SLOW_MODEL=bench-slow
      wait_http "http://127.0.0.1:$LITELLM_PORT/v1/models" "$READY_TIMEOUT" "$T_PID" "$LITELLM_KEY" || return 1
      ;;
    *)
      log "unknown target $name"
      return 1
      ;;
  esac
  T_READY_S=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)")
}

target_stop() {
  if [[ -n "$T_PID" && "$T_PID" != "$MOCK_PID" ]]; then stop_pid "$T_PID"; fi
  T_PID=""
}

# ------------------------------------------------------------------ measuring
# body_for MODEL STREAM -> path of a request body file (the same body wrk sends).
body_for() {
  local f=$WORK_DIR/body-$1-$2.json extra=""
  [[ $2 == 1 ]] && extra='"stream":true,"stream_options":{"include_usage":true},'
  printf '{"model":"%s",%s"max_tokens":64,"temperature":0.2,"user":"bench","messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly and precisely."},{"role":"user","content":"In one sentence, what does an AI gateway add between a client and a model provider?"}]}' \
    "$1" "$extra" >"$f"
  printf '%s' "$f"
}

# smoke URL KEY MODEL STREAM LOGNAME -> one request must return 200 with a usage block
# (and "[DONE]" for a stream).
smoke() {
  local url=$1 key=$2 model=$3 stream=$4 name=$5 code body
  body=$LOG_DIR/smoke-$name.txt
  code=$(curl -s -m 30 -o "$body" -w '%{http_code}' -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $key" --data-binary "@$(body_for "$model" "$stream")" "$url" || true)
  if [[ "$code" != 200 ]]; then
    log "smoke $name: HTTP $code: $(head -c 300 "$body" 2>/dev/null)"
    return 1
  fi
  if ! grep -q '"usage"' "$body"; then
    log "smoke $name: no usage block in the reply"
    return 1
  fi
  if [[ $stream == 1 ]] && ! grep -q '\[DONE\]' "$body"; then
    log "smoke $name: stream did not end with [DONE]"
    return 1
  fi
}

# wrk_json CONNS DURATION URL KEY MODEL STREAM LOGNAME -> prints wrk's BENCHJSON object.
wrk_json() {
  local conns=$1 dur=$2 url=$3 key=$4 model=$5 stream=$6 name=$7 lf
  lf=$LOG_DIR/wrk-$name.txt
  pin_to "$LOAD_CPUS"
  "${PIN[@]}" wrk -t1 -c"$conns" -d"$dur" --timeout "$WRK_TIMEOUT" --latency \
    -s "$BENCH_DIR/wrk/post.lua" "$url" -- "$key" "$model" "$stream" >"$lf" 2>&1 || true
  local line
  line=$(sed -n 's/^BENCHJSON //p' "$lf" | tail -n 1)
  if [[ -z "$line" ]]; then
    log "wrk produced no result, see $lf"
    line='{"requests":0,"rps":0,"errors":-1}'
  fi
  printf '%s' "$line"
}

jget() { python3 -c "import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], ''))" "$1" "$2"; }

measure_target() {
  local name=$1 mode stream lat tput tag warm
  for mode in $MODES; do
    stream=0
    [[ $mode == stream ]] && stream=1
    tag=r$ROUND-$name-$mode
    if ! smoke "$T_URL" "$T_KEY" "$T_MODEL" "$stream" "$tag"; then
      record kind=error round="$ROUND" target="$name" mode="$mode" what=smoke log="logs/smoke-$tag.txt"
      continue
    fi
    warm=$(wrk_json "$TPUT_CONNS" "$WARMUP" "$T_URL" "$T_KEY" "$T_MODEL" "$stream" "$tag-warmup")
    record kind=wrk round="$ROUND" target="$name" mode="$mode" phase=warmup conns="$TPUT_CONNS" "$warm"
    lat=$(wrk_json "$LAT_CONNS" "$DURATION" "$T_URL" "$T_KEY" "$T_MODEL" "$stream" "$tag-lat")
    record kind=wrk round="$ROUND" target="$name" mode="$mode" phase=lat conns="$LAT_CONNS" "$lat"
    tput=$(wrk_json "$TPUT_CONNS" "$DURATION" "$T_URL" "$T_KEY" "$T_MODEL" "$stream" "$tag-tput")
    record kind=wrk round="$ROUND" target="$name" mode="$mode" phase=tput conns="$TPUT_CONNS" "$tput"
    log "round $ROUND $name $mode: ${LAT_CONNS}-conn p50 $(jget "$lat" p50_ms) ms p99 $(jget "$lat" p99_ms) ms |" \
      "${TPUT_CONNS}-conn $(jget "$tput" rps) req/s p99 $(jget "$tput" p99_ms) ms | errors $(jget "$lat" errors)+$(jget "$tput" errors)"
  done
  if [[ $SLOW == 1 && -n "$T_SLOW_URL" ]]; then
    tag=r$ROUND-$name-slow
    if smoke "$T_SLOW_URL" "$T_KEY" "$T_SLOW_MODEL" 0 "$tag"; then
      warm=$(wrk_json "$SLOW_CONNS" 2s "$T_SLOW_URL" "$T_KEY" "$T_SLOW_MODEL" 0 "$tag-warmup")
      record kind=wrk round="$ROUND" target="$name" mode=slow phase=warmup conns="$SLOW_CONNS" "$warm"
      tput=$(wrk_json "$SLOW_CONNS" "$SLOW_DURATION" "$T_SLOW_URL" "$T_KEY" "$T_SLOW_MODEL" 0 "$tag")
      record kind=wrk round="$ROUND" target="$name" mode=slow phase=tput conns="$SLOW_CONNS" \
        delay_ms="$SLOW_DELAY_MS" "$tput"
      log "round $ROUND $name slow upstream (${SLOW_DELAY_MS} ms, ${SLOW_CONNS} conns): $(jget "$tput" rps) req/s" \
        "p50 $(jget "$tput" p50_ms) ms p99 $(jget "$tput" p99_ms) ms errors $(jget "$tput" errors)"
    else
      record kind=error round="$ROUND" target="$name" mode=slow what=smoke log="logs/smoke-$tag.txt"
    fi
  fi
}

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

# ------------------------------------------------------------------ (c) flex queue hook
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
stop_all
python3 "$BENCH_DIR/summarize.py" "$OUT_DIR"
log "results: $OUT_DIR/summary.md, $OUT_DIR/summary.jsonl, raw lines in $RESULTS"
exit 0
}
