"""django-q2 tasks of the gateway: thin, sync, and safe to deliver twice."""

from __future__ import annotations

from gateway.worker import run_flex_jobs as _run

# How long the scheduled drain stays: the schedule starts one a minute (django-q2's scheduler looks
# every ~30 s and a schedule's finest step is a minute), so one runner is always polling.
DRAIN_SECONDS = 55


def run_flex_jobs() -> int:
    """Run the due flex jobs (enqueued when a job is submitted). Returns how many finished."""
    return _run()


def drain_flex_queue() -> int:
    """Scheduled: sweep, then claim due jobs twice a second (sweeping every 30 s), for about a minute."""
    return _run(lifetime=DRAIN_SECONDS, linger=True)
