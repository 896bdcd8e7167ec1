"""The counters behind the limits, in memory and in Redis, on a clock the test sets: exact bursts,
rolling minutes of tokens, and capacity leases that outlive their term only while renewed."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.conf import settings

from gateway.call import Headroom
from gateway.counters import Ending, MemoryCounters, Rate
from gateway.limits import duration
from gateway.shared_counters import RedisCounters
from tests.upstream import free_port

T = 1_800_000_000.0  # any instant: the counters read no clock of their own
BURST_OF_3 = Rate(per_second=1.0, burst=3)


@pytest.fixture(params=["memory", "redis"])
def counters(request):  # type: ignore[no-untyped-def]
    if request.param == "memory":
        return MemoryCounters()
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    # A prefix of its own: nothing a previous run left behind is seen.
    return RedisCounters(settings.REDIS_URL, f"{settings.REDIS_PREFIX}:test:{uuid.uuid4().hex}")


def two_processes() -> tuple[RedisCounters, RedisCounters]:
    """The counters of two gateway processes sharing one Redis."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    prefix = f"{settings.REDIS_PREFIX}:test:{uuid.uuid4().hex}"
    return RedisCounters(settings.REDIS_URL, prefix), RedisCounters(settings.REDIS_URL, prefix)


async def endings_sent(counters: RedisCounters) -> None:
    """Wait for the endings sent without waiting (``end``) to be answered, or to fail."""
    pending = counters._link().pending
    if pending:
        await asyncio.wait(pending)


async def passes(counters, rate: Rate | None = None, tpm: int | None = None, now: float = T) -> bool:  # type: ignore[no-untyped-def]
    return (await counters.check("key:1", rate, tpm, now)).wait is None


# --- requests per second: a token bucket ----------------------------------------------------------


async def test_a_burst_of_b_passes_at_once_and_not_one_more(counters):
    assert [await passes(counters, BURST_OF_3) for _ in range(5)] == [True, True, True, False, False]


async def test_a_spent_bucket_refills_at_its_rate(counters):
    for _ in range(3):
        await counters.check("key:1", BURST_OF_3, None, T)

    early = await counters.check("key:1", BURST_OF_3, None, T + 0.25)
    assert early.wait == pytest.approx(0.75)
    assert await passes(counters, BURST_OF_3, now=T + 1)  # one request back after 1/rps
    assert not await passes(counters, BURST_OF_3, now=T + 1)


async def test_a_bucket_never_holds_more_than_its_burst(counters):
    await counters.check("key:1", BURST_OF_3, None, T)
    later = [await passes(counters, BURST_OF_3, now=T + 3600) for _ in range(4)]
    assert later == [True, True, True, False]


async def test_a_check_reports_the_buckets_headroom(counters):
    first = await counters.check("key:1", BURST_OF_3, None, T)
    second = await counters.check("key:1", BURST_OF_3, None, T)
    assert (first.requests, second.requests) == (Headroom(3, 2, 1.0), Headroom(3, 1, 2.0))
    assert first.tokens is None


async def test_keys_and_models_have_buckets_of_their_own(counters):
    for _ in range(3):
        await counters.check("key:1", BURST_OF_3, None, T)
    assert (await counters.check("model:1", BURST_OF_3, None, T)).wait is None


# --- tokens per minute: a rolling window ----------------------------------------------------------


async def test_a_call_is_refused_once_the_minutes_tokens_reach_the_limit(counters):
    assert await passes(counters, tpm=100)
    counters.count_now(["key:1"], "a", 60, T)
    assert await passes(counters, tpm=100)
    counters.count_now(["key:1"], "b", 40, T + 10)  # 100 of 100: reached
    refused = await counters.check("key:1", None, 100, T + 20)
    assert refused.wait == pytest.approx(40)  # when the first call's 60 leave the window, at T + 60
    assert refused.by_tokens
    assert refused.tokens == Headroom(100, 0, pytest.approx(50))  # all gone at T + 70


async def test_tokens_leave_the_window_a_minute_after_they_were_counted(counters):
    counters.count_now(["key:1"], "a", 60, T)
    counters.count_now(["key:1"], "b", 50, T + 10)
    assert (await counters.check("key:1", None, 100, T + 59.5)).wait is not None
    at_a_minute = await counters.check("key:1", None, 100, T + 60)
    assert at_a_minute.wait is None
    assert at_a_minute.tokens == Headroom(100, 50, pytest.approx(10))
    assert (await counters.check("key:1", None, 100, T + 70)).tokens == Headroom(100, 100, 0.0)


