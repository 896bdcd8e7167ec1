"""django-q2 tasks of the gateway: thin, sync, and safe to deliver twice."""

from __future__ import annotations

import logging
from typing import Any

from django_q.tasks import async_task

from gateway import usage
from gateway.worker import run_flex_jobs as _run

logger = logging.getLogger(__name__)
# How long the scheduled drain stays: the schedule starts one a minute (django-q2's scheduler looks
# every ~30 s and a schedule's finest step is a minute), so one runner is always polling.
DRAIN_SECONDS = 55


def run_flex_jobs() -> int:
    """Run the due flex jobs (enqueued when a job is submitted). Returns how many finished."""
    return _run()


def drain_flex_queue() -> int:
    """Scheduled: sweep, then claim due jobs twice a second (sweeping every 30 s), for about a minute."""
    return _run(lifetime=DRAIN_SECONDS, linger=True)


def drain_on_spawn(**kwargs: Any) -> None:
    """A qcluster worker that starts (with its cluster, or again after a crash) drains the queue at
    once, taking over the leases a dead cluster left as they lapse, instead of from the scheduler's
    first tick half a minute later (django-q2's post_spawn)."""
    try:
        async_task("gateway.tasks.drain_flex_queue", q_options={"task_name": "flex drain"})
    except Exception:  # the worker must start regardless: the scheduled drain comes within a minute
        logger.exception("Could not enqueue a flex drain as the worker started")


def prune_request_log() -> int:
    """Scheduled: delete request-log rows past GATEWAY_LOG_RETENTION_DAYS. Returns how many."""
    return usage.prune_request_log()


def roll_up_usage() -> int:
    """Scheduled: add the request-log rows written since the last run to the dashboard's hourly rollup."""
    return usage.roll_up_usage()
