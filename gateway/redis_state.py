"""What the shared Redis state (credits, limits) has in common: how its absence is reported."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)
_warned_at: dict[str, float] = {}


def warn_unreachable(what: str, exc: Exception) -> None:
    """Say that Redis is unreachable and `what` is counted in memory meanwhile: at most every ten
    seconds for each `what`, not on every call."""
    now = time.monotonic()
    if now - _warned_at.get(what, -10.0) > 10:
        _warned_at[what] = now
        logger.warning("Redis is unreachable; counting %s in this process's memory meanwhile: %s", what, exc)
