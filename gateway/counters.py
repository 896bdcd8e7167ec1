"""The counters behind admission: in this process's memory, or in Redis, shared by every process.

What a call must pass before its upstream call is one :class:`Admission`, checked and taken in one
atomic step (in Redis one Lua script, one round trip: gateway/scripts.py):

- **a token bucket** per key or model (requests per second): it holds at most B requests and refills
  at rps, so a burst of B passes at once and rps on average, exactly, whatever the timing;
- **a rolling minute of tokens** per key or model: each finished call's tokens, dropped 60 s after
  they were counted, with their running sum, so a check reads one number;
- **its credits** on its accounts (gateway.ledger_cache);
- **a concurrent-call slot** of its model (capacity).

Checked in that order, the first that refuses is the answer, and nothing is taken unless all pass:
a call refused by its model's rate keeps its key's request, one refused for credits or capacity
keeps both. What a call gives back when it ends — its slot, its reservation replaced by its cost,
its tokens counted — is one :class:`Ending`, one round trip too, sent without waiting.

Rates and token windows run on the caller's clock (``now``, from ``gateway.limits.clock``), so tests
can set it. Capacity slots are leases on the Redis server's clock: a process renews the leases of
the slots it holds, so the slots of a process that died come back when their leases run out. In
memory the same steps run under one lock (a flex worker thread counts tokens beside the event
loop); slots are a count. In Redis they are gateway/shared_counters.py, which falls back to these while
Redis cannot be reached: limited per process meanwhile.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from gateway.call import Headroom
from gateway.ledger_cache import MemoryCache, Refusal, Seed

TOKEN_WINDOW_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """One limit's check: seconds to wait before a call may pass (None: it passed), and what is left."""

    wait: float | None
    by_tokens: bool  # refused (also) for tokens per minute
    requests: Headroom | None
    tokens: Headroom | None


@dataclass(frozen=True, slots=True)
class Limit:
    """A key's or a model's rate and tokens per minute."""

    scope: str  # "key:<id>" or "model:<id>"
    rate: Rate | None
    tokens_per_minute: int | None


@dataclass(frozen=True, slots=True)
class Credits:
    """What a call reserves (nano-credits) on its accounts, and the room each must have for it."""

    seeds: list[Seed]
    nanos: int
    need: int


@dataclass(frozen=True, slots=True)
class Admission:
    now: float
    limits: list[Limit]
    credits: Credits | None = None
    slot: tuple[int, int] | None = None  # (model id, capacity)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdicts of the limits checked, what refused the call (None: it was admitted, and holds
    `lease` when it asked for a slot: "" for one of this process's memory), and a credit refusal."""

    verdicts: list[Verdict]
    refused: str | None = None  # "limit" (the last verdict's), "credits" or "capacity"
    credit_refusal: Refusal | None = None
    lease: str | None = None


@dataclass(frozen=True, slots=True)
class Ending:
    """What an admitted call gives back when it ends: its slot (model id, lease), its credits'
    moves (account, reserved change, recorded change), and its tokens for these scopes' minutes."""

    slot: tuple[int, str] | None = None
    moves: list[tuple[str, int, int]] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    member: str = ""
    tokens: int = 0
    now: float = 0.0


def requests_left(rate: Rate, level: float) -> Headroom:
    return Headroom(rate.burst, math.floor(level), (rate.burst - level) / rate.per_second)


def tokens_left(limit: int, used: int, reset: float) -> Headroom:
    return Headroom(limit, max(limit - used, 0), reset)


class Counters(Protocol):
    async def admit(self, admission: Admission) -> Outcome:
        """Check every limit, the credits and the slot of a call; take them all only if all pass."""
        ...

    def end(self, ending: Ending) -> None:
        """Give back what an admitted call holds, without waiting (from the event loop)."""
        ...

    async def finish(self, ending: Ending) -> None:
        """The same, done before returning."""
        ...

    def count_now(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        """Add a finished call's tokens to the scopes' minutes, before returning (a worker's thread)."""
        ...


class OneAtATime:
    """One limit or one slot at a time, through the same admission."""

    async def admit(self, admission: Admission) -> Outcome:
        raise NotImplementedError

    async def finish(self, ending: Ending) -> None:
        raise NotImplementedError

    async def check(self, scope: str, rate: Rate | None, tokens_per_minute: int | None, now: float) -> Verdict:
        """Count one request against `scope`'s bucket if it passes; refuse it while its minute is spent."""
        return (await self.admit(Admission(now, [Limit(scope, rate, tokens_per_minute)]))).verdicts[0]

    async def acquire(self, model_id: int, capacity: int) -> str | None:
        """Take one of the model's slots: its lease id, or None when all are taken."""
        return (await self.admit(Admission(0.0, [], slot=(model_id, capacity)))).lease

    async def release(self, model_id: int, lease: str) -> None:
        await self.finish(Ending(slot=(model_id, lease)))


# --- in memory ---------------------------------------------------------------------------------------


class _Window:
    """A rolling minute of counted tokens, oldest first, and their sum."""

    __slots__ = ("entries", "used")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, int]] = deque()
        self.used = 0

    def prune(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0][0] <= now - TOKEN_WINDOW_SECONDS:
            self.used -= entries.popleft()[1]

    def wait(self, limit: int, now: float) -> float:
        """Seconds until enough tokens drop out for the sum to be under `limit` again."""
        need, freed = self.used - limit + 1, 0
        for counted_at, tokens in self.entries:
            freed += tokens
            if freed >= need:
                return counted_at + TOKEN_WINDOW_SECONDS - now
        return 0.0


