# The usage dashboard on a large request log: seed LOG_ROWS rows over 30 days, then time each
# period's page queries (gateway/usage.py), a user's and a key's spend, and the request log's admin
# pages as an operator opens them (the list, a search by request id and by username, a filter), best
# of ROUNDS.
#
#   DATABASE_URL=sqlite:////tmp/dash.sqlite3 .venv/bin/python manage.py migrate -v0
#   DATABASE_URL=sqlite:////tmp/dash.sqlite3 LOG_ROWS=1000000 \
#     .venv/bin/python manage.py shell < bench/dashboard_scale.py
#
# Run it on a database of its own: it adds users, keys and LOG_ROWS request-log rows (a second run
# on the same database adds as many again; SEED=0 times what is there).
import os
import random
import sys
import time
from datetime import timedelta
from decimal import Decimal

from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

from accounts.models import ApiKey, User
from accounts.services import create_api_key
from billing.services import create_user
from common.bulk import insert_rows
from gateway.models import RequestLog
from gateway.models import UsageRollupMark as RollupMark
from gateway.usage import PERIODS, ROLLUP_MARGIN, dashboard, roll_up_usage, spend_of

ROWS = int(os.environ.get("LOG_ROWS", "1000000"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
CHUNK = 10_000
COLUMNS = (
    "request_id",
    "user_id",
    "api_key_id",
    "model_alias",
    "path",
    "service_tier",
    "status_code",
    "error_code",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "cost",
    "created_at",
    "usage_estimated",
    "client_request_id",
    "key_prefix",
)


def seed() -> float:
    t0 = time.monotonic()
    run = int(time.time())
    users = [create_user(f"dash-{run}-{u}") for u in range(100)]
    keys = [create_api_key(users[k % 100], name=f"dash-{k}")[0] for k in range(200)]
    models = [f"model-{m}" for m in range(50)]
    now = timezone.now()
    rng = random.Random(run)
    for start in range(0, ROWS, CHUNK):
        rows = []
        for i in range(start, min(start + CHUNK, ROWS)):
            key = rng.choice(keys)
            roll = rng.random()
            status = 200 if roll < 0.9 else (401 if roll < 0.98 else 502)
            tokens_in, tokens_out = rng.randint(10, 2000), rng.randint(10, 1000)
            served = status == 200
            rows.append(
                (
                    f"req_dash_{run}_{i}",
                    key.owner_id,
                    key.pk,
                    rng.choice(models),
                    "/chat/completions",
                    "realtime",
                    status,
                    "" if served else ("invalid_api_key" if status == 401 else "upstream_error"),
                    rng.lognormvariate(5, 0.8),
                    tokens_in if served else None,
                    tokens_out if served else None,
                    (Decimal(tokens_in * 500 + tokens_out * 1500) / 10**9) if served else None,
                    # In the order calls end and are written: ids grow with time.
                    now - timedelta(seconds=(ROWS - i) * 30 * 86400 / ROWS),
                    False,
                    "",
                    key.prefix,
                )
            )
        with transaction.atomic():
            insert_rows(RequestLog, COLUMNS, rows)
        if (start // CHUNK) % 10 == 9:
            print(f"  {start + CHUNK} rows ({time.monotonic() - t0:.0f}s)", file=sys.stderr, flush=True)
    return time.monotonic() - t0


def best(fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


if os.environ.get("SEED", "1") != "0":
    print(f"seeded {ROWS} rows in {seed():.0f}s", flush=True)
if connection.vendor == "postgresql":
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE gateway_requestlog")
t0 = time.perf_counter()
hours = runs = 0
while (done := roll_up_usage()) and runs < 100:  # the scheduled runs that take in a long log
    hours, runs = hours + done, runs + 1
    if RollupMark.objects.get().last_id >= RequestLog.objects.order_by("-id").values_list("id", flat=True)[0]:
        break
backfill = time.perf_counter() - t0
# What the scheduled run does each minute: the hours of the rows since the last run (here the last
# margin of rows again, as every run rereads them).
t0 = time.perf_counter()
again = roll_up_usage()
incremental = time.perf_counter() - t0
total = RequestLog.objects.count()
user = User.objects.filter(username__startswith="dash-").first()
key = ApiKey.objects.filter(name__startswith="dash-").first()
print(f"\n{connection.vendor}, {total:,} request-log rows over 30 days, best of {ROUNDS}\n")
print("| query | seconds |")
print("|---|---|")
print(f"| first rollups of the whole log ({runs} runs, {hours} hours) | {backfill:.1f} |")
print(f"| a scheduled rollup run ({again} hours touched by the last {ROLLUP_MARGIN:,} ids) | {incremental:.2f} |")
for period in PERIODS:
    board = dashboard(period)
    seconds = best(lambda p=period: dashboard(p))
    print(f"| dashboard {period} ({board.totals.requests:,} calls, {len(board.points)} points) | {seconds:.3f} |")
print(f"| a user's spend today / this month | {best(lambda: spend_of(user_id=user.pk)):.3f} |")
print(f"| a key's spend today / this month | {best(lambda: spend_of(api_key_id=key.pk)):.3f} |")

operator = User.objects.filter(username="dash-operator").first() or User.objects.create_superuser("dash-operator")
browser = Client(HTTP_HOST="localhost")
browser.force_login(operator)
newest = RequestLog.objects.order_by("-created_at").values_list("request_id", flat=True)[0]
week_ago = str(timezone.now() - timedelta(days=7))
for page, query in (
    ("the request log's admin list", {}),
    ("a search there by request id", {"q": newest}),
    ("a search there by username", {"q": user.username}),
    (
        "its 401s of the past 7 days",
        {"status_class": "4", "created_at__gte": week_ago},
    ),
):
    assert browser.get("/admin/gateway/requestlog/", query).status_code == 200
    print(f"| {page} | {best(lambda q=query: browser.get('/admin/gateway/requestlog/', q)):.3f} |")
