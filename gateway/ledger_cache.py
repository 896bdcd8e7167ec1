"""Committed credits, shared by every gateway process and worker: in memory, or in Redis.

An *account* is what a call may spend against: a user's balance, or one window of a key's spend
limit. Each account holds, in integer nano-credits:

- ``b``, its base, with the version ``v`` it came from: a user's balance as last read from the
  database (a newer version replaces an older one, never the reverse), or a key's limit minus
  what the database had charged in the window when the account was first seen;
- ``s``, charges recorded but not yet in the base: a user's calls priced but not yet written, or
  everything a key spent in its window (its base never moves);
- ``c:<process>``, the reservations of calls in flight in each process. A process renews a lease
  while it lives; the reservations of one whose lease lapsed are dropped by the next reader, so a
  killed process never keeps credits from its users.

A call is admitted while ``b - s - Σc`` is above zero and covers the call's bounded reservation,
on every account it spends against, in one atomic step with its rates and its capacity slot
(gateway.counters: one Lua script, one round trip).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.conf import settings
from redis.exceptions import RedisError

from gateway import scripts
from gateway.redis_state import warn_unreachable

PROCESS = uuid.uuid4().hex[:16]  # this process, for its reservations and its lease
LEASE_SECONDS = 30
RENEW_SECONDS = 5
ACCOUNT_TTL_SECONDS = 40 * 86400  # longer than any spend window
Move = tuple[str, int, int]  # an account, its reserved change, its recorded change (nano-credits)


@dataclass(frozen=True, slots=True)
class Seed:
    """An account's base as the caller knows it: used when newer than the one held."""

    account: str
    version: int
    base: int


@dataclass(frozen=True, slots=True)
class Refusal:
    account: str
    available: int


# --- in memory: one process ------------------------------------------------------------------


class MemoryCache:
    def __init__(self) -> None:
        self.accounts: dict[str, list[int]] = {}  # account -> [version, base, recorded, reserved]
        self.lock = threading.Lock()

    def _account(self, seed: Seed) -> list[int]:
        state = self.accounts.get(seed.account)
        if state is None:
            state = self.accounts[seed.account] = [seed.version, seed.base, 0, 0]
        elif seed.version > state[0]:
            state[0], state[1] = seed.version, seed.base
        return state

    def reserve(self, seeds: list[Seed], nanos: int, need: int) -> Refusal | None:
        with self.lock:
            states = [self._account(seed) for seed in seeds]
            for seed, (_, base, recorded, reserved) in zip(seeds, states, strict=True):
                available = base - recorded - reserved
                if available <= 0 or available < need:
                    return Refusal(seed.account, available)
            for state in states:
                state[3] += nanos
            return None

    def move(self, account: str, *, reserved: int = 0, recorded: int = 0) -> None:
        self.moves([(account, reserved, recorded)])

    def moves(self, moves: Iterable[Move]) -> None:
        with self.lock:
            for account, reserved, recorded in moves:
                state = self.accounts.setdefault(account, [-1, 0, 0, 0])
                # Never below zero: a release may reach this cache without its reservation (Redis away).
                state[3] = max(state[3] + reserved, 0)
                state[2] = max(state[2] + recorded, 0)

    def seen(self, seed: Seed) -> None:
        with self.lock:
            self._account(seed)

    async def amove(self, account: str, *, reserved: int = 0, recorded: int = 0) -> None:
        self.move(account, reserved=reserved, recorded=recorded)


# --- in Redis: every process --------------------------------------------------------------------


