"""The counters behind the limits: in this process's memory, or in Redis, shared by every process.

Three counters, each read and moved in one atomic step:

- **a token bucket** per key or model (requests per second): it holds at most B requests and refills
  at rps, so a burst of B passes at once and rps on average, exactly, whatever the timing;
- **a rolling minute of tokens** per key or model: each finished call's tokens, dropped 60 s after
  they were counted, with their running sum, so a check reads one number;
- **the concurrent-call slots** of a model (capacity).

In Redis a check is one Lua script (one round trip) and so is a count. Rates and token windows run
on the caller's clock (``now``, from ``gateway.limits.clock``), so tests can set it. Capacity slots
are leases on the Redis server's clock: a process renews the leases of the slots it holds, so the
slots of a process that died come back when their leases run out. In memory the same steps run
under one lock (a flex worker thread counts tokens beside the event loop); slots are a count.
While Redis cannot be reached, each operation falls back to memory: limited per process meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import redis
import redis.asyncio
from django.conf import settings

from gateway.call import Headroom
from gateway.redis_state import warn_unreachable

logger = logging.getLogger(__name__)
TOKEN_WINDOW_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """One check: seconds to wait before a call may pass (None: it passed), and what is left."""

    wait: float | None
    by_tokens: bool  # refused (also) for tokens per minute
    requests: Headroom | None
    tokens: Headroom | None


def _requests_left(rate: Rate, level: float) -> Headroom:
    return Headroom(rate.burst, math.floor(level), (rate.burst - level) / rate.per_second)


def _tokens_left(limit: int, used: int, reset: float) -> Headroom:
    return Headroom(limit, max(limit - used, 0), reset)


class Counters(Protocol):
    async def check(self, scope: str, rate: Rate | None, tokens_per_minute: int | None, now: float) -> Verdict:
        """Count one request against `scope`'s bucket if it passes; refuse it while its minute is spent."""
        ...

    def count(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        """Add a finished call's tokens to the scopes' minutes, without waiting (from the event loop)."""
        ...

    def count_now(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        """The same, done before returning (a worker's thread)."""
        ...

    async def acquire(self, model_id: int, capacity: int) -> str | None:
        """Take one of the model's slots: its lease id, or None when all are taken."""
        ...

    async def release(self, model_id: int, lease: str) -> None: ...


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


class MemoryCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}  # scope -> [level, refilled at]
        self._windows: dict[str, _Window] = {}
        self._in_flight: dict[int, int] = {}

    async def check(self, scope: str, rate: Rate | None, tokens_per_minute: int | None, now: float) -> Verdict:
        with self._lock:
            wait: float | None = None
            tokens = requests = None
            if tokens_per_minute:
                window = self._windows.get(scope)
                used = reset = 0.0
                if window is not None:
                    window.prune(now)
                    if window.entries:
                        used, reset = window.used, window.entries[-1][0] + TOKEN_WINDOW_SECONDS - now
                        if used >= tokens_per_minute:
                            wait = window.wait(tokens_per_minute, now)
                tokens = _tokens_left(tokens_per_minute, int(used), reset)
            by_tokens = wait is not None
            if rate is not None:
                bucket = self._buckets.setdefault(scope, [float(rate.burst), now])
                level = bucket[0]
                if now > bucket[1]:
                    level, bucket[1] = min(rate.burst, level + (now - bucket[1]) * rate.per_second), now
                if level < 1:
                    wait = max(wait or 0.0, (1 - level) / rate.per_second)
                elif not by_tokens:
                    level -= 1
                bucket[0] = level
                requests = _requests_left(rate, level)
            return Verdict(wait, by_tokens, requests, tokens)

    def count(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        self.count_now(scopes, member, tokens, now)

    def count_now(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        with self._lock:
            for scope in scopes:
                window = self._windows.get(scope)
                if window is None:
                    window = self._windows[scope] = _Window()
                window.prune(now)
                window.entries.append((now, tokens))
                window.used += tokens

    async def acquire(self, model_id: int, capacity: int) -> str | None:
        held = self._in_flight.get(model_id, 0)
        if held >= capacity:
            return None
        self._in_flight[model_id] = held + 1
        return ""

    async def release(self, model_id: int, lease: str) -> None:
        self._in_flight[model_id] -= 1


# --- in Redis ----------------------------------------------------------------------------------------

# KEYS: bucket, window, window's sum. ARGV: now, per second (0: no rate), burst, tokens per minute
# (0: none), window seconds. A window's member is "<request id>:<tokens>", scored by when it was counted.
CHECK = """
local now, per_second, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local function tokens_of(member) return tonumber(string.match(member, ':(%d+)$')) end
local wait, by_tokens, used, reset, level = -1, 0, 0, 0, 0
if limit > 0 then
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window) end
  local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if #newest == 0 then
    redis.call('DEL', KEYS[3])
  else
    if #gone > 0 then
      local freed = 0
      for _, member in ipairs(gone) do freed = freed + tokens_of(member) end
      used = redis.call('DECRBY', KEYS[3], freed)
    else
      used = tonumber(redis.call('GET', KEYS[3]) or '0')
    end
    reset = tonumber(newest[2]) + window - now
    if used >= limit then
      by_tokens, wait = 1, reset
      local need, freed, start, found = used - limit + 1, 0, 0, false
      while not found do
        local batch = redis.call('ZRANGE', KEYS[2], start, start + 99, 'WITHSCORES')
        if #batch == 0 then break end
        for i = 1, #batch, 2 do
          freed = freed + tokens_of(batch[i])
          if freed >= need then wait, found = tonumber(batch[i + 1]) + window - now, true break end
        end
        start = start + 100
      end
    end
  end
end
if per_second > 0 then
  local state = redis.call('HMGET', KEYS[1], 'level', 'at')
  level = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  if now > at then level, at = math.min(burst, level + (now - at) * per_second), now end
  if level < 1 then
    wait = math.max(wait, (1 - level) / per_second)
  elseif by_tokens == 0 then
    level = level - 1
  end
  redis.call('HSET', KEYS[1], 'level', string.format('%.17g', level), 'at', string.format('%.17g', at))
  -- Once full again it is the same as no bucket at all.
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - level) / per_second * 1000) + 1000)
end
return {string.format('%.17g', wait), by_tokens, string.format('%.17g', level), used, string.format('%.17g', reset)}
"""

# KEYS: pairs of (window, window's sum). ARGV: now, member, tokens, window seconds.
COUNT = """
local ttl = math.ceil(tonumber(ARGV[4]) * 1000) + 1000
for i = 1, #KEYS, 2 do
  if redis.call('ZADD', KEYS[i], 'NX', ARGV[1], ARGV[2]) == 1 then redis.call('INCRBY', KEYS[i + 1], ARGV[3]) end
  redis.call('PEXPIRE', KEYS[i], ttl)
  redis.call('PEXPIRE', KEYS[i + 1], ttl)
end
"""

# The set of a model's slots lives at least as long as its longest lease (never shortened: processes
# may run with leases of different lengths), and goes once no process renews any.
_SLOTS = """
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local function outlive(lease)
  if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
end
"""

# KEYS: the model's slots, scored by lease expiry (ms, server clock). ARGV: capacity, lease ms, slot id.
ACQUIRE = (
    _SLOTS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
outlive(tonumber(ARGV[2]))
return 1
"""
)

# KEYS: the model's slots. ARGV: lease ms, then the slot ids to renew (only those still there).
RENEW = (
    _SLOTS
    + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
outlive(tonumber(ARGV[1]))
"""
)


class _Link:
    """One event loop's Redis client and scripts, the slots held from it, and the task renewing them."""

    def __init__(self, url: str) -> None:
        self.client = redis.asyncio.Redis.from_url(url)
        self.check = self.client.register_script(CHECK)
        self.count = self.client.register_script(COUNT)
        self.acquire = self.client.register_script(ACQUIRE)
        self.renew = self.client.register_script(RENEW)
        self.held: dict[str, set[str]] = {}
        self.renewer: asyncio.Task[None] | None = None
        self.pending: set[asyncio.Task[object]] = set()  # counts in flight, kept from the collector

    def start(self, task: asyncio.Task[object]) -> None:
        self.pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        self.pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("Could not count tokens in Redis", exc_info=task.exception())

    async def keep_leases(self) -> None:
        """Renew this loop's leases a few times per lease, so that only a process that died loses its slots."""
        while True:
            await asyncio.sleep(_lease_ms() / 3000)
            await self.renew_leases()

    async def renew_leases(self) -> None:
        lease_ms = _lease_ms()
        for key, slots in list(self.held.items()):
            try:
                await self.renew(keys=[key], args=[lease_ms, *slots])
            except redis.RedisError:
                logger.warning("Could not renew the capacity leases of %s", key, exc_info=True)


def _lease_ms() -> int:
    return max(1, round(settings.GATEWAY_CAPACITY_LEASE_SECONDS * 1000))


class RedisCounters:
    """The counters in Redis, so that every process shares them. While Redis cannot be reached, each
    operation falls back to this process's memory: calls keep being served, limited per process."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, f"{prefix}:limits"
        self.local = MemoryCounters()
        self._links: dict[asyncio.AbstractEventLoop, _Link] = {}
        self._sync_count: redis.commands.core.Script | None = None
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
        # One hash tag per scope: a scope's keys stay on one node of a Redis cluster.
        base = f"{self.prefix}:{{{scope}}}"
        return [f"{base}:rate", f"{base}:tokens", f"{base}:used"]

    async def check(self, scope: str, rate: Rate | None, tokens_per_minute: int | None, now: float) -> Verdict:
        per_second, burst = (rate.per_second, rate.burst) if rate is not None else (0, 0)
        args = [repr(now), per_second, burst, tokens_per_minute or 0, TOKEN_WINDOW_SECONDS]
        try:
            wait, by_tokens, level, used, reset = await self._link().check(keys=self._keys(scope), args=args)
        except redis.RedisError as exc:
            warn_unreachable("limits", exc)
            return await self.local.check(scope, rate, tokens_per_minute, now)
        return Verdict(
            None if float(wait) < 0 else float(wait),
            by_tokens == 1,
            _requests_left(rate, float(level)) if rate is not None else None,
            _tokens_left(tokens_per_minute, int(used), float(reset)) if tokens_per_minute else None,
        )

    def _count_call(
        self, scopes: list[str], member: str, tokens: int, now: float
    ) -> tuple[list[str], list[str | int | float]]:
        keys = [key for scope in scopes for key in self._keys(scope)[1:]]
        return keys, [repr(now), f"{member}:{tokens}", tokens, TOKEN_WINDOW_SECONDS]

    def count(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        link = self._link()
        link.start(asyncio.get_running_loop().create_task(self._count(link, scopes, member, tokens, now)))

    async def _count(self, link: _Link, scopes: list[str], member: str, tokens: int, now: float) -> None:
        keys, args = self._count_call(scopes, member, tokens, now)
        try:
            await link.count(keys=keys, args=args)
        except redis.RedisError as exc:
            warn_unreachable("limits", exc)
            self.local.count_now(scopes, member, tokens, now)

    def count_now(self, scopes: list[str], member: str, tokens: int, now: float) -> None:
        if self._sync_count is None:
            self._sync_count = redis.Redis.from_url(self.url).register_script(COUNT)
        keys, args = self._count_call(scopes, member, tokens, now)
        try:
            self._sync_count(keys=keys, args=args)
        except redis.RedisError as exc:
            warn_unreachable("limits", exc)
            self.local.count_now(scopes, member, tokens, now)

    def _slots_key(self, model_id: int) -> str:
        return f"{self.prefix}:capacity:{model_id}"

    async def acquire(self, model_id: int, capacity: int) -> str | None:
        link = self._link()
        key, lease = self._slots_key(model_id), f"{self._process}:{next(self._slot_ids)}"
        try:
            if not await link.acquire(keys=[key], args=[capacity, _lease_ms(), lease]):
                return None
        except redis.RedisError as exc:
            warn_unreachable("limits", exc)
            return await self.local.acquire(model_id, capacity)  # "": a slot of this process's own
        link.held.setdefault(key, set()).add(lease)
        if link.renewer is None or link.renewer.done():
            link.renewer = asyncio.get_running_loop().create_task(link.keep_leases())
        return lease

    async def release(self, model_id: int, lease: str) -> None:
        if not lease:
            await self.local.release(model_id, lease)
            return
        link, key = self._link(), self._slots_key(model_id)
        held = link.held.get(key)
        if held is not None:
            held.discard(lease)  # no longer renewed, whatever happens next
            if not held:
                del link.held[key]
        removal = asyncio.ensure_future(link.client.zrem(key, lease))
        try:
            # Shielded: a call cancelled as it ends must still give its slot back now, not at its lease's end.
            await asyncio.shield(removal)
        except redis.RedisError:
            logger.warning("Could not release a capacity slot of %s; its lease will run out", key, exc_info=True)


@cache
def counters() -> Counters:
    """This process's counters: in Redis when ``REDIS_URL`` is set, so that every process shares them."""
    if settings.REDIS_URL:
        return RedisCounters(settings.REDIS_URL, settings.REDIS_PREFIX)
    return MemoryCounters()
