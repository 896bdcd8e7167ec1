"""Rate limits per key and per model, tokens per minute, and per-model concurrent capacity.

The counters live in memory by default and in Redis when ``REDIS_URL`` is set, so that every
gateway process shares one budget (gateway/counters.py). ``requests_per_second`` with
``burst_size`` B is a token bucket: a burst of B at once, rps on average, exactly.
``tokens_per_minute`` refuses a call while the tokens counted in the last rolling minute have
reached the limit; a call's tokens (input + output, as the upstream reported them) are counted
when it ends: :func:`count_tokens` for real-time calls, :func:`count_key_tokens` for flex calls.
A key's limits count every tier; a model's, real-time calls only (flex has ``flex_concurrency``).

Each check leaves what is left of its limits on the call, and TierRoutingMiddleware reports them in
OpenAI's ``x-ratelimit-*`` headers (:func:`add_headers`). When a key and its model both limit a
call, the headers report the tighter one: the limit with fewer requests (or tokens) remaining,
the one that resets later on a tie: the limit that will stop the client first.

Capacity (concurrent real-time calls per model) has one owner: ``async with capacity(call):``
around an upstream call takes a slot or raises :class:`AtCapacity`, and gives the slot back when
the block ends, however it ends. Queued (flex) calls take none: their claim is their slot,
counted in the database against the model's ``flex_concurrency``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from functools import cache
from typing import TYPE_CHECKING

from django.http import HttpResponse
from django.http.response import HttpResponseBase

from accounts.models import ApiKey
from gateway import errors
from gateway.call import GatewayCall, Headroom
from gateway.counters import Rate, counters

if TYPE_CHECKING:
    from gateway.accounting import CallRecord

logger = logging.getLogger(__name__)
# The clock of rates and token windows (capacity leases run on Redis's own); tests set their own.
clock = time.time


@cache
def _rate(requests_per_second: int | None, burst_size: int | None) -> Rate | None:
    if not requests_per_second:
        return None
    return Rate(float(requests_per_second), max(burst_size or requests_per_second, 1))


def _tighter(held: Headroom | None, new: Headroom | None) -> Headroom | None:
    if held is None or new is None:
        return held or new
    return min(held, new, key=lambda headroom: (headroom.remaining, -headroom.reset))


async def check_key(call: GatewayCall) -> HttpResponse | None:
    """Count the request against its key's rate, whatever its tier; return the 429 if a limit is spent."""
    key = call.key
    if not key.requests_per_second and not key.tokens_per_minute:
        return None
    rate = _rate(key.requests_per_second, key.burst_size)
    verdict = await counters().check(f"key:{key.id}", rate, key.tokens_per_minute, clock())
    call.request_headroom, call.token_headroom = verdict.requests, verdict.tokens
    if verdict.wait is None:
        return None
    return errors.key_tokens_limited(verdict.wait) if verdict.by_tokens else errors.key_rate_limited(verdict.wait)


async def check_model(call: GatewayCall) -> HttpResponse | None:
    """Count a real-time call against its model's rate; return the 429 if a limit is spent."""
    model = call.served
    if not model.requests_per_second and not model.tokens_per_minute:
        return None
    rate = _rate(model.requests_per_second, model.burst_size)
    verdict = await counters().check(f"model:{model.id}", rate, model.tokens_per_minute, clock())
    call.request_headroom = _tighter(call.request_headroom, verdict.requests)
    call.token_headroom = _tighter(call.token_headroom, verdict.tokens)
    if verdict.wait is None:
        return None
    alias = call.requested_alias
    if verdict.by_tokens:
        return errors.model_tokens_limited(alias, verdict.wait)
    return errors.model_rate_limited(alias, verdict.wait)


def count_tokens(call: GatewayCall, input_tokens: int | None, output_tokens: int | None) -> None:
    """Count a finished real-time call's tokens against its key's and its model's tokens per minute."""
    used = (input_tokens or 0) + (output_tokens or 0)
    if used <= 0:
        return
    scopes = [f"key:{call.key.id}"] if call.key.tokens_per_minute else []
    model = call.served
    if model.tokens_per_minute and call.tier == "realtime":
        scopes.append(f"model:{model.id}")
    if scopes:
        counters().count(scopes, call.request_id, used, clock())


def count_key_tokens(records: Iterable[CallRecord]) -> None:
    """Count settled flex calls' tokens against their keys' tokens per minute (sync: a worker's thread).

    Never raises: the calls are settled and charged already, and a lost count only lets a key a
    little further this minute.
    """
    used: dict[str, tuple[int, int]] = {}
    for record in records:
        tokens = (record.input_tokens or 0) + (record.output_tokens or 0)
        if record.api_key_id is not None and tokens > 0:
            used[record.request_id] = (record.api_key_id, tokens)
    if not used:
        return
    try:
        limited = set(
            ApiKey.objects.filter(
                pk__in={key_id for key_id, _ in used.values()}, tokens_per_minute__isnull=False
            ).values_list("pk", flat=True)
        )
        for request_id, (key_id, tokens) in used.items():
            if key_id in limited:
                counters().count_now([f"key:{key_id}"], request_id, tokens, clock())
    except Exception:
        logger.exception("Could not count the tokens of %d flex calls", len(used))


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: ``120ms``, ``1s``, ``1.5s``, ``6m0s``."""
    ms = math.ceil(round(seconds * 1000, 6))
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    text = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def add_headers(response: HttpResponseBase, call: GatewayCall) -> None:
    """Put what is left of the call's limits on its response, under OpenAI's x-ratelimit-* names."""
    for kind, headroom in (("requests", call.request_headroom), ("tokens", call.token_headroom)):
        if headroom is not None:
            response[f"x-ratelimit-limit-{kind}"] = str(headroom.limit)
            response[f"x-ratelimit-remaining-{kind}"] = str(headroom.remaining)
            response[f"x-ratelimit-reset-{kind}"] = duration(headroom.reset)


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

    __slots__ = ("call", "capacity", "lease", "model_id")

    def __init__(self, call: GatewayCall, model_id: int, capacity: int) -> None:
        self.call, self.model_id, self.capacity = call, model_id, capacity
        self.lease: str | None = None

    async def __aenter__(self) -> None:
        self.lease = await counters().acquire(self.model_id, self.capacity)
        if self.lease is None:
            raise AtCapacity(self.call)

    async def __aexit__(self, *exc: object) -> None:
        assert self.lease is not None
        await counters().release(self.model_id, self.lease)


_UNBOUNDED = nullcontext()


def capacity(call: GatewayCall) -> AbstractAsyncContextManager[None]:
    """Hold one of the model's concurrent-call slots for the block; raise AtCapacity when none is free."""
    model = call.served
    return _UNBOUNDED if model.capacity is None else _Slot(call, model.id, model.capacity)
