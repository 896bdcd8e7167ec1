"""Rate limits per key and per model, and per-model concurrent capacity.

Rates use the `limits` library: in memory by default, in Redis when ``REDIS_URL`` is set so
every gateway process shares one budget. ``requests_per_second`` with ``burst_size`` B is a
sliding window of B requests per B/rps seconds: a burst of B at once, rps on average.
Capacity (concurrent real-time calls per model) is counted per process.
"""

from __future__ import annotations

import math
import time
from functools import cache
from typing import TYPE_CHECKING

from django.conf import settings
from django.http import HttpResponse
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from gateway.errors import openai_error

if TYPE_CHECKING:
    from gateway.middleware import GatewayCall

_in_flight: dict[int, int] = {}


@cache
def _limiter() -> SlidingWindowCounterRateLimiter:
    if settings.REDIS_URL:
        uri = "async+" + settings.REDIS_URL
        storage = storage_from_string(uri, implementation="redispy", key_prefix=f"{settings.REDIS_PREFIX}:limits")
    else:
        storage = MemoryStorage()
    return SlidingWindowCounterRateLimiter(storage)


@cache
def _rate(requests_per_second: int, burst_size: int | None) -> RateLimitItemPerSecond:
    burst = max(burst_size or requests_per_second, 1)
    return RateLimitItemPerSecond(burst, max(1, math.ceil(burst / requests_per_second)))


async def _over(scope: str, identifier: int, requests_per_second: int | None, burst: int | None) -> float | None:
    """Count one request; return seconds to wait if the budget is spent, else None."""
    if not requests_per_second:
        return None
    item = _rate(requests_per_second, burst)
    limiter = _limiter()
    if await limiter.hit(item, scope, str(identifier)):
        return None
    stats = await limiter.get_window_stats(item, scope, str(identifier))
    return max(stats.reset_time - time.time(), 0.0)


def _too_many(message: str, wait: float, code: str) -> HttpResponse:
    return openai_error(429, message, code=code, headers={"Retry-After": str(max(1, math.ceil(wait)))})


async def check_key(call: GatewayCall) -> HttpResponse | None:
    """Count the request against its key's rate, whatever its tier; return the 429 if it is spent."""
    key = call.key
    wait = await _over("key", key.id, key.requests_per_second, key.burst_size)
    if wait is None:
        return None
    return _too_many("Rate limit reached for this API key. Please slow down.", wait, "rate_limit_exceeded")


async def acquire(call: GatewayCall) -> HttpResponse | None:
    """Take a real-time slot on the model (its rate and its capacity), or return the 429 that refuses it.

    Queued (flex) calls take none: their model's flex_concurrency bounds them in the workers.
    """
    model = call.model
    assert model is not None
    wait = await _over("model", model.id, model.requests_per_second, model.burst_size)
    if wait is not None:
        return _too_many(
            f"Rate limit reached for '{call.requested_alias}'. Please slow down.", wait, "rate_limit_exceeded"
        )
    if model.capacity is not None:
        if _in_flight.get(model.id, 0) >= model.capacity:
            return _too_many(
                f"'{call.requested_alias}' is at capacity. Please retry shortly.", 1.0, "model_at_capacity"
            )
        _in_flight[model.id] = _in_flight.get(model.id, 0) + 1
        call.holds_capacity = True
    return None


def release(call: GatewayCall) -> None:
    """Give back the call's capacity slot, once."""
    if call.holds_capacity and call.model is not None:
        call.holds_capacity = False
        _in_flight[call.model.id] -= 1
