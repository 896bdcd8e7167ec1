"""A call's admission and its end through the live gateway: the capacity slot comes back however the
call ends, and with Redis a call makes one round trip before its upstream call and one after it."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import redis
from django.conf import settings

from accounts.services import create_api_key
from gateway import scripts
from gateway.counters import MemoryCounters
from gateway.models import DeployedModel
from gateway.shared_counters import RedisCounters, counters
from tests.conftest import HELLO, post, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
ADMIT_SHA = hashlib.sha1(scripts.ADMIT.encode()).hexdigest()  # noqa: S324 - Redis names scripts so
FINISH_SHA = hashlib.sha1(scripts.FINISH.encode()).hexdigest()  # noqa: S324


def limit_model(alias: str, **limits: int) -> DeployedModel:
    DeployedModel.objects.filter(alias=alias).update(**limits)
    model = DeployedModel.objects.get(alias=alias)
    model.save()  # a save, so the snapshot sees the limits
    return model


def slots_in_use(model: DeployedModel) -> int:
    shared = counters()
    if isinstance(shared, RedisCounters):
        return int(redis.Redis.from_url(settings.REDIS_URL).zcard(shared._slots_key(model.id)))
    assert isinstance(shared, MemoryCounters)
    return shared._in_flight.get(model.id, 0)


def test_a_call_that_fails_upstream_gives_back_its_capacity_slot(world, user_with_credits, make_key):
    model = limit_model("fail-500", capacity=1)
    secret = make_key(user_with_credits)

    for _ in range(3):  # a slot kept by a failed call would make the next one 429
        reply = post(world, secret, "chat/completions", {"model": "fail-500", "messages": HELLO})
        assert reply.status_code == 500
        wait_for(lambda: slots_in_use(model) == 0)


def test_a_client_that_hangs_up_during_its_call_gives_back_its_capacity_slot(world, user_with_credits, make_key):
    model = limit_model("held", capacity=1)
    secret = make_key(user_with_credits)

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{world.url}/ai/v1/chat/completions",
            json={"model": "held", "messages": HELLO},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=httpx.Timeout(20, read=0.5),
        )
    wait_for(lambda: slots_in_use(model) == 0)
    world.upstream.release.set()
    world.client(secret).chat.completions.create(model="held", messages=HELLO)  # the slot is free
    wait_for(lambda: slots_in_use(model) == 0)


# --- Redis round trips -----------------------------------------------------------------------------


@contextmanager
def redis_commands() -> Iterator[list[str]]:
    """The commands clients send to Redis meanwhile (not those scripts run), as MONITOR shows them."""
    if not settings.REDIS_URL:
        pytest.skip("counts Redis round trips (set REDIS_URL)")
    seen: list[str] = []
    client = redis.Redis.from_url(settings.REDIS_URL)
    ready, done = threading.Event(), threading.Event()

    def listen() -> None:
        with client.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                if done.is_set():
                    return
                if command.get("client_type") != "lua":
                    seen.append(command["command"])

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(5)
    try:
        yield seen
    finally:
        done.set()
        client.ping()  # wakes the listener
        thread.join(5)


def test_an_admitted_call_makes_one_redis_round_trip_before_its_upstream_call_and_one_after(
    world, user_with_credits, make_key
):
    model = limit_model("gpt-test", requests_per_second=1000, burst_size=1000, tokens_per_minute=10**6, capacity=10)
    # Key and model both limited, a paid model with a capacity: every check applies.
    key, secret = create_api_key(user_with_credits, requests_per_second=1000, burst_size=1000, tokens_per_minute=10**6)
    scope = f":limits:key:{key.id}:"

    with redis_commands() as seen:
        world.client(secret).chat.completions.create(model="gpt-test", messages=HELLO)
        wait_for(lambda: any(FINISH_SHA in command and scope in command for command in seen))
        ours = [command for command in seen if scope in command]

    admit, finish = ours  # one before the upstream call, one after: nothing else names the key's limits
    assert admit.startswith(f"EVALSHA {ADMIT_SHA}") and finish.startswith(f"EVALSHA {FINISH_SHA}")
    # The one admission also took the credits and the capacity slot; the one ending gave both back.
    for command in (admit, finish):
        assert f":credits:u{user_with_credits.id}" in command
        assert f":limits:capacity:{model.id}" in command


def test_a_free_model_with_no_limits_makes_no_redis_call(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)

    with redis_commands() as seen:
        for _ in range(3):
            world.client(secret).chat.completions.create(model="free-model", messages=HELLO)
        finished = len(seen)

    assert not [command for command in seen[:finished] if ADMIT_SHA in command or FINISH_SHA in command]


# --- what a refusal keeps ----------------------------------------------------------------------------


def test_a_refusal_by_the_models_rate_keeps_the_keys_request(world, user_with_credits, make_key, limits_clock):
    limit_model("free-model", requests_per_second=1, burst_size=1)
    other, limited = make_key(user_with_credits), make_key(user_with_credits, requests_per_second=1, burst_size=1)
    world.client(other).chat.completions.create(model="free-model", messages=HELLO)  # the model's one request

    with pytest.raises(openai.RateLimitError, match="free-model"):
        world.client(limited).chat.completions.create(model="free-model", messages=HELLO)
    world.client(limited).chat.completions.create(model="gpt-test", messages=HELLO)  # its one request, still there


def test_a_refusal_for_capacity_keeps_the_rates_and_the_credits(world, user_with_credits, make_key, limits_clock):
    model = limit_model("held", capacity=1, requests_per_second=1, burst_size=1)
    holder, limited = make_key(user_with_credits), make_key(user_with_credits, requests_per_second=1, burst_size=1)
    held = threading.Thread(target=lambda: world.client(holder).chat.completions.create(model="held", messages=HELLO))
    held.start()
    wait_for(lambda: slots_in_use(model) == 1)
    limits_clock.advance(1)  # the model's request is back; the slot is still taken

    with pytest.raises(openai.RateLimitError, match="capacity"):
        world.client(limited).chat.completions.create(model="held", messages=HELLO)
    world.upstream.release.set()
    held.join()
    world.client(limited).chat.completions.create(model="held", messages=HELLO)  # key and model: their request kept
