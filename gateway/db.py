"""Database work from the event loop: one worker-thread hop per unit, connection closed after."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

T = TypeVar("T")


def _closing(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    finally:
        # Worker threads get no request_finished signal: hand the connection back (to the pool) now.
        close_old_connections()


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a sync (usually transactional) service off the event loop."""
    return await sync_to_async(_closing, thread_sensitive=False)(fn, *args, **kwargs)
