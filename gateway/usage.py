"""What the request log adds up to: the usage dashboard's figures, a user's or key's spend, and retention.

Every figure is one aggregate query over `gateway_requestlog` (its `created_at` index bounds the
period), so a page costs a few scans of the period, not a row per call. The SQL is written here
rather than through the ORM for two things the ORM does not give on both databases:

- exact spend: SQLite keeps a decimal as a REAL, and summing REALs drifts; the sum is taken in
  integer nano-credits there (a cost has 9 decimals, well inside a double's precision), and in
  NUMERIC on PostgreSQL — both come back as an exact `Decimal`;
- percentiles: PostgreSQL's `percentile_cont` has no SQLite twin, so both rank the period's
  latencies with window functions (SQLite ≥ 3.25) and interpolate between the two neighbouring
  ranks as `percentile_cont` does: one definition, the same figure on both databases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from accounts.models import ApiKey, User
from gateway.models import RequestLog

TABLE = RequestLog._meta.db_table
NANO_PER_CREDIT = 10**9
# The dashboard's periods: how far back, and the width of a point on its charts.
PERIODS: dict[str, tuple[timedelta, str]] = {
    "24h": (timedelta(hours=24), "hour"),
    "7d": (timedelta(days=7), "hour"),
    "30d": (timedelta(days=30), "day"),
}
PERCENTILES = (50, 99)
TOP = 10
PRUNE_BATCH = 5000


def _vendor_sql() -> dict[str, str]:
    """The expressions that differ by database: spend summed exactly, and a bucket as 'YYYY-MM-DD[ HH]'."""
    if connection.vendor == "postgresql":
        return {
            "spend": "SUM(cost)",
            "hour": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24')",
            "day": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        }
    # SQLite stores aware datetimes as UTC text: a bucket is a prefix of it.
    return {
        "spend": f"SUM(CAST(ROUND(cost * {NANO_PER_CREDIT}) AS INTEGER))",
        "hour": "substr(created_at, 1, 13)",
        "day": "substr(created_at, 1, 10)",
    }


def _credits(total: Any) -> Decimal:
    if total is None:
        return Decimal(0)
    if connection.vendor == "postgresql":
        return Decimal(total)
    return Decimal(int(total)) / NANO_PER_CREDIT


def _rows(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def _when(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


# --- a user's or a key's spend -----------------------------------------------------------------


@dataclass(frozen=True)
class Spend:
    requests_today: int
    spend_today: Decimal
    requests_month: int
    spend_month: Decimal


def spend_of(*, user_id: int | None = None, api_key_id: int | None = None, now: datetime | None = None) -> Spend:
    """Requests and credits spent today and this month (UTC) by one user or one key."""
    if (user_id is None) == (api_key_id is None):
        raise ValueError("Name a user or a key.")
    now = now or timezone.now()
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    column, value = ("user_id", user_id) if user_id is not None else ("api_key_id", api_key_id)
    spend = _vendor_sql()["spend"]
    today_spend = spend.replace("cost", "CASE WHEN created_at >= %s THEN cost END")
    sql = (
        f"SELECT COUNT(*), SUM(CASE WHEN created_at >= %s THEN 1 ELSE 0 END), {spend}, {today_spend} "  # noqa: S608
        f"FROM {TABLE} WHERE {column} = %s AND created_at >= %s AND created_at <= %s"
    )
    [(month_count, day_count, month_total, day_total)] = _rows(
        sql, [_when(day), _when(day), value, _when(month), _when(now)]
    )
    return Spend(int(day_count or 0), _credits(day_total), int(month_count or 0), _credits(month_total))


# --- the dashboard ---------------------------------------------------------------------------


@dataclass
class Point:
    """One bucket of the period: its start and what its calls added up to."""

    start: datetime
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    spend: Decimal = Decimal(0)
    latency: dict[int, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Spender:
    label: str
    requests: int
    spend: Decimal
    object_id: Any = None


@dataclass
class Dashboard:
    period: str
    since: datetime
    until: datetime
    points: list[Point]
    totals: Point
    top_users: list[Spender]
    top_keys: list[Spender]
    top_models: list[Spender]

    @property
    def error_rate(self) -> float:
        return self.totals.errors / self.totals.requests if self.totals.requests else 0.0


def _bucket_start(text: str) -> datetime:
    fmt = "%Y-%m-%d %H" if len(text) > 10 else "%Y-%m-%d"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC)  # noqa: DTZ007  (tz set at once)


def _buckets(since: datetime, until: datetime, width: str) -> list[datetime]:
    """Every bucket start of the period, so a quiet hour is a zero on the chart, not a gap."""
    step = timedelta(hours=1) if width == "hour" else timedelta(days=1)
    start = since.replace(minute=0, second=0, microsecond=0)
    if width == "day":
        start = start.replace(hour=0)
    starts = []
    while start <= until:
        starts.append(start)
        start += step
    return starts


def percentiles_from_ranks(ranked: list[tuple[Any, int, int, float]]) -> dict[Any, dict[int, float]]:
    """`percentile_cont` per group, from the rows at ranks ⌊(n-1)p⌋+1 and ⌊(n-1)p⌋+2 of each group.

    `ranked` holds (group, rank from 1, size of the group, value) for those rows only.
    """
    values: dict[Any, dict[int, float]] = {}
    sizes: dict[Any, int] = {}
    for group, rank, size, value in ranked:
        values.setdefault(group, {})[rank] = value
        sizes[group] = size
    out: dict[Any, dict[int, float]] = {}
    for group, size in sizes.items():
        at = values[group]
        out[group] = {}
        for p in PERCENTILES:
            position = (size - 1) * p / 100
            low = math.floor(position)
            below = at[low + 1]
            above = at.get(low + 2, below)
            out[group][p] = below + (position - low) * (above - below)
    return out


def _latency_percentiles(bucket_sql: str, params: list[Any]) -> dict[Any, dict[int, float]]:
    """p50/p99 latency per bucket of answered calls (4xx refusals are the gateway's own, quick answers)."""
    wanted = " OR ".join(f"rn = (n - 1) * {p} / 100 + 1 OR rn = (n - 1) * {p} / 100 + 2" for p in PERCENTILES)
    sql = (
        "SELECT bucket, rn, n, latency_ms FROM ("  # noqa: S608
        "SELECT bucket, latency_ms, "
        "ROW_NUMBER() OVER (PARTITION BY bucket ORDER BY latency_ms) AS rn, "
        "COUNT(*) OVER (PARTITION BY bucket) AS n "
        f"FROM (SELECT {bucket_sql} AS bucket, latency_ms FROM {TABLE} "
        "WHERE created_at >= %s AND created_at <= %s AND (status_code < 400 OR status_code >= 500)) periods"
        f") ranked WHERE {wanted}"
    )
    return percentiles_from_ranks(_rows(sql, params))


def _top(group_sql: str, params: list[Any]) -> list[tuple[Any, int, Decimal]]:
    spend = _vendor_sql()["spend"]
    sql = (
        f"SELECT {group_sql}, COUNT(*), {spend} AS spend FROM {TABLE} "  # noqa: S608
        f"WHERE created_at >= %s AND created_at <= %s AND {group_sql} IS NOT NULL "
        f"GROUP BY {group_sql} HAVING {spend} > 0 ORDER BY spend DESC, {group_sql} LIMIT {TOP}"
    )
    return [(group, int(count), _credits(total)) for group, count, total in _rows(sql, params)]


def dashboard(period: str, *, now: datetime | None = None) -> Dashboard:
    """The usage of the period ending now: a point per bucket, the totals, and the top spenders."""
    length, width = PERIODS[period]
    until = now or timezone.now()
    since = until - length
    params = [_when(since), _when(until)]
    vendor = _vendor_sql()
    bucket_sql = vendor[width]
    sql = (
        f"SELECT {bucket_sql} AS bucket, COUNT(*), SUM(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END), "  # noqa: S608
        f"SUM(input_tokens), SUM(output_tokens), {vendor['spend']} FROM {TABLE} "
        "WHERE created_at >= %s AND created_at <= %s GROUP BY bucket"
    )
    points = {start: Point(start) for start in _buckets(since, until, width)}
    for bucket, requests, errors, tokens_in, tokens_out, spend in _rows(sql, params):
        point = points.setdefault(_bucket_start(bucket), Point(_bucket_start(bucket)))
        point.requests, point.errors = int(requests), int(errors or 0)
        point.input_tokens, point.output_tokens = int(tokens_in or 0), int(tokens_out or 0)
        point.spend = _credits(spend)
    for bucket, latency in _latency_percentiles(bucket_sql, params).items():
        points[_bucket_start(bucket)].latency = dict(latency)
    series = sorted(points.values(), key=lambda point: point.start)
    totals = Point(since)
    for point in series:
        totals.requests += point.requests
        totals.errors += point.errors
        totals.input_tokens += point.input_tokens
        totals.output_tokens += point.output_tokens
        totals.spend += point.spend
    totals.latency = dict(_latency_percentiles("'all'", params).get("all", {}))

    users = _top("user_id", params)
    names = dict(User.objects.filter(pk__in=[u for u, _, _ in users]).values_list("pk", "username"))
    keys = _top("api_key_id", params)
    key_rows = {k.pk: k for k in ApiKey.objects.filter(pk__in=[k for k, _, _ in keys]).select_related("owner")}
    return Dashboard(
        period=period,
        since=since,
        until=until,
        points=series,
        totals=totals,
        top_users=[Spender(names.get(u, f"user {u}"), n, s, u) for u, n, s in users],
        top_keys=[
            Spender(f"{key_rows[k].prefix}… {key_rows[k].name} ({key_rows[k].owner})" if k in key_rows else f"key {k}", n, s, k)
            for k, n, s in keys
        ],
        top_models=[Spender(m, n, s, m) for m, n, s in _top("model_alias", params)],
    )


# --- retention -------------------------------------------------------------------------------


def prune_request_log(*, now: datetime | None = None, batch_size: int = PRUNE_BATCH, max_batches: int = 200) -> int:
    """Delete request-log rows older than GATEWAY_LOG_RETENTION_DAYS, a batch per statement; returns how many.

    A batch is one short DELETE in its own transaction, so writers of new rows never wait behind
    one long delete; a run stops after `max_batches` (the next run goes on where it stopped).
    """
    days = settings.GATEWAY_LOG_RETENTION_DAYS
    if not days:
        return 0
    cutoff = (now or timezone.now()) - timedelta(days=days)
    deleted = 0
    for _ in range(max_batches):
        ids = list(
            RequestLog.objects.filter(created_at__lt=cutoff).order_by("created_at").values_list("pk", flat=True)[
                :batch_size
            ]
        )
        if not ids:
            break
        count, _ = RequestLog.objects.filter(pk__in=ids).delete()
        deleted += count
        if len(ids) < batch_size:
            break
    return deleted
