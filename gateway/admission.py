"""A call's admission and its end: each one step of the counters, one round trip when they are in Redis.

Before its upstream call, a call is checked against everything that may refuse it, in this order:
its key's rate and tokens per minute, its model's (real time), its credits (paid models: 402), a
capacity slot of its model (real time). All are taken together only if all pass, so a refusal
gives nothing back (gateway.counters). A key and a model with no limits, at a free model, check
nothing at all.

When it ends, the call gives back its slot, replaces its reservation by its exact cost and counts
its tokens, in one step sent without waiting (:func:`finish`, from gateway.views.record_call, or
with nothing used when it served nothing). Its slot is given back at the latest when the block that
holds it ends (``with holding(call):``), however it ends; the slots of a process that died come
back when their leases run out.
"""

from __future__ import annotations

from types import TracebackType

from django.http import HttpResponse

from gateway import budget, limits
from gateway.call import GatewayCall, Route
from gateway.counters import Admission, Ending
from gateway.shared_counters import counters


async def admit(call: GatewayCall) -> HttpResponse | None:
    """Check and take what an authorized call needs before its upstream call; the 429 or 402 if not.

    A queued (flex) call only has to fit: it reserves its credits when a worker starts it.
    """
    checked = limits.limits_of(call)
    slot = limits.slot_of(call)
    credits = await budget.credits_for(call, hold=call.route != Route.FLEX)
    if not checked and slot is None and credits is None:
        return None
    outcome = await counters().admit(Admission(limits.clock(), checked, credits[0] if credits else None, slot))
    refusal = limits.take_verdicts(call, checked, outcome.verdicts)
    if refusal is not None:
        return refusal
    if outcome.refused == "credits":
        assert credits is not None and outcome.credit_refusal is not None
        return budget.refusal_response(call, outcome.credit_refusal, credits[1])
    if outcome.refused == "capacity":
        return limits.at_capacity(call)
    if credits is not None:
        budget.take_hold(call, credits[0])
    if slot is not None:
        assert outcome.lease is not None
        call.slot = (slot[0], outcome.lease)
    return None


def finish(call: GatewayCall, tokens: tuple[int | None, int | None] = (None, None), *, billed: bool = True) -> int:
    """End a call: give back its slot, replace its reservation by the exact cost of the tokens it
    used (none, or not `billed`: nothing), count its tokens; returns that cost in nano-credits.
    Once only: a call that was finished gives nothing back again."""
    charged, moves = budget.settle(call, tokens if billed else (None, None))
    used = (tokens[0] or 0) + (tokens[1] or 0)
    scopes = limits.token_scopes(call) if used > 0 else []
    slot, call.slot = call.slot, None
    if slot is not None or moves or scopes:
        counters().end(Ending(slot, moves, scopes, call.request_id, used, limits.clock()))
    return charged


class holding:
    """Give the call's slot back when the block ends, if the call was not finished in it."""

    __slots__ = ("call",)

    def __init__(self, call: GatewayCall) -> None:
        self.call = call

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        call = self.call
        slot, call.slot = call.slot, None
        if slot is not None:
            counters().end(Ending(slot))
