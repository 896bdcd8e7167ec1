"""The counters of gateway.counters in Redis, shared by every gateway process, and the choice between
them and this process's memory (:func:`counters`).

An admission is one Lua script (gateway/scripts.py) and so is an ending; the slots held from an
event loop are renewed from it. While Redis cannot be reached, each operation falls back to memory.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import uuid
from dataclasses import replace
from functools import cache
from typing import Any

import redis
from django.conf import settings

from gateway import scripts
from gateway.counters import (
    TOKEN_WINDOW_SECONDS,
    Admission,
    Counters,
    Ending,
    MemoryCounters,
    OneAtATime,
    Outcome,
    Verdict,
    requests_left,
    tokens_left,
)
from gateway.ledger_cache import ACCOUNT_TTL_SECONDS, PROCESS, RedisCache, Refusal, ledger_cache
from gateway.redis_state import warn_unreachable
from gateway.redis_wire import Wire

logger = logging.getLogger(__name__)


class Script:
    """A Lua script, sent by its SHA1 (Redis keeps what it ran), and whole when Redis has forgotten it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text, self.sha = text, hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis names scripts so


ADMIT, FINISH, RENEW = Script(scripts.ADMIT), Script(scripts.FINISH), Script(scripts.RENEW)


class _Link:
    """One event loop's connection to Redis (gateway.redis_wire), the slots held from it, and the
    task renewing them. The scripts run in one turn of the loop go to Redis in one write."""

    def __init__(self, url: str) -> None:
        self.wire = Wire(url)
        self.held: dict[str, set[str]] = {}
        self.renewer: asyncio.Task[None] | None = None
        self.pending: set[asyncio.Future[Any]] = set()  # endings sent and not yet answered

    def run(self, script: Script, keys: list[str], args: list[Any], *, later: bool = False) -> asyncio.Future[Any]:
        """Run the script; the future has its answer or its RedisError. `later`: sent a turn of the
        loop later, after what this turn writes to clients (an ending: its answer goes out first)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        if later:
            loop.call_soon(self._send, script, keys, args, answer)
        else:
            self._send(script, keys, args, answer)
        return answer

    def _send(self, script: Script, keys: list[str], args: list[Any], answer: asyncio.Future[Any]) -> None:
        sent = self.wire.call("EVALSHA", script.sha, len(keys), *keys, *args)
        sent.add_done_callback(functools.partial(self._answered, script, keys, args, answer))

    def _answered(
        self, script: Script, keys: list[str], args: list[Any], answer: asyncio.Future[Any], sent: asyncio.Future[Any]
    ) -> None:
        if answer.cancelled():
            return
        error = sent.exception()
        if isinstance(error, redis.exceptions.NoScriptError):  # Redis restarted: send the script whole
            whole = self.wire.call("EVAL", script.text, len(keys), *keys, *args)
            whole.add_done_callback(lambda done: _pass_on(done, answer))
            return
        _pass_on(sent, answer)

    async def keep_leases(self) -> None:
        """Renew this loop's leases a few times per lease, so that only a process that died loses its slots."""
        while True:
            await asyncio.sleep(_lease_ms() / 3000)
            await self.renew_leases()

    async def renew_leases(self) -> None:
        lease_ms = _lease_ms()
        for key, slots in list(self.held.items()):
            try:
                await self.run(RENEW, [key], [lease_ms, *slots])
            except redis.RedisError:
                logger.warning("Could not renew the capacity leases of %s", key, exc_info=True)


def _pass_on(done: asyncio.Future[Any], answer: asyncio.Future[Any]) -> None:
    if answer.cancelled():
        return
    error = done.exception()
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(done.result())


def _lease_ms() -> int:
    return max(1, round(settings.GATEWAY_CAPACITY_LEASE_SECONDS * 1000))


