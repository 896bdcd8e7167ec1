# shellcheck shell=bash
# bench/gateway.sh: setting up the gateway's databases and Redis for bench/run.sh (sourced after
# lib.sh and the knobs; defines functions only).
#
# Three databases, each set up through the management commands only:
#   GW_DB      the plain gateway: a fresh SQLite file (the embedded default), no Redis
#   SHARED_DB  gateway-redis and gateway-2proc: a scratch PostgreSQL database made for this run and
#              dropped at its end (what production runs), or a SQLite file when PostgreSQL is not there
#   SCALE_DB   gateway-scale: SQLite with SCALE_KEYS keys and SCALE_MODELS models

# gw_env DB_URL [REDIS_PREFIX]: sets GW_ENV, the environment every gateway command runs with.
# With a prefix the gateway uses Redis (BENCH_REDIS_URL) under that prefix.
gw_env() {
  # A fixed throwaway Fernet key: the bench endpoints' credentials are encrypted at rest as in production.
  GW_ENV=("DATABASE_URL=$1" DJANGO_SECRET_KEY=bench-secret GATEWAY_ENCRYPTION_KEYS=Ce1Y1ZhtUeMofhyL2xlKiK3zAh2JWAYCXPBF0TNtN5U=
    DJANGO_DEBUG=0 'ALLOWED_HOSTS=*')
  if [[ -n "${2:-}" ]]; then GW_ENV+=("REDIS_URL=$BENCH_REDIS_URL" "REDIS_PREFIX=$2"); fi
}

manage() { # manage DB_URL ARGS...
  gw_env "$1"
  shift
  env "${GW_ENV[@]}" "$PY" manage.py "$@"
}

# gateway_setup DB_URL LOGFILE -> sets SETUP_KEY: endpoints, the two paid models, the bench user
# with credits and its realtime key; with LIMITS=1 also limits that are never reached.
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
  [[ -n "$SETUP_KEY" ]] || return 1
  if [[ $LIMITS == 1 ]]; then # limits never reached: every request takes the limit checks' path
    {
      manage "$db" set_limits key bench bench --requests-per-second 1000000 --burst-size 1000000 \
        --tokens-per-minute 1000000000 --spend-limit 1000000000 --spend-window month &&
        for model in bench-model bench-slow; do
          manage "$db" set_limits model "$model" --requests-per-second 1000000 --burst-size 1000000 \
            --tokens-per-minute 1000000000 --capacity 100000 --max-output-tokens 4096 || return 1
        done
    } >>"$lf" 2>&1 || return 1
  fi
}

# db_of TARGET -> the database URL that target runs on.
db_of() {
  case "$1" in
    gateway-scale) printf '%s' "$SCALE_DB" ;;
    gateway-redis | gateway-2proc) printf '%s' "$SHARED_DB" ;;
    *) printf '%s' "$GW_DB" ;;
  esac
}

# key_of TARGET -> the bench user's key in that target's database.
key_of() {
  case "$1" in
    gateway-scale) printf '%s' "$SCALE_KEY" ;;
    gateway-redis | gateway-2proc) printf '%s' "$SHARED_KEY" ;;
    *) printf '%s' "$GW_KEY" ;;
  esac
}

# balance_of TARGET -> the bench user's credits in that target's database.
balance_of() {
  manage "$(db_of "$1")" balance bench 2>>"$LOG_DIR/balance.log" | tail -n 1 | tr -d '[:space:]' || true
}

# redis_ok -> status 0 when BENCH_REDIS_URL answers a PING (checked with the project's redis client).
redis_ok() {
  "$PY" - "$BENCH_REDIS_URL" <<'EOF' >/dev/null 2>&1
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=2).ping()
EOF
}

# redis_forget PREFIX: delete this run's keys (every prefix of the run starts with PREFIX).
redis_forget() {
  local gone
  gone=$("$PY" - "$BENCH_REDIS_URL" "$1" 2>>"$LOG_DIR/redis.log" <<'EOF'
import sys, redis
client = redis.Redis.from_url(sys.argv[1], socket_connect_timeout=2)
print(sum(client.delete(key) for key in client.scan_iter(match=sys.argv[2] + "*", count=1000)))
EOF
  ) || gone="?"
  log "redis: removed $gone key(s) under $1*"
}

# pg_admin SQL: run one statement on the PostgreSQL server of PG_ADMIN_URL (autocommit).
pg_admin() {
  "$PY" - "$PG_ADMIN_URL" "$1" <<'EOF'
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=3) as conn:
    conn.execute(sys.argv[2])
EOF
}

# shared_db_create -> sets SHARED_DB and SHARED_DB_KIND. BENCH_SHARED_DATABASE_URL (an empty database)
# wins; else a scratch database on PG_ADMIN_URL's server, named after the run; else a SQLite file.
shared_db_create() {
  if [[ -n "${BENCH_SHARED_DATABASE_URL:-}" ]]; then
    SHARED_DB=$BENCH_SHARED_DATABASE_URL SHARED_DB_KIND=external
    return 0
  fi
  if [[ $SHARED_DB_ENGINE == postgres ]]; then
    SCRATCH_DB=dwctl_bench_$(printf '%s' "$STAMP" | tr 'A-Z' 'a-z')
    if pg_admin "CREATE DATABASE $SCRATCH_DB" 2>>"$LOG_DIR/shared-setup.log"; then
      SHARED_DB=${PG_ADMIN_URL%/*}/$SCRATCH_DB SHARED_DB_KIND=postgresql
      log "shared database: scratch PostgreSQL database $SCRATCH_DB (dropped at the end)"
      return 0
    fi
    SCRATCH_DB=""
    log "WARNING: no PostgreSQL at $PG_ADMIN_URL (see $LOG_DIR/shared-setup.log): the shared database is SQLite"
  fi
  SHARED_DB=sqlite:///$WORK_DIR/shared.sqlite3 SHARED_DB_KIND=sqlite
}

shared_db_drop() {
  [[ -n "${SCRATCH_DB:-}" ]] || return 0
  if pg_admin "DROP DATABASE IF EXISTS $SCRATCH_DB WITH (FORCE)" 2>>"$LOG_DIR/shared-setup.log"; then
    log "dropped the scratch database $SCRATCH_DB"
  else
    log "WARNING: could not drop the scratch database $SCRATCH_DB"
  fi
  SCRATCH_DB=""
}

# setup_database NAME DB_URL LOGFILE -> sets SETUP_KEY, or records the failure and returns 1.
setup_database() {
  local name=$1 db=$2 lf=$3
  log "$name setup (user, key, endpoints, paid models$([[ $LIMITS == 1 ]] && printf ', limits')) in ${db%%\?*}"
  if gateway_setup "$db" "$lf"; then
    return 0
  fi
  log "WARNING: $name setup failed (see $lf)"
  tail -n 20 "$lf" >&2 || true
  record kind=error target="$name" what=setup log="logs/$(basename "$lf")"
  return 1
}