async def test_the_wait_covers_as_many_calls_as_must_leave(counters):
    for second, member in enumerate("abcde"):
        counters.count_now(["key:1"], member, 30, T + second)  # 150 of 100
    refused = await counters.check("key:1", None, 100, T + 10)
    assert refused.wait == pytest.approx(51)  # 51 tokens must go: the calls of T and T+1, at T+1 + 60


async def test_one_count_can_feed_a_key_and_a_model(counters):
    counters.count_now(["key:1", "model:1"], "a", 100, T)
    assert (await counters.check("key:1", None, 100, T)).wait is not None
    assert (await counters.check("model:1", None, 100, T)).wait is not None
    assert (await counters.check("model:2", None, 100, T)).wait is None


async def test_a_call_refused_for_tokens_does_not_spend_a_request(counters):
    counters.count_now(["key:1"], "a", 100, T)
    refused = await counters.check("key:1", Rate(1.0, 1), 100, T)
    assert refused.by_tokens
    assert refused.requests == Headroom(1, 1, 0.0)


async def test_a_count_from_the_event_loop_lands(counters):
    counters.end(Ending(scopes=["key:1"], member="a", tokens=100, now=T))
    if isinstance(counters, RedisCounters):
        await endings_sent(counters)
    assert (await counters.check("key:1", None, 100, T)).wait is not None


async def test_the_endings_of_one_turn_go_together_and_all_land(counters):
    for n, scope in enumerate(["key:1", "key:2", "model:1"]):
        counters.end(Ending(scopes=[scope], member=f"m{n}", tokens=100, now=T))
    if isinstance(counters, RedisCounters):
        await asyncio.sleep(0)  # endings go a turn later, after what this turn writes to clients
        assert len(counters._link().wire.outgoing) == 3  # to go in one write, at the end of that turn
        await endings_sent(counters)
    for scope in ["key:1", "key:2", "model:1"]:
        assert (await counters.check(scope, None, 100, T)).wait is not None


async def test_an_ending_lands_after_redis_forgot_its_scripts(counters):
    if not isinstance(counters, RedisCounters):
        pytest.skip("scripts are Redis's")
    await passes(counters, tpm=100)  # the scripts are loaded
    await counters._link().wire.call("SCRIPT", "FLUSH")  # as after a restart of Redis
    counters.end(Ending(scopes=["key:1"], member="a", tokens=100, now=T))
    await endings_sent(counters)
    assert (await counters.check("key:1", None, 100, T)).wait is not None


# --- capacity leases ---------------------------------------------------------------------------------


async def test_a_slot_is_taken_until_released(counters):
    lease = await counters.acquire(7, 1)
    assert lease is not None
    assert await counters.acquire(7, 1) is None
    await counters.release(7, lease)
    assert await counters.acquire(7, 1) is not None


async def test_the_slots_of_a_process_that_stopped_renewing_come_back(settings):
    settings.GATEWAY_CAPACITY_LEASE_SECONDS = 0.2
    gone, alive = two_processes()
    assert await alive.acquire(7, 2) is not None  # renewed all along: the model's slots never expire whole
    assert await gone.acquire(7, 2) is not None
    gone._link().renewer.cancel()  # as if its process had died
    assert await alive.acquire(7, 2) is None

    for _ in range(100):  # the dead lease runs out 0.2 s after it was taken
        if await alive.acquire(7, 2) is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the slot never came back")


async def test_a_renewed_lease_outlives_its_first_term(settings):
    settings.GATEWAY_CAPACITY_LEASE_SECONDS = 0.2
    holder, other = two_processes()
    assert await holder.acquire(7, 1) is not None
    link = holder._link()
    link.renewer.cancel()
    settings.GATEWAY_CAPACITY_LEASE_SECONDS = 600
    await link.renew_leases()

    await asyncio.sleep(0.5)  # past the first term, whatever the load: a renewal is what keeps it
    assert await other.acquire(7, 1) is None


async def test_while_redis_is_unreachable_the_limits_hold_per_process():
    away = RedisCounters(f"redis://127.0.0.1:{free_port()}/0", "away")

    assert [await passes(away, BURST_OF_3) for _ in range(4)] == [True, True, True, False]
    away.count_now(["key:1"], "a", 100, T)
    away.end(Ending(scopes=["key:1"], member="b", tokens=100, now=T))
    await endings_sent(away)
    assert (await away.check("key:1", None, 200, T)).wait is not None  # both counts, here
    lease = await away.acquire(7, 1)
    assert lease is not None
    assert await away.acquire(7, 1) is None
    await away.release(7, lease)
    assert await away.acquire(7, 1) is not None


# --- OpenAI's durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0001, "1ms"),
        (0.12, "120ms"),
        (1, "1s"),
        (1.0000000001, "1s"),
        (1.5, "1.5s"),
        (59.25, "59.25s"),
        (60, "1m0s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
    ],
)
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text
