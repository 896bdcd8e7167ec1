"""Rate limits per key and per model, and per-model concurrent capacity.

Rates use the `limits` library: in memory by default, in Redis when ``REDIS_URL`` is set so
every gateway process shares one budget. ``requests_per_second`` with ``burst_size`` B is a
sliding window of B requests per B/rps seconds: a burst of B at once, rps on average.

Capacity (concurrent real-time calls per model, counted per process) has one owner:
``async with capacity(call):`` around an upstream call takes a slot or raises :class:`AtCapacity`,
and gives the slot back when the block ends, however it ends. Queued (flex) calls take none:
their claim is their slot, counted in the database against the model's ``flex_concurrency``.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from functools import cache

from django.conf import settings
from django.http import HttpResponse
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from gateway import errors
from gateway.call import GatewayCall

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


async def check_key(call: GatewayCall) -> HttpResponse | None:
    """Count the request against its key's rate, whatever its tier; return the 429 if it is spent."""
    key = call.key
    wait = await _over("key", key.id, key.requests_per_second, key.burst_size)
    return None if wait is None else errors.key_rate_limited(wait)


async def check_model(call: GatewayCall) -> HttpResponse | None:
    """Count a real-time call against its model's rate; return the 429 if it is spent."""
    model = call.served
    wait = await _over("model", model.id, model.requests_per_second, model.burst_size)
    return None if wait is None else errors.model_rate_limited(call.requested_alias, wait)


class AtCapacity(Exception):
    """Every concurrent-call slot of the model is taken (→ 429)."""

    def __init__(self, call: GatewayCall) -> None:
        super().__init__(call.requested_alias)
        self.alias = call.requested_alias

    def response(self) -> HttpResponse:
        return errors.model_at_capacity(self.alias)


class _Slot:
    """One concurrent-call slot of a model, held for an `async with` block (a class, not a generator:
    it is entered on every call)."""

    __slots__ = ("call", "capacity", "model_id")

    def __init__(self, call: GatewayCall, model_id: int, capacity: int) -> None:
        self.call, self.model_id, self.capacity = call, model_id, capacity

    async def __aenter__(self) -> None:
        if _in_flight.get(self.model_id, 0) >= self.capacity:
            raise AtCapacity(self.call)
        _in_flight[self.model_id] = _in_flight.get(self.model_id, 0) + 1

    async def __aexit__(self, *exc: object) -> None:
        _in_flight[self.model_id] -= 1


_UNBOUNDED = nullcontext()


def capacity(call: GatewayCall) -> AbstractAsyncContextManager[None]:
    """Hold one of the model's concurrent-call slots for the block; raise AtCapacity when none is free."""
    model = call.served
    return _UNBOUNDED if model.capacity is None else _Slot(call, model.id, model.capacity)
