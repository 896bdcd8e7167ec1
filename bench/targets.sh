# shellcheck shell=bash
# bench/targets.sh: starting, stopping and measuring the targets of bench/run.sh (sourced after
# lib.sh, peers.sh, gateway.sh and the knobs; defines functions only).
#
# target_start NAME sets what the measurements read:
#   T_PID, T_PID2          the server process(es); RSS is sampled from T_PID (empty for direct)
#   T_URL, T_URL2          chat completions URL(s); with T_URL2 (gateway-2proc) every load of more than
#                          one connection is split in halves, one wrk per process, run at the same time
#   T_SLOW_URL, T_SLOW_URL2, T_SLOW_MODEL   the same against the slow upstream (empty: not measured)
#   T_KEY, T_MODEL, T_HEADERS, T_SLOW_HEADERS   bearer key, model, extra headers ("A: x;B: y")
#   T_LOAD_CPUS            where wrk runs for this target (the mock upstreams are moved there too)
#   T_READY_S              seconds from start to ready

# gateway_server PORT -> sets SERVER, the command line of one gateway process: the production
# launcher, uvicorn (uvloop + httptools) with the gateway's bounded protocol.
gateway_server() {
  SERVER=("$PY" -m dwctl_site.server --host 127.0.0.1 --port "$1" --log-level warning --lifespan "$GATEWAY_LIFESPAN")
}

# pin_mocks CPUS: move both mock upstreams (all their threads) to CPUS; empty = every CPU.
pin_mocks() {
  local cpus=${1:-0-$(($(nproc) - 1))} pid
  command -v taskset >/dev/null 2>&1 || return 0
  for pid in "$MOCK_PID" "$SLOW_PID"; do
    taskset -a -p -c "$cpus" "$pid" >/dev/null 2>&1 || log "WARNING: could not move mock $pid to CPUs $cpus"
  done
}

target_start() {
  local name=$1 t0 db key prefix="" cpus=()
  T_PID="" T_PID2="" T_URL2="" T_SLOW_URL="" T_SLOW_URL2="" T_SLOW_MODEL="" T_READY_S=""
  T_HEADERS="" T_SLOW_HEADERS="" T_LOAD_CPUS=$LOAD_CPUS
  t0=$(date +%s.%N)
  case "$name" in
    direct)
      T_URL=$MOCK_BASE/chat/completions T_KEY=sk-direct T_MODEL=bench-model
      T_SLOW_URL=$SLOW_BASE/chat/completions T_SLOW_MODEL=bench-model
      return 0
      ;;
    gateway | gateway-scale | gateway-httpx | gateway-aiohttp | gateway-daphne | gateway-redis | gateway-2proc)
      db=$(db_of "$name") key=$(key_of "$name")
      # A Redis prefix of its own for every server start, so no state is carried between them.
      if [[ $name == gateway-redis || $name == gateway-2proc ]]; then prefix=$REDIS_PREFIX_BASE:$name:r$ROUND; fi
      gw_env "$db" "$prefix"
      if [[ $name == gateway-httpx ]]; then GW_ENV+=(GATEWAY_UPSTREAM_TRANSPORT=httpx); fi
      if [[ $name == gateway-aiohttp ]]; then GW_ENV+=(GATEWAY_UPSTREAM_TRANSPORT=aiohttp); fi
      gateway_server "$GATEWAY_PORT"
      if [[ $name == gateway-daphne ]]; then
        SERVER=("$VENV/bin/daphne" -v 0 -b 127.0.0.1 -p "$GATEWAY_PORT" dwctl_site.asgi:application)
      fi
      if [[ $name == gateway-2proc ]]; then
        # One process per core; wrk and the mock upstreams share both cores with them.
        read -ra cpus <<<"$TWO_PROC_CPUS"
        T_LOAD_CPUS=$TWO_PROC_LOAD_CPUS
        pin_mocks "$T_LOAD_CPUS"
        pin_to "${cpus[0]:-}"
      else
        pin_to "$GATEWAY_CPUS"
      fi
      start_bg "$LOG_DIR/$name-r$ROUND.log" env "${GW_ENV[@]}" "${PIN[@]}" "${SERVER[@]}"
      T_PID=$BG_PID
      T_URL=http://127.0.0.1:$GATEWAY_PORT/ai/v1/chat/completions T_KEY=$key T_MODEL=bench-model
      if [[ $name != gateway-scale ]]; then T_SLOW_URL=$T_URL T_SLOW_MODEL=bench-slow; fi
      if [[ $name == gateway-2proc ]]; then
        gateway_server "$GATEWAY_PORT2"
        pin_to "${cpus[1]:-}"
        start_bg "$LOG_DIR/$name-r$ROUND-b.log" env "${GW_ENV[@]}" "${PIN[@]}" "${SERVER[@]}"
        T_PID2=$BG_PID
        T_URL2=http://127.0.0.1:$GATEWAY_PORT2/ai/v1/chat/completions T_SLOW_URL2=$T_URL2
        wait_http "http://127.0.0.1:$GATEWAY_PORT2/ai/v1/models" "$READY_TIMEOUT" "$T_PID2" "$key" || return 1
      fi
      wait_http "http://127.0.0.1:$GATEWAY_PORT/ai/v1/models" "$READY_TIMEOUT" "$T_PID" "$key" || return 1
      ;;
    litellm)
      litellm_start "$LOG_DIR/litellm-r$ROUND.log"
      T_PID=$BG_PID
      T_URL=http://127.0.0.1:$LITELLM_PORT/v1/chat/completions T_KEY=$LITELLM_KEY T_MODEL=bench-model
      T_SLOW_URL=$T_URL T_SLOW_MODEL=bench-slow
      wait_http "http://127.0.0.1:$LITELLM_PORT/v1/models" "$READY_TIMEOUT" "$T_PID" "$LITELLM_KEY" || return 1
      ;;
    portkey)
      portkey_start "$LOG_DIR/portkey-r$ROUND.log"
      T_PID=$BG_PID
      # The key is the upstream's: Portkey passes the client's Authorization on to the provider.
      T_URL=http://127.0.0.1:$PORTKEY_PORT/v1/chat/completions T_KEY=sk-mock-upstream T_MODEL=bench-model
      T_HEADERS=$(portkey_headers "$MOCK_BASE")
      T_SLOW_URL=$T_URL T_SLOW_MODEL=bench-model T_SLOW_HEADERS=$(portkey_headers "$SLOW_BASE")
      wait_http "http://127.0.0.1:$PORTKEY_PORT/" "$READY_TIMEOUT" "$T_PID" || return 1
      ;;
    *)
      log "unknown target $name"
      return 1
      ;;
  esac
  T_READY_S=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)")
}

