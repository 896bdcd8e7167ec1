"""A model's capacity is one count for every gateway process sharing Redis, held on leases: never
exceeded across processes, and the slots of a process that was killed come back."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import pytest
from django.conf import settings

from gateway.models import DeployedModel
from gateway.services import add_endpoint, add_model
from tests.conftest import HELLO, GatewayProcess, post, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not settings.REDIS_URL, reason="capacity is shared across processes through Redis (REDIS_URL)"),
]
# The fake upstream's `held` behind an endpoint that waits for it (the world's gives up after 3 s):
# a call admitted here ends when the test releases it, or after the upstream's own 30 s.
PATIENT = "held-patient"
HELD = {"model": PATIENT, "messages": HELLO}


def sees_key(url: str, secret: str) -> bool:
    return httpx.get(f"{url}/ai/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200


def patient_model(world, capacity: int) -> None:  # type: ignore[no-untyped-def]
    endpoint, _ = add_endpoint("patient", world.upstream.base_url, timeout_seconds=60)
    add_model(PATIENT, endpoint=endpoint, upstream_model="held", groups=["research"])
    DeployedModel.objects.filter(alias=PATIENT).update(capacity=capacity)
    DeployedModel.objects.get(alias=PATIENT).save()  # a save, so every snapshot sees the capacity


def in_background(call: Callable[[], int], statuses: list[int]) -> threading.Thread:
    def run() -> None:
        try:
            statuses.append(call())
        except httpx.TransportError:
            statuses.append(0)  # its gateway was killed

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def held_call(url: str, secret: str) -> int:
    reply = httpx.post(
        f"{url}/ai/v1/chat/completions", json=HELD, headers={"Authorization": f"Bearer {secret}"}, timeout=30
    )
    return reply.status_code


def test_two_processes_never_run_more_calls_of_a_model_than_its_capacity(world, user_with_credits, make_key):
    patient_model(world, 2)
    secret = make_key(user_with_credits)
    with GatewayProcess() as process:
        other = process.url
        wait_for(lambda: sees_key(other, secret))
        statuses: list[int] = []
        # Three calls to each process at once: each alone has room for two.
        threads = [in_background(lambda url=url: held_call(url, secret), statuses) for url in (world.url, other) * 3]

        # The refusals come back at once; the admitted calls wait at the upstream until released.
        wait_for(lambda: len(statuses) == 4, timeout=20)
        assert statuses == [429] * 4
        assert world.upstream.in_flight == 2
        world.upstream.release.set()
        for thread in threads:
            thread.join(30)

    assert sorted(statuses) == [200, 200, 429, 429, 429, 429]
    assert world.upstream.peak_in_flight == 2


def test_the_slots_of_a_killed_process_come_back_when_their_leases_run_out(world, user_with_credits, make_key):
    patient_model(world, 2)
    secret = make_key(user_with_credits)
    background = {"model": PATIENT, "input": "hi", "background": True}
    with GatewayProcess(GATEWAY_CAPACITY_LEASE_MS="3000") as process:
        other = process.url
        wait_for(lambda: sees_key(other, secret))
        statuses: list[int] = []
        # One slot held here, on a lease this process keeps renewing; the other held by the second process.
        in_background(lambda: held_call(world.url, secret), statuses)
        wait_for(lambda: world.upstream.in_flight == 1)
        in_background(lambda: held_call(other, secret), statuses)
        wait_for(lambda: world.upstream.in_flight == 2)
        assert post(world, secret, "responses", background).status_code == 429  # this process knows of both

        process.kill()  # SIGKILL: no chance to give its slot back
        wait_for(lambda: statuses == [0])  # its client saw the connection drop

        # Once its lease (3 s) has run out its slot is free again: this call is admitted (202), while the
        # first call still holds the other slot (until released, or the upstream's 30 s).
        wait_for(lambda: post(world, secret, "responses", background).status_code == 202, timeout=20, interval=0.2)
        assert statuses == [0]  # this process's call still holds its slot: the dead one's came back
    world.upstream.release.set()
    wait_for(lambda: statuses == [0, 200])
