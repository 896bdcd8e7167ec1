"""Database work from the event loop: one worker-thread hop per unit, connection closed after."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import Error, close_old_connections

T = TypeVar("T")
# What a call that needs the database meets while the database is away (→ 503, see gateway.errors).
DATABASE_ERRORS = (Error,)


def _closing(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    finally:
        # Worker threads get no request_finished signal: hand the connection back (to the pool) now.
        close_old_connections()


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a sync (usually transactional) service off the event loop."""
    return await sync_to_async(_closing, thread_sensitive=False)(fn, *args, **kwargs)


def reconnect_steadily() -> None:
    """Let the PostgreSQL pool retry a lost server every half second instead of backing off
    exponentially (1, 2, 4 … s): after an outage the gateway is back within a second of the
    database, not up to half a minute later. psycopg_pool has no setting for it."""
    from psycopg_pool.base import AttemptWithBackoff

    AttemptWithBackoff.INITIAL_DELAY = 0.5
    AttemptWithBackoff.DELAY_BACKOFF = 1.0