class MemoryCounters(OneAtATime):
    def __init__(self, credits: MemoryCache | None = None) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}  # scope -> [level, refilled at]
        self._windows: dict[str, _Window] = {}
        self._in_flight: dict[int, int] = {}
        self.credits = credits if credits is not None else MemoryCache()

    def _minute(self, limit: Limit, now: float) -> tuple[float | None, Headroom | None]:
        """A limit's wait for tokens (None: none) and what is left of its minute."""
        tokens_per_minute = limit.tokens_per_minute
        if not tokens_per_minute:
            return None, None
        window = self._windows.get(limit.scope)
        used = reset = 0.0
        wait = None
        if window is not None:
            window.prune(now)
            if window.entries:
                used, reset = window.used, window.entries[-1][0] + TOKEN_WINDOW_SECONDS - now
                if used >= tokens_per_minute:
                    wait = window.wait(tokens_per_minute, now)
        return wait, tokens_left(tokens_per_minute, int(used), reset)

    async def admit(self, admission: Admission) -> Outcome:
        return self.admit_now(admission)

    def admit_now(self, admission: Admission) -> Outcome:
        now, verdicts = admission.now, []
        with self._lock:
            levels: list[tuple[float, float]] = []  # per limit: its bucket's level now, and when that is
            for limit in admission.limits:
                wait, tokens = self._minute(limit, now)
                by_tokens, rate, level, at = wait is not None, limit.rate, 0.0, now
                if rate is not None:
                    level, at = self._buckets.get(limit.scope, (float(rate.burst), now))
                    if now > at:
                        level, at = min(rate.burst, level + (now - at) * rate.per_second), now
                    if level < 1:
                        wait = max(wait or 0.0, (1 - level) / rate.per_second)
                levels.append((level, at))
                requests = requests_left(rate, level) if rate is not None else None
                verdicts.append(Verdict(wait, by_tokens, requests, tokens))
                if wait is not None:
                    return Outcome(verdicts, "limit")
            slot = admission.slot
            full = slot is not None and self._in_flight.get(slot[0], 0) >= slot[1]
            credits = admission.credits
            if credits is not None:
                # With no slot free the call is not admitted: its credits are only checked.
                refusal = self.credits.reserve(credits.seeds, 0 if full else credits.nanos, credits.need)
                if refusal is not None:
                    return Outcome(verdicts, "credits", refusal)
            if full:
                return Outcome(verdicts, "capacity")
            for index, (limit, (level, at)) in enumerate(zip(admission.limits, levels, strict=True)):
                if limit.rate is not None:
                    self._buckets[limit.scope] = [level - 1, at]
                    verdicts[index] = Verdict(None, False, requests_left(limit.rate, level - 1), verdicts[index].tokens)
            if slot is not None:
                self._in_flight[slot[0]] = self._in_flight.get(slot[0], 0) + 1
            return Outcome(verdicts, lease="" if slot is not None else None)

    def end(self, ending: Ending) -> None:
        if ending.slot is not None:
            with self._lock:
                self._in_flight[ending.slot[0]] -= 1
        for account, reserved, recorded in ending.moves:
            self.credits.move(account, reserved=reserved, recorded=recorded)
        if ending.scopes:
            self.count_now(ending.scopes, ending.member, ending.tokens, ending.now)

    async def finish(self, ending: Ending) -> None:
        self.end(ending)

    def count_now(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        with self._lock:
            for scope in scopes:
                window = self._windows.get(scope)
                if window is None:
                    window = self._windows[scope] = _Window()
                window.prune(now)
                window.entries.append((now, tokens))
                window.used += tokens
