"""What Redis spends per /ai/ call: the admission and the ending of the shared counters, as the
bench's paid, limited call makes them (its key's and its model's rate and tokens per minute, a
capacity slot, credits on the user's balance and on the key's spend window).

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python bench/redis_cost.py [--calls 20000] [--rounds 3]
        [--in-flight 32] [--processes 2]

Drives gateway.shared_counters.RedisCounters directly under a scratch prefix, `--in-flight` calls at
a time, and reads the Redis server's CPU time (INFO cpu: used_cpu_sys + used_cpu_user) and its
per-command statistics before and after each round. `--processes` other processes are given
reservations on the accounts, as in a run of that many gateways. Prints one ``BENCHJSON {...}``
line: Redis CPU microseconds per call (admission + ending), the median over rounds, and, per script
and per command the scripts call, calls and microseconds per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dwctl_site.settings")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.setdefault("REDIS_PREFIX", f"redis-cost-{uuid.uuid4().hex[:8]}")

import django

django.setup()

import redis  # noqa: E402
from django.conf import settings  # noqa: E402

from gateway.counters import Admission, Credits, Ending, Limit, Rate  # noqa: E402
from gateway.ledger_cache import PROCESS, RedisCache, Seed  # noqa: E402
from gateway.shared_counters import RedisCounters  # noqa: E402

LIMITS = [
    Limit("key:1", Rate(1_000_000.0, 1_000_000), 1_000_000_000),
    Limit("model:1", Rate(1_000_000.0, 1_000_000), 1_000_000_000),
]
ACCOUNTS = ("user:1", "key:1:month:2026-12")
NANOS, COST = 20_000, 15_000


def cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def command_stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in client.info("commandstats").items()
    }


async def one_call(counters: RedisCounters, index: int, clock: float) -> None:
    seeds = [Seed(account, 1, 10**18) for account in ACCOUNTS]
    outcome = await counters.admit(Admission(clock, LIMITS, Credits(seeds, NANOS, NANOS), (1, 100_000)))
    assert outcome.refused is None, outcome
    moves = [(account, -NANOS, COST) for account in ACCOUNTS]
    ending = Ending((1, outcome.lease or ""), moves, [limit.scope for limit in LIMITS], f"r{index}", 30, clock)
    await counters.finish(ending)


async def round_of(counters: RedisCounters, calls: int, in_flight: int, start: int) -> None:
    loop = asyncio.get_running_loop()
    queue = iter(range(start, start + calls))

    async def worker() -> None:
        for index in queue:
            await one_call(counters, index, loop.time())

    await asyncio.gather(*(worker() for _ in range(in_flight)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    client = redis.Redis.from_url(settings.REDIS_URL)
    credits = RedisCache(settings.REDIS_URL, settings.REDIS_PREFIX)
    counters = RedisCounters(settings.REDIS_URL, settings.REDIS_PREFIX, credits)
    for other in range(args.processes - 1):  # the other gateways' reservations, each under a live lease
        client.set(f"{credits.lease}other{other}", 1, ex=600)
        for account in ACCOUNTS:
            client.hset(credits.prefix + account, f"c:other{other}", NANOS)
    per_call, scripts, commands = [], {}, {}
    try:
        for number in range(args.rounds):
            cpu, stats = cpu_seconds(client), command_stats(client)
            asyncio.run(round_of(counters, args.calls, args.in_flight, number * args.calls))
            per_call.append((cpu_seconds(client) - cpu) / args.calls * 1e6)
            after = command_stats(client)
            for name, (calls, usec) in after.items():
                was = stats.get(name, (0, 0))
                if calls - was[0] >= args.calls // 2:
                    into = scripts if name in ("evalsha", "eval") else commands
                    into[name] = {
                        "per_call": round((calls - was[0]) / args.calls, 2),
                        "usec": round((usec - was[1]) / max(calls - was[0], 1), 2),
                    }
    finally:
        for key in client.scan_iter(match=settings.REDIS_PREFIX + "*", count=1000):
            client.delete(key)
    print(
        "BENCHJSON "
        + orjson.dumps(
            {
                "bench": "redis_cost",
                "process": PROCESS,
                "redis_cpu_us_per_call": round(statistics.median(per_call), 1),
                "rounds": [round(x, 1) for x in per_call],
                "scripts": scripts,
                "commands": commands,
            }
        ).decode()
    )


if __name__ == "__main__":
    main()
