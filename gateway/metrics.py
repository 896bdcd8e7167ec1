"""Prometheus series the gateway keeps in memory: what every /ai/ answer, charge, snapshot build and
flush round adds to them. Served by gateway.exposition at /metrics when ``GATEWAY_METRICS`` is on.

Names follow the OpenTelemetry GenAI conventions where one exists (``gen_ai.server.request.duration``
→ ``gen_ai_server_request_duration_seconds``, ``gen_ai.client.token.usage`` → ``gen_ai_client_token_usage``);
the gateway's own series start with ``dwctl_``. Labels come only from bounded sets — a model the
snapshot knows (never the alias a client sent), a tier, a status — so refusals cannot grow them.

With several processes (``PROMETHEUS_MULTIPROC_DIR`` set before the process starts, as
scripts/serve.sh does) prometheus_client keeps every value in a memory-mapped file of its process,
and a scrape adds the files up. Either way an observation is an in-memory write (bench/metrics_cost.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

# OpenTelemetry's advice for gen_ai.server.request.duration, with two finer buckets first: refusals
# are answered in well under 10 ms.
DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
FIRST_BYTE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

request_duration = Histogram(
    "gen_ai_server_request_duration_seconds",
    "Every /ai/ answer, refusals included, from its arrival to its last byte; _count is the request count.",
    ["model", "tier", "status"],
    buckets=DURATION_BUCKETS,
)
first_byte = Histogram(
    "dwctl_upstream_time_to_first_byte_seconds",
    "Time from sending a model call upstream to the upstream's first byte (for a stream, its first event).",
    ["model", "tier"],
    buckets=FIRST_BYTE_BUCKETS,
)
token_usage = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per model call as the upstream reported them; _sum is the total.",
    ["model", "tier", "token_type"],
    buckets=TOKEN_BUCKETS,
)
upstream_errors = Counter(
    "dwctl_upstream_errors",
    "Model calls answered with a server error, by endpoint: 502 unreachable, 504 too slow, else the upstream's "
    "own status (a 500 or 503 may also be the gateway's: an internal error, the database away).",
    ["endpoint", "status"],
)
credits_charged = Counter(
    "dwctl_credits_charged",
    "Credits charged for model calls, counted when the usage writer commits the charge.",
    ["model", "tier"],
)
snapshot_rebuild = Histogram(
    "dwctl_auth_snapshot_rebuild_seconds", "Time to build the auth snapshot from the database."
)
# Per process (a process that imports this module but runs no snapshot watcher, a flex worker, must not
# show up as a snapshot checked at 0): the age of the stalest is time() - min(...).
snapshot_checked = Gauge(
    "dwctl_auth_snapshot_checked_timestamp_seconds",
    "When this process's auth snapshot was last known current; its age is time() minus this.",
    ["process"],
    multiprocess_mode="livemax",
)
journal_backlog = Gauge(
    "dwctl_journal_backlog_segments",
    "Journal segments of finished calls not yet written to the database, as of each flush round.",
    multiprocess_mode="livesum",
)

# Label children by their values: a dict lookup instead of prometheus_client's validation and lock.
_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def observe_call(
    model: str,
    tier: str,
    status: int,
    seconds: float,
    *,
    ttfb_ms: float | None = None,
    tokens: tuple[int | None, int | None] = (None, None),
    endpoint: str = "",
) -> None:
    """Count one /ai/ answer: its duration by model, tier and status; a model call's first byte,
    tokens and (by endpoint) server error. `model` is "" when no model was resolved."""
    if not settings.GATEWAY_METRICS:
        return
    _child(request_duration, model, tier, str(status)).observe(seconds)
    if ttfb_ms is not None:
        _child(first_byte, model, tier).observe(ttfb_ms / 1000)
    if tokens[0] is not None:
        _child(token_usage, model, tier, "input").observe(tokens[0])
        _child(token_usage, model, tier, "output").observe(tokens[1] or 0)
    if endpoint and status >= 500:
        _child(upstream_errors, endpoint, str(status)).inc()


def count_credits(charges: list[tuple[str, str, float]]) -> None:
    """Add committed charges, each (model, tier, credits)."""
    if not settings.GATEWAY_METRICS:
        return
    for model, tier, credits in charges:
        _child(credits_charged, model, tier).inc(credits)


def observe_snapshot_build(started: float) -> None:
    """A snapshot built now, begun at `started` (time.perf_counter())."""
    if settings.GATEWAY_METRICS:
        snapshot_rebuild.observe(time.perf_counter() - started)
        snapshot_is_current()


def snapshot_is_current() -> None:
    if settings.GATEWAY_METRICS:
        _child(snapshot_checked, str(os.getpid())).set(time.time())


def set_journal_backlog(segments: int) -> None:
    if settings.GATEWAY_METRICS:
        journal_backlog.set(segments)


def process_stopped() -> None:
    """Drop this process's live gauges (its snapshot age, its backlog) from what a scrape adds up."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
