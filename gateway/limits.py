"""Rate limits per key and per model, tokens per minute, and per-model concurrent capacity: what
a call counts against (checked and taken with its credits in one step, gateway.admission).

The counters live in memory by default and in Redis when ``REDIS_URL`` is set, so that every
gateway process shares one budget (gateway/counters.py). ``requests_per_second`` with
``burst_size`` B is a token bucket: a burst of B at once, rps on average, exactly.
``tokens_per_minute`` refuses a call while the tokens counted in the last rolling minute have
reached the limit; a call's tokens (input + output, as the upstream reported them) are counted
when it ends: in its ending for real-time calls (:func:`token_scopes`), by :func:`count_key_tokens`
for flex calls. A key's limits count every tier; a model's, real-time calls only (flex has
``flex_concurrency``).

The checks leave what is left of the limits on the call, and TierRoutingMiddleware reports them in
OpenAI's ``x-ratelimit-*`` headers (:func:`add_headers`). When a key and its model both limit a
call, the headers report the tighter one: the limit with fewer requests (or tokens) remaining,
the one that resets later on a tie: the limit that will stop the client first.

Capacity (concurrent real-time calls per model) is a slot taken when the call is admitted and given
back when it ends (gateway.admission). Queued (flex) calls take none: their claim is their slot,
counted in the database against the model's ``flex_concurrency``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING

from django.http import HttpResponse
from django.http.response import HttpResponseBase

from accounts.models import ApiKey
from gateway import errors
from gateway.call import GatewayCall, Headroom
from gateway.counters import Limit, Rate, Verdict
from gateway.shared_counters import counters

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


def limits_of(call: GatewayCall) -> list[Limit]:
    """The limits a call counts against: its key's, whatever its tier, and its model's in real time."""
    found = []
    key = call.key
    if key.requests_per_second or key.tokens_per_minute:
        found.append(Limit(f"key:{key.id}", _rate(key.requests_per_second, key.burst_size), key.tokens_per_minute))
    model = call.served
    if call.tier == "realtime" and (model.requests_per_second or model.tokens_per_minute):
        rate = _rate(model.requests_per_second, model.burst_size)
        found.append(Limit(f"model:{model.id}", rate, model.tokens_per_minute))
    return found


def slot_of(call: GatewayCall) -> tuple[int, int] | None:
    """The model's concurrent-call slots a real-time call takes one of: (model id, capacity)."""
    model = call.served
    return None if model.capacity is None or call.tier != "realtime" else (model.id, model.capacity)


def take_verdicts(call: GatewayCall, limits: list[Limit], verdicts: list[Verdict]) -> HttpResponse | None:
    """Leave what the checked limits have left on the call (the tighter of two), and return the 429
    of the one that refused it, if one did."""
    for verdict in verdicts:
        call.request_headroom = _tighter(call.request_headroom, verdict.requests)
        call.token_headroom = _tighter(call.token_headroom, verdict.tokens)
    last = verdicts[-1] if verdicts else None
    if last is None or last.wait is None:
        return None
    if limits[len(verdicts) - 1].scope.startswith("key:"):
        return errors.key_tokens_limited(last.wait) if last.by_tokens else errors.key_rate_limited(last.wait)
    if last.by_tokens:
        return errors.model_tokens_limited(call.requested_alias, last.wait)
    return errors.model_rate_limited(call.requested_alias, last.wait)


def at_capacity(call: GatewayCall) -> HttpResponse:
    return errors.model_at_capacity(call.requested_alias)


def token_scopes(call: GatewayCall) -> list[str]:
    """The minutes a finished call's tokens are counted in: its key's, and its model's in real time."""
    scopes = [f"key:{call.key.id}"] if call.key.tokens_per_minute else []
    model = call.served
    if model.tokens_per_minute and call.tier == "realtime":
        scopes.append(f"model:{model.id}")
    return scopes


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