class RedisCache:
    """The same accounts in Redis hashes, so the bound holds across processes. The hot path uses
    the asyncio client; threads (the usage writer, flex workers) use the blocking one. While Redis
    cannot be reached, each operation falls back to this process's memory: calls keep being served,
    and the bound holds per process until Redis is back."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.prefix = f"{prefix}:credits:"
        self.lease = f"{prefix}:credits-lease:"
        self.url = url
        self.sync = redis.Redis.from_url(url)
        self.sync_reserve_script = self.sync.register_script(scripts.RESERVE)
        self.move_script = self.sync.register_script(scripts.MOVE)
        # An asyncio client belongs to one event loop (the gateway's, a flex worker's): one per loop.
        self.loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self.seed_script = self.sync.register_script(scripts.SEED)
        self.local = MemoryCache()
        try:
            self.renew()
        except RedisError as exc:
            warn_unreachable("credits", exc)
        threading.Thread(target=self._keep_lease, name="credits-lease", daemon=True).start()

    def _move_script(self) -> Any:
        """The move script on this event loop's client."""
        loop = asyncio.get_running_loop()
        script = self.loops.get(loop)
        if script is None:
            import redis.asyncio

            script = self.loops[loop] = redis.asyncio.Redis.from_url(self.url).register_script(scripts.MOVE)
        return script

    def renew(self) -> None:
        self.sync.set(self.lease + PROCESS, 1, ex=LEASE_SECONDS)

    def _keep_lease(self) -> None:
        while True:
            time.sleep(RENEW_SECONDS)
            try:
                self.renew()
            except RedisError as exc:
                warn_unreachable("credits", exc)  # the next round renews

    def _reserve_args(self, seeds: list[Seed], nanos: int, need: int) -> tuple[list[str], list[Any]]:
        args: list[Any] = [PROCESS, self.lease, nanos, need, ACCOUNT_TTL_SECONDS]
        for seed in seeds:
            args += [seed.version, seed.base]
        return [self.prefix + seed.account for seed in seeds], args

    @staticmethod
    def _refusal(seeds: list[Seed], answer: list[Any]) -> Refusal | None:
        index = int(answer[0])
        return None if index == 0 else Refusal(seeds[index - 1].account, int(float(answer[1])))

    def reserve(self, seeds: list[Seed], nanos: int, need: int) -> Refusal | None:
        keys, args = self._reserve_args(seeds, nanos, need)
        try:
            return self._refusal(seeds, self.sync_reserve_script(keys=keys, args=args))
        except RedisError as exc:
            warn_unreachable("credits", exc)
            return self.local.reserve(seeds, nanos, need)

    def _move_args(self, moves: list[Move]) -> tuple[list[str], list[Any]]:
        args: list[Any] = [PROCESS, ACCOUNT_TTL_SECONDS]
        for _, reserved, recorded in moves:
            args += [reserved, recorded]
        return [self.prefix + account for account, _, _ in moves], args

    def move(self, account: str, *, reserved: int = 0, recorded: int = 0) -> None:
        self.moves([(account, reserved, recorded)])

    def moves(self, moves: Iterable[Move]) -> None:
        """Several accounts' moves in one round trip (the usage writer's, once per flush)."""
        batch = list(moves)
        if not batch:
            return
        keys, args = self._move_args(batch)
        try:
            self.move_script(keys=keys, args=args)
        except RedisError as exc:
            warn_unreachable("credits", exc)
            self.local.moves(batch)

    async def amove(self, account: str, *, reserved: int = 0, recorded: int = 0) -> None:
        keys, args = self._move_args([(account, reserved, recorded)])
        try:
            await self._move_script()(keys=keys, args=args)
        except RedisError as exc:
            warn_unreachable("credits", exc)
            self.local.move(account, reserved=reserved, recorded=recorded)

    def seen(self, seed: Seed) -> None:
        self.local.seen(seed)
        try:
            self.seed_script(keys=[self.prefix + seed.account], args=[seed.version, seed.base, ACCOUNT_TTL_SECONDS])
        except RedisError as exc:
            warn_unreachable("credits", exc)


@cache
def ledger_cache() -> MemoryCache | RedisCache:
    if settings.REDIS_URL:
        return RedisCache(settings.REDIS_URL, settings.REDIS_PREFIX)
    return MemoryCache()