target_stop() {
  if [[ -n "$T_PID2" ]]; then stop_pid "$T_PID2"; fi
  if [[ -n "$T_PID" ]]; then stop_pid "$T_PID"; fi
  if [[ "$T_LOAD_CPUS" != "$LOAD_CPUS" ]]; then pin_mocks "$LOAD_CPUS"; fi
  T_PID="" T_PID2="" T_LOAD_CPUS=$LOAD_CPUS
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

# smoke URL KEY MODEL STREAM HEADERS LOGNAME -> one request must return 200 with a usage block
# (and "[DONE]" for a stream).
smoke() {
  local url=$1 key=$2 model=$3 stream=$4 headers=$5 name=$6 code body pair extra=()
  body=$LOG_DIR/smoke-$name.txt
  IFS=';' read -ra pairs <<<"$headers"
  for pair in "${pairs[@]}"; do [[ -n "$pair" ]] && extra+=(-H "$pair"); done
  code=$(curl -s -m 30 -o "$body" -w '%{http_code}' -H 'Content-Type: application/json' "${extra[@]}" \
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

# wrk_one CONNS DURATION URL MODEL STREAM HEADERS LOGFILE: one wrk run, pinned to T_LOAD_CPUS.
wrk_one() {
  pin_to "$T_LOAD_CPUS"
  "${PIN[@]}" wrk -t1 -c"$1" -d"$2" --timeout "$WRK_TIMEOUT" --latency \
    -s "$BENCH_DIR/wrk/post.lua" "$3" -- "$T_KEY" "$4" "$5" "" "$6" >"$7" 2>&1 || true
}

# load CONNS DURATION URL URL2 MODEL STREAM HEADERS LOGNAME -> prints one BENCHJSON object. With
# URL2 and more than one connection, two wrk runs at once (half the connections each, one per
# process), merged: counts and req/s added up, latency percentiles the larger of the two.
load() {
  local conns=$1 dur=$2 url=$3 url2=$4 model=$5 stream=$6 headers=$7 lf=$LOG_DIR/wrk-$8.txt
  if [[ -z "$url2" || $conns -lt 2 ]]; then
    wrk_one "$conns" "$dur" "$url" "$model" "$stream" "$headers" "$lf"
    set -- "$lf"
  else
    wrk_one $(((conns + 1) / 2)) "$dur" "$url" "$model" "$stream" "$headers" "${lf%.txt}-a.txt" &
    wrk_one $((conns / 2)) "$dur" "$url2" "$model" "$stream" "$headers" "${lf%.txt}-b.txt" &
    wait
    set -- "${lf%.txt}-a.txt" "${lf%.txt}-b.txt"
  fi
  python3 - "$@" <<'EOF'
import json, sys
parts = []
for path in sys.argv[1:]:
    lines = [line[len("BENCHJSON "):] for line in open(path) if line.startswith("BENCHJSON ")]
    parts.append(json.loads(lines[-1]) if lines else None)
if None in parts:
    print("wrk produced no result, see " + " ".join(sys.argv[1:]), file=sys.stderr)
    print(json.dumps({"requests": 0, "rps": 0, "errors": -1}))
    sys.exit()
if len(parts) == 1:
    print(json.dumps(parts[0]))
    sys.exit()
out = {k: sum(p[k] for p in parts) for k in ("requests", "rps", "non2xx", "socket_errors", "timeouts", "errors", "bytes")}
out.update({k: max(p[k] for p in parts) for k in ("seconds", "p50_ms", "p90_ms", "p99_ms", "max_ms")})
out["mean_ms"] = sum(p["mean_ms"] * p["requests"] for p in parts) / max(1, out["requests"])
out["first_bad_status"] = next((p["first_bad_status"] for p in parts if p["first_bad_status"]), 0)
out["parts_rps"] = [p["rps"] for p in parts]
print(json.dumps(out))
EOF
}

jget() { python3 -c "import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], ''))" "$1" "$2"; }

# smokes NAME MODE URL URL2 MODEL STREAM HEADERS -> status 0 when every process answered; records how
# many smoke requests were sent (the billing check counts them).
smokes() {
  local tag=$1 mode=$2 url=$3 url2=$4 model=$5 stream=$6 headers=$7 sent=1
  smoke "$url" "$T_KEY" "$model" "$stream" "$headers" "$tag" || return 1
  if [[ -n "$url2" ]]; then
    sent=2
    smoke "$url2" "$T_KEY" "$model" "$stream" "$headers" "$tag-b" || return 1
  fi
  record kind=smoke round="$ROUND" target="$TARGET" mode="$mode" count="$sent"
}

# cpu_snap -> the CPU ticks of the machine and of each role now (bench/cpu_share.py).
cpu_snap() {
  # shellcheck disable=SC2086  # T_PID2 and SLOW_PID may be empty
  python3 "$BENCH_DIR/cpu_share.py" snap --server $T_PID $T_PID2 --mock $MOCK_PID $SLOW_PID
}

# pairs MODE STREAM TAG: in the two-process round, its first process alone (wrk and the mocks on the
# other CPU, as in the one-process round) and then both processes, PAIRS times, each PAIR_DURATION:
# the two figures of a pair are taken seconds apart, so a machine whose speed drifts between targets
# (measured: the same one-process run 3,599 and 2,191 req/s minutes apart) does not decide the ratio.
# The order alternates (one-both, both-one, …), so a drift within the pairs favours neither.
pairs() {
  local mode=$1 stream=$2 tag=$3 i run order out alone cpus=()
  read -ra cpus <<<"$TWO_PROC_CPUS"
  alone=${cpus[1]:-$TWO_PROC_LOAD_CPUS}
  for ((i = 1; i <= PAIRS; i++)); do
    order="one both"
    if ((i % 2 == 0)); then order="both one"; fi
    for run in $order; do
      if [[ $run == one ]]; then
        T_LOAD_CPUS=$alone
        pin_mocks "$T_LOAD_CPUS"
        out=$(load "$TPUT_CONNS" "$PAIR_DURATION" "$T_URL" "" "$T_MODEL" "$stream" "$T_HEADERS" "$tag-pair$i-one")
        T_LOAD_CPUS=$TWO_PROC_LOAD_CPUS
        pin_mocks "$T_LOAD_CPUS"
      else
        out=$(load "$TPUT_CONNS" "$PAIR_DURATION" "$T_URL" "$T_URL2" "$T_MODEL" "$stream" "$T_HEADERS" "$tag-pair$i-both")
      fi
      record kind=wrk round="$ROUND" target="$TARGET" mode="$mode" phase="pair$i-$run" conns="$TPUT_CONNS" "$out"
      log "round $ROUND $TARGET $mode pair $i, $run: $(jget "$out" rps) req/s"
    done
  done
}

measure_target() {
  local name=$1 mode stream lat tput tag warm before after
  TARGET=$name
  for mode in $MODES; do
    stream=0
    [[ $mode == stream ]] && stream=1
    tag=r$ROUND-$name-$mode
    if ! smokes "$tag" "$mode" "$T_URL" "$T_URL2" "$T_MODEL" "$stream" "$T_HEADERS"; then
      record kind=error round="$ROUND" target="$name" mode="$mode" what=smoke log="logs/smoke-$tag.txt"
      continue
    fi
    warm=$(load "$TPUT_CONNS" "$WARMUP" "$T_URL" "$T_URL2" "$T_MODEL" "$stream" "$T_HEADERS" "$tag-warmup")
    record kind=wrk round="$ROUND" target="$name" mode="$mode" phase=warmup conns="$TPUT_CONNS" "$warm"
    lat=$(load "$LAT_CONNS" "$DURATION" "$T_URL" "$T_URL2" "$T_MODEL" "$stream" "$T_HEADERS" "$tag-lat")
    record kind=wrk round="$ROUND" target="$name" mode="$mode" phase=lat conns="$LAT_CONNS" "$lat"
    before=$(cpu_snap)
    tput=$(load "$TPUT_CONNS" "$DURATION" "$T_URL" "$T_URL2" "$T_MODEL" "$stream" "$T_HEADERS" "$tag-tput")
    after=$(cpu_snap)
    record kind=wrk round="$ROUND" target="$name" mode="$mode" phase=tput conns="$TPUT_CONNS" "$tput"
    record kind=cpu round="$ROUND" target="$name" mode="$mode" "$(python3 "$BENCH_DIR/cpu_share.py" diff "$before" "$after")"
    log "round $ROUND $name $mode: ${LAT_CONNS}-conn p50 $(jget "$lat" p50_ms) ms p99 $(jget "$lat" p99_ms) ms |" \
      "${TPUT_CONNS}-conn $(jget "$tput" rps) req/s p99 $(jget "$tput" p99_ms) ms | errors $(jget "$lat" errors)+$(jget "$tput" errors)"
    if [[ -n "$T_URL2" ]]; then pairs "$mode" "$stream" "$tag"; fi
  done
  if [[ $SLOW == 1 && -n "$T_SLOW_URL" ]]; then
    tag=r$ROUND-$name-slow
    if smokes "$tag" slow "$T_SLOW_URL" "$T_SLOW_URL2" "$T_SLOW_MODEL" 0 "$T_SLOW_HEADERS"; then
      warm=$(load "$SLOW_CONNS" 2s "$T_SLOW_URL" "$T_SLOW_URL2" "$T_SLOW_MODEL" 0 "$T_SLOW_HEADERS" "$tag-warmup")
      record kind=wrk round="$ROUND" target="$name" mode=slow phase=warmup conns="$SLOW_CONNS" "$warm"
      tput=$(load "$SLOW_CONNS" "$SLOW_DURATION" "$T_SLOW_URL" "$T_SLOW_URL2" "$T_SLOW_MODEL" 0 "$T_SLOW_HEADERS" "$tag")
      record kind=wrk round="$ROUND" target="$name" mode=slow phase=tput conns="$SLOW_CONNS" \
        delay_ms="$SLOW_DELAY_MS" "$tput"
      log "round $ROUND $name slow upstream (${SLOW_DELAY_MS} ms, ${SLOW_CONNS} conns): $(jget "$tput" rps) req/s" \
        "p50 $(jget "$tput" p50_ms) ms p99 $(jget "$tput" p99_ms) ms errors $(jget "$tput" errors)"
    else
      record kind=error round="$ROUND" target="$name" mode=slow what=smoke log="logs/smoke-$tag.txt"
    fi
  fi
}
