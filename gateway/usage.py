"""What the request log adds up to: the usage dashboard's figures, a user's or key's spend, and retention.

The dashboard reads `UsageRollup`: the log added up by hour (all calls, and per user, key and model),
rebuilt every minute for the hours that got new rows (`roll_up_usage`, a django-q2 schedule), so a
30-day page reads hundreds of rows however many calls there were. A user's or key's spend today and
this month is read from the log itself (an index on owner and time), current to the last flush.

Two things the ORM does not give alike on both databases are written in SQL here:

- exact spend: SQLite keeps a decimal as a REAL, and summing REALs drifts; the sum is taken in
  integer nano-credits there (a cost has 9 decimals, well inside a double's precision), in NUMERIC
  on PostgreSQL, and the rollup keeps nano-credits — every figure comes back as an exact `Decimal`;
- percentiles: percentiles do not add up across hours, so the rollup keeps a latency histogram
  (bins 2 % wide) per hour, and p50/p99 are `percentile_cont`'s interpolation over it: within 1 % of
  the exact figure, the same on both databases (`percentile_cont` exists on PostgreSQL only).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Max, Min, Sum
from django.utils import timezone

from accounts.models import ApiKey, User
from gateway.models import RequestLog, UsageRollup, UsageRollupMark

logger = logging.getLogger(__name__)
TABLE = RequestLog._meta.db_table
NANO_PER_CREDIT = 10**9
# The dashboard's periods: how far back, and the width of a point on its charts.
PERIODS: dict[str, tuple[timedelta, str]] = {
    "24h": (timedelta(hours=24), "hour"),
    "7d": (timedelta(days=7), "hour"),
    "30d": (timedelta(days=30), "day"),
}
PERCENTILES = (50, 99)
# Latency histogram bins of the rollup: each 2 % wider than the last, from 0.01 ms up.
LATENCY_BIN = 1.02
TOP = 10
PRUNE_BATCH = 5000
ROLLUP_MARGIN = 10_000
ROLLUP_STEP = 200_000


def _spend_sql() -> str:
    """Credits summed exactly: NUMERIC on PostgreSQL; nano-credit integers on SQLite (it keeps decimals as REALs)."""
    if connection.vendor == "postgresql":
        return "SUM(cost)"
    return f"SUM(CAST(ROUND(cost * {NANO_PER_CREDIT}) AS INTEGER))"


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
    spend = _spend_sql()
    today_spend = spend.replace("cost", "CASE WHEN created_at >= %s THEN cost END")
    sql = (
        f"SELECT COUNT(*), SUM(CASE WHEN created_at >= %s THEN 1 ELSE 0 END), {spend}, {today_spend} "  # noqa: S608
        f"FROM {TABLE} WHERE {column} = %s AND created_at >= %s AND created_at <= %s"
    )
    [(month_count, day_count, month_total, day_total)] = _rows(
        sql, [_when(day), _when(day), value, _when(month), _when(now)]
    )
    return Spend(int(day_count or 0), _credits(day_total), int(month_count or 0), _credits(month_total))


# --- the rollup: the request log by hour ---------------------------------------------------------


def _rollup_sql() -> dict[str, str]:
    if connection.vendor == "postgresql":
        return {
            "spend_nano": f"CAST(SUM(cost) * {NANO_PER_CREDIT} AS BIGINT)",
            "hour": "date_trunc('hour', created_at)",
            "empty_json": "CAST('{}' AS jsonb)",
            "bin": f"CAST(floor(ln(greatest(latency_ms, 0.01)) / ln({LATENCY_BIN})) AS INTEGER)",
        }
    return {
        "spend_nano": _spend_sql(),
        "hour": "substr(created_at, 1, 13) || ':00:00'",
        "empty_json": "'{}'",
        "bin": f"CAST(floor(ln(max(latency_ms, 0.01)) / ln({LATENCY_BIN})) AS INTEGER)",
    }


# What a rollup row is about, and the request-log expression that gives its `value`.
DIMENSIONS = {
    "all": "''",
    "user": "CAST(user_id AS VARCHAR(20))",
    "key": "CAST(api_key_id AS VARCHAR(20))",
    "model": "model_alias",
}
ANSWERED = "(status_code < 400 OR status_code >= 500)"  # 4xx refusals are the gateway's own, quick answers


def _roll_up_hour(hour: datetime) -> None:
    """Rebuild every rollup row of one hour from the request log (the caller holds a transaction)."""
    sql = _rollup_sql()
    table = UsageRollup._meta.db_table
    span = [_when(hour), _when(hour + timedelta(hours=1))]
    with connection.cursor() as cursor:
        for dimension, value in DIMENSIONS.items():
            cursor.execute(f"DELETE FROM {table} WHERE dimension = %s AND hour = %s", [dimension, _when(hour)])  # noqa: S608
            cursor.execute(
                f"INSERT INTO {table} (hour, dimension, value, requests, errors, input_tokens, "  # noqa: S608
                "output_tokens, spend_nano, latency_bins) "
                f"SELECT %s, '{dimension}', {value}, COUNT(*), "
                "SUM(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END), COALESCE(SUM(input_tokens), 0), "
                f"COALESCE(SUM(output_tokens), 0), COALESCE({sql['spend_nano']}, 0), {sql['empty_json']} "
                f"FROM {TABLE} WHERE created_at >= %s AND created_at < %s AND {value} IS NOT NULL "
                + ("HAVING COUNT(*) > 0" if dimension == "all" else f"GROUP BY {value}"),
                [_when(hour), *span],
            )
        cursor.execute(
            f"SELECT {sql['bin']} AS bin, COUNT(*) FROM {TABLE} "  # noqa: S608
            f"WHERE created_at >= %s AND created_at < %s AND {ANSWERED} GROUP BY bin",
            span,
        )
        bins = {str(b): int(n) for b, n in cursor.fetchall()}
    if bins:
        UsageRollup.objects.filter(hour=hour, dimension="all").update(latency_bins=bins)


def roll_up_usage(*, margin: int = ROLLUP_MARGIN, step: int = ROLLUP_STEP) -> int:
    """Rebuild the rollup of every hour that has request-log rows written since the last run; returns
    how many hours.

    Rows are found by id: every row above the last id read, less `margin` — ids are handed out as
    rows are inserted, and a batch that took its ids earlier may commit a moment later.
    """
    mark, _ = UsageRollupMark.objects.get_or_create(name="request_log")
    ids = RequestLog.objects.aggregate(first=Min("id"), top=Max("id"))
    if ids["top"] is None:
        return 0
    top, start = ids["top"], max(mark.last_id, ids["first"] - 1)
    hour_sql = _rollup_sql()["hour"]
    # A run takes at most `step` new ids, so a first run over a long log ends inside the task's
    # timeout and the next one goes on from there.
    upto = min(top, start + step)
    touched = [
        row[0]
        for row in _rows(
            f"SELECT DISTINCT {hour_sql} FROM {TABLE} WHERE id > %s AND id <= %s",  # noqa: S608
            [start - margin, upto],
        )
    ]
    for bucket in touched:
        hour = bucket if isinstance(bucket, datetime) else _bucket_start(str(bucket)[:13])
        try:
            with transaction.atomic():
                _roll_up_hour(hour.astimezone(UTC))
        except IntegrityError:
            # A run still going from the minute before rebuilds this hour at the same moment: its
            # rows are as good as ours (the unique constraint let only one of us write them).
            logger.info("The usage rollup of %s was being rebuilt by another run", hour)
    UsageRollupMark.objects.filter(pk=mark.pk).update(last_id=upto)
    return len(touched)


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
    bins: Counter[int] = field(default_factory=Counter)

    def add(self, row: UsageRollup) -> None:
        self.requests += row.requests
        self.errors += row.errors
        self.input_tokens += row.input_tokens
        self.output_tokens += row.output_tokens
        self.spend += Decimal(row.spend_nano) / NANO_PER_CREDIT
        self.bins.update({int(b): n for b, n in row.latency_bins.items()})


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
    return datetime.strptime(text, fmt).replace(tzinfo=UTC)


def _truncate(moment: datetime, width: str) -> datetime:
    moment = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if width == "day" else moment


def percentiles_from_bins(bins: Counter[int]) -> dict[int, float | None]:
    """`percentile_cont` over a latency histogram: each call taken at its bin's geometric middle, so a
    figure is within half a bin (1 %) of the exact one."""
    size = sum(bins.values())
    if not size:
        return {p: None for p in PERCENTILES}
    ordered = sorted(bins.items())

    def at(index: int) -> float:
        seen = 0
        for b, count in ordered:
            seen += count
            if index < seen:
                return float(LATENCY_BIN ** (b + 0.5))
        return float(LATENCY_BIN ** (ordered[-1][0] + 0.5))

    out: dict[int, float | None] = {}
    for p in PERCENTILES:
        position = (size - 1) * p / 100
        low = math.floor(position)
        below, above = at(low), at(min(low + 1, size - 1))
        out[p] = below + (position - low) * (above - below)
    return out


def _top(dimension: str, since: datetime, until: datetime) -> list[tuple[str, int, Decimal]]:
    rows = (
        UsageRollup.objects.filter(dimension=dimension, hour__gte=since, hour__lte=until)
        .values("value")
        .annotate(calls=Sum("requests"), spent=Sum("spend_nano"))
        .filter(spent__gt=0)
        .order_by("-spent", "value")[:TOP]
    )
    return [(row["value"], int(row["calls"]), Decimal(row["spent"]) / NANO_PER_CREDIT) for row in rows]


def dashboard(period: str, *, now: datetime | None = None) -> Dashboard:
    """The usage of the period ending now (from its first whole hour): a point per bucket, the totals,
    and the top spenders — read from the rollup, so as fresh as its last run (a minute)."""
    length, width = PERIODS[period]
    until = now or timezone.now()
    since = _truncate(until - length, "hour")
    step = timedelta(hours=1) if width == "hour" else timedelta(days=1)
    points: dict[datetime, Point] = {}
    start = _truncate(since, width)
    while start <= until:
        points[start] = Point(start)  # a quiet hour is a zero on the chart, not a gap
        start += step
    totals = Point(since)
    for row in UsageRollup.objects.filter(dimension="all", hour__gte=since, hour__lte=until):
        points[_truncate(row.hour, width)].add(row)
        totals.add(row)
    series = list(points.values())
    for point in [*series, totals]:
        point.latency = percentiles_from_bins(point.bins)

    users = _top("user", since, until)
    names = dict(User.objects.filter(pk__in=[int(u) for u, _, _ in users]).values_list("pk", "username"))
    keys = _top("key", since, until)
    found = ApiKey.objects.filter(pk__in=[int(k) for k, _, _ in keys]).select_related("owner")
    key_names = {str(k.pk): f"{k.prefix}… {k.name} ({k.owner})" for k in found}
    return Dashboard(
        period=period,
        since=since,
        until=until,
        points=series,
        totals=totals,
        top_users=[Spender(names.get(int(u), f"user {u}"), n, s, int(u)) for u, n, s in users],
        top_keys=[Spender(key_names.get(k, f"key {k}"), n, s, int(k)) for k, n, s in keys],
        top_models=[Spender(m, n, s, m) for m, n, s in _top("model", since, until)],
    )


# --- retention -------------------------------------------------------------------------------


def prune_request_log(*, now: datetime | None = None, batch_size: int = PRUNE_BATCH, max_batches: int = 200) -> int:
    """Delete request-log rows older than GATEWAY_LOG_RETENTION_DAYS, a batch per statement, and the
    rollup of their hours; returns how many log rows.

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
            RequestLog.objects.filter(created_at__lt=cutoff)
            .order_by("created_at")
            .values_list("pk", flat=True)[:batch_size]
        )
        if not ids:
            break
        count, _ = RequestLog.objects.filter(pk__in=ids).delete()
        deleted += count
        if len(ids) < batch_size:
            break
    # The rollup of those hours goes with them (a few hundred rows an hour at most).
    UsageRollup.objects.filter(hour__lt=cutoff - timedelta(hours=1)).delete()
    return deleted