class RedisCounters(OneAtATime):
    """The counters in Redis, so that every process shares them, with the credit accounts of
    `credits` (gateway.ledger_cache). While Redis cannot be reached, each operation falls back to
    this process's memory: calls keep being served, limited per process."""

    def __init__(self, url: str, prefix: str, credits: RedisCache | None = None) -> None:
        self.url, self.prefix = url, f"{prefix}:limits"
        self.credit_prefix, self.credit_leases = (credits.prefix, credits.lease) if credits else ("", "")
        self.local = MemoryCounters(credits.local if credits else None)
        self._links: dict[asyncio.AbstractEventLoop, _Link] = {}
        self._sync_finish: redis.commands.core.Script | None = None
        self._slot_ids = itertools.count()
        self._process = uuid.uuid4().hex[:12]

    def _link(self) -> _Link:
        # A client belongs to the event loop it connected on; tests and workers run loops of their own.
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is None:
            # Not a weak mapping: a link's renewing task refers to its loop, so it would never let go.
            for closed in [other for other in self._links if other.is_closed()]:
                del self._links[closed]
            link = self._links[loop] = _Link(self.url)
        return link

    def _keys(self, scope: str) -> list[str]:
        base = f"{self.prefix}:{scope}"
        return [f"{base}:rate", f"{base}:tokens", f"{base}:used"]

    def _slots_key(self, model_id: int) -> str:
        return f"{self.prefix}:capacity:{model_id}"

    async def admit(self, admission: Admission) -> Outcome:
        keys: list[str] = []
        args: list[str | int | float] = [repr(admission.now), TOKEN_WINDOW_SECONDS, len(admission.limits)]
        for limit in admission.limits:
            keys += self._keys(limit.scope)
            rate = limit.rate
            args += [rate.per_second, rate.burst] if rate is not None else [0, 0]
            args.append(limit.tokens_per_minute or 0)
        slot, lease = admission.slot, ""
        if slot is not None:
            keys.append(self._slots_key(slot[0]))
            lease = f"{self._process}:{next(self._slot_ids)}"
        args += [slot[1] if slot is not None else 0, _lease_ms(), lease]
        credits = admission.credits
        seeds = credits.seeds if credits is not None else []
        keys += [self.credit_prefix + seed.account for seed in seeds]
        args += [PROCESS, self.credit_leases, credits.nanos if credits else 0, credits.need if credits else 0]
        args += [ACCOUNT_TTL_SECONDS, len(seeds)]
        for seed in seeds:
            args += [seed.version, seed.base]
        link = self._link()
        try:
            answer = await link.run(ADMIT, keys, args)
        except redis.RedisError as exc:
            warn_unreachable("limits and credits", exc)
            return self.local.admit_now(admission)
        verdicts = []
        for index, limit in enumerate(admission.limits[: (len(answer) - 3) // 5]):
            wait, by_tokens, level, used, reset = answer[3 + 5 * index : 8 + 5 * index]
            rate, tokens_per_minute = limit.rate, limit.tokens_per_minute
            verdicts.append(
                Verdict(
                    None if float(wait) < 0 else float(wait),
                    by_tokens == 1,
                    requests_left(rate, float(level)) if rate is not None else None,
                    tokens_left(tokens_per_minute, int(used), float(reset)) if tokens_per_minute else None,
                )
            )
        refused = int(answer[0])
        if refused > 0:
            return Outcome(verdicts, "limit")
        if refused == -1:
            return Outcome(verdicts, "credits", Refusal(seeds[int(answer[1]) - 1].account, int(float(answer[2]))))
        if refused == -2:
            return Outcome(verdicts, "capacity")
        if slot is not None:
            self._hold(link, self._slots_key(slot[0]), lease)
        return Outcome(verdicts, lease=lease if slot is not None else None)

    def _hold(self, link: _Link, key: str, lease: str) -> None:
        link.held.setdefault(key, set()).add(lease)
        if link.renewer is None or link.renewer.done():
            link.renewer = asyncio.get_running_loop().create_task(link.keep_leases())

    def _finish_call(self, ending: Ending) -> tuple[list[str], list[str | int | float]]:
        keys: list[str] = []
        lease = ""
        if ending.slot is not None and ending.slot[1]:
            keys.append(self._slots_key(ending.slot[0]))
            lease = ending.slot[1]
        args: list[str | int | float] = [lease, PROCESS, ACCOUNT_TTL_SECONDS, len(ending.moves)]
        for account, reserved, recorded in ending.moves:
            keys.append(self.credit_prefix + account)
            args += [reserved, recorded]
        for scope in ending.scopes:
            keys += self._keys(scope)[1:]
        args += [repr(ending.now), f"{ending.member}:{ending.tokens}", ending.tokens, TOKEN_WINDOW_SECONDS]
        return keys, args

    def end(self, ending: Ending) -> None:
        link = self._link()
        self._let_go(link, ending)  # no longer renewed, whatever happens next
        keys, args = self._finish_call(ending)
        if keys:
            sent = link.run(FINISH, keys, args, later=True)
            link.pending.add(sent)
            sent.add_done_callback(lambda _: link.pending.discard(sent))
            sent.add_done_callback(lambda _: self._ended(sent, ending))

    def _ended(self, sent: asyncio.Future[Any], ending: Ending) -> None:
        error = None if sent.cancelled() else sent.exception()
        if isinstance(error, redis.RedisError):
            warn_unreachable("limits and credits", error)  # a slot taken in Redis comes back with its lease
            self.local.end(replace(ending, slot=None))

    async def finish(self, ending: Ending) -> None:
        link = self._link()
        self._let_go(link, ending)
        keys, args = self._finish_call(ending)
        if keys:
            sent = link.run(FINISH, keys, args)
            await asyncio.wait([sent])
            self._ended(sent, ending)

    def _let_go(self, link: _Link, ending: Ending) -> None:
        if ending.slot is None:
            return
        model_id, lease = ending.slot
        if not lease:  # a slot of this process's memory, taken while Redis was away
            self.local.end(Ending(slot=ending.slot))
            return
        key = self._slots_key(model_id)
        held = link.held.get(key)
        if held is not None:
            held.discard(lease)
            if not held:
                del link.held[key]

    def count_now(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        if self._sync_finish is None:
            self._sync_finish = redis.Redis.from_url(self.url).register_script(scripts.FINISH)
        keys, args = self._finish_call(Ending(scopes=scopes, member=member, tokens=tokens, now=now))
        try:
            self._sync_finish(keys=keys, args=args)
        except redis.RedisError as exc:
            warn_unreachable("limits and credits", exc)
            self.local.count_now(scopes, member, tokens, now)


@cache
def counters() -> Counters:
    """This process's counters: in Redis when ``REDIS_URL`` is set, so that every process shares them,
    with the credit accounts of gateway.ledger_cache."""
    credits = ledger_cache()
    if isinstance(credits, RedisCache):
        return RedisCounters(settings.REDIS_URL, settings.REDIS_PREFIX, credits)
    return MemoryCounters(credits)
