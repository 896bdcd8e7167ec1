"""The flex queue under its workers: claims, races, concurrency caps, runners, sweeps and killed workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.conf import settings
from django.db import close_old_connections

from billing.models import CreditTransaction
from gateway.jobs import create_job
from gateway.models import DeployedModel, InferenceRequest, JobState
from gateway.queue import claim_jobs, sweep_jobs
from gateway.worker import run_flex_jobs
from tests.conftest import (
    FLEX_COST,
    HELLO,
    WorkerThread,
    balance_of,
    drain,
    flex_charges,
    live_process_env,
    post,
    upstream_calls,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)

MANAGE = Path(settings.BASE_DIR) / "manage.py"


def queue_jobs(user, model: str, count: int) -> list[InferenceRequest]:  # type: ignore[no-untyped-def]
    import uuid

    return [
        create_job(
            job_id=uuid.uuid4(),
            owner_id=user.pk,
            api_key_id=None,
            model_alias=model,
            path="chat/completions",
            request_body={"model": model, "messages": HELLO},
            service_tier="flex",
            deadline_seconds=3600,
        )
        for _ in range(count)
    ]


def test_two_workers_racing_for_one_job_one_wins(world, user_with_credits):
    (job,) = queue_jobs(user_with_credits, "gpt-test", 1)
    start = threading.Barrier(4)
    won: dict[str, list[object]] = {}

    def claim(name: str) -> None:
        start.wait()
        won[name] = [j.id for j in claim_jobs(name, limit=10)]
        close_old_connections()

    threads = [threading.Thread(target=claim, args=(f"worker-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(len(ids) for ids in won.values()) == [0, 0, 0, 1]
    winner = next(name for name, ids in won.items() if ids)
    job.refresh_from_db()
    assert (job.state, job.claimed_by) == ("claimed", winner)


def test_two_runners_on_one_job_call_the_upstream_once(world, user_with_credits):
    (job,) = queue_jobs(user_with_credits, "gpt-test", 1)
    threads = [threading.Thread(target=run_flex_jobs) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    job.refresh_from_db()
    assert job.state == "completed"
    assert upstream_calls(world, "gpt-upstream") == 1
    assert len(flex_charges(job.id)) == 1


def test_a_model_at_its_flex_concurrency_leaves_jobs_pending(world, user_with_credits):
    DeployedModel.objects.filter(alias="gpt-test").update(flex_concurrency=2)
    queue_jobs(user_with_credits, "gpt-test", 5)

    first = claim_jobs("worker-a", limit=10)
    second = claim_jobs("worker-b", limit=10)

    assert (len(first), len(second)) == (2, 0)
    assert InferenceRequest.objects.filter(state="pending").count() == 3


def test_one_runner_keeps_many_calls_in_flight(world, user_with_credits):
    world.upstream.slow_seconds = 1.0
    DeployedModel.objects.filter(alias="slow").update(flex_concurrency=50)
    jobs = queue_jobs(user_with_credits, "slow", 40)
    try:
        finished = drain()
    finally:
        world.upstream.slow_seconds = 5.0

    assert finished == 40
    done = InferenceRequest.objects.filter(pk__in=[j.id for j in jobs], state="completed")
    # All forty were claimed together, by one runner, and so ran side by side.
    assert done.count() == 40
    assert len({(job.claimed_by, job.claimed_at) for job in done}) == 1


def test_a_runner_claims_only_jobs_whose_call_fits_in_its_time_left(world, user_with_credits):
    queue_jobs(user_with_credits, "gpt-test", 1)  # the fake endpoint's timeout is 3 s

    assert claim_jobs("worker-a", limit=10, max_call_seconds=2) == []
    assert len(claim_jobs("worker-a", limit=10, max_call_seconds=3)) == 1


def test_a_stopped_runner_gives_its_jobs_back_uncounted(world, user_with_credits):
    (job,) = queue_jobs(user_with_credits, "held", 1)
    with WorkerThread():
        wait_for(lambda: upstream_calls(world, "held") == 1)  # the call is running; the runner stops now
    job.refresh_from_db()
    assert (job.state, job.claimed_by, job.attempts) == ("pending", "", 0)

    world.upstream.release.set()
    assert drain() == 1
    job.refresh_from_db()
    assert (job.state, job.attempts) == ("completed", 1)
    assert len(flex_charges(job.id)) == 1


def test_a_job_whose_lease_lapsed_is_taken_by_the_next_claim_and_charged_once(world, user_with_credits):
    from datetime import timedelta

    from django.utils import timezone

    from gateway.accounting import write_records
    from gateway.queue import Outcome, settle_jobs, start_jobs

    DeployedModel.objects.filter(alias="gpt-test").update(flex_concurrency=1)
    (job,) = queue_jobs(user_with_credits, "gpt-test", 1)
    before = balance_of(user_with_credits)
    assert len(claim_jobs("worker-a", limit=10)) == 1
    assert start_jobs("worker-a", lambda balances: []) == [job.id]
    assert claim_jobs("worker-b", limit=10) == []  # a live lease holds the cap

    later = timezone.now() + timedelta(seconds=settings.GATEWAY_FLEX_LEASE_SECONDS + 1)
    assert [j.id for j in claim_jobs("worker-b", limit=10, now=later)] == [job.id]  # worker-a stopped renewing
    assert start_jobs("worker-b", lambda balances: []) == [job.id]
    outcome = Outcome(job.id, 200, {"object": "chat.completion"}, world.paid.id, input_tokens=12, output_tokens=30)

    assert settle_jobs("worker-a", [outcome]) == {job.id: None}  # it ran upstream too, but lost the job
    assert settle_jobs("worker-b", [outcome]) == {job.id: "completed"}
    job.refresh_from_db()
    write_records([outcome.record(job)])  # the same call written again, as a journal replay would

    assert (job.state, job.claimed_by, job.attempts) == ("completed", "worker-b", 2)
    assert len(flex_charges(job.id)) == 1
    assert balance_of(user_with_credits) == before - FLEX_COST


def test_the_sweep_fails_a_realtime_background_call_whose_gateway_died(world, user_with_credits):
    import socket
    import uuid

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    job = create_job(
        job_id=uuid.uuid4(),
        owner_id=user_with_credits.pk,
        api_key_id=None,
        model_alias="gpt-test",
        path="responses",
        request_body={"model": "gpt-test", "input": "hi", "background": True},
        background=True,
        state=JobState.PROCESSING,
        claimed_by=f"gateway:{socket.gethostname()}:{dead.stdout.strip()}",
    )

    assert job.id in sweep_jobs()

    job.refresh_from_db()
    assert job.state == "failed"
    assert "stopped before it finished" in job.error


# --- a worker process killed mid-job ---------------------------------------------------------

# Leases that lapse in two seconds, so a killed cluster's claims free up while the test waits.
SHORT_LEASES = {"GATEWAY_FLEX_LEASE_MS": "2000"}


def start_cluster() -> subprocess.Popen[bytes]:
    """A real `manage.py qcluster` on this test's database, in a process group of its own."""
    return subprocess.Popen(
        [sys.executable, str(MANAGE), "qcluster"],
        env={**live_process_env(), **SHORT_LEASES},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_cluster(cluster: subprocess.Popen[bytes]) -> None:
    os.killpg(cluster.pid, signal.SIGKILL)
    cluster.wait(10)


def test_a_worker_killed_mid_job_leaves_it_to_the_next_claim_and_it_completes_once(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    body = post(
        world, secret, "responses", {"model": "held", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    cluster = start_cluster()
    try:
        # The worker's call is held upstream until released: it is mid-job for as long as the test needs.
        job = wait_for(lambda: InferenceRequest.objects.filter(state="processing").first(), timeout=60, interval=0.1)
        wait_for(lambda: upstream_calls(world, "held") == 1)
        assert job.id.hex in body["id"]
        assert job.claimed_by.split(":")[1] != str(os.getpid())
    finally:
        kill_cluster(cluster)
    world.upstream.release.set()

    # Nobody renews the dead worker's lease: once it lapses, the next claim takes the job.
    wait_for(lambda: InferenceRequest.objects.claimable().filter(pk=job.pk).exists(), timeout=30)
    assert drain() == 1

    job.refresh_from_db()
    assert (job.state, job.attempts) == ("completed", 2)  # the killed attempt counts
    assert world.client(secret).responses.retrieve(body["id"]).status == "completed"
    assert len(flex_charges(job.id)) == 1
    assert CreditTransaction.objects.filter(kind="usage").count() == 1


def test_a_cluster_killed_with_a_queue_deeper_than_the_cap_finishes_every_job_once_after_a_restart(
    world, user_with_credits, make_key
):
    # The bug this catches: the dead workers' claims held the model's whole flex_concurrency until a
    # sweep queued behind dispatch tasks that each retried a claim that could not succeed, so after
    # the restart no job moved for minutes.
    secret = make_key(user_with_credits)
    cap = DeployedModel.objects.get(alias="held").flex_concurrency  # the default
    before = balance_of(user_with_credits)
    request = {"model": "held", "input": "hi", "service_tier": "flex", "background": True}
    for _ in range(4 * cap):
        assert post(world, secret, "responses", request).status_code == 202
    jobs = InferenceRequest.objects.filter(service_tier="flex")

    cluster = start_cluster()
    try:
        wait_for(lambda: upstream_calls(world, "held") == cap, timeout=60, interval=0.1)  # the cap is full
    finally:
        kill_cluster(cluster)
    assert jobs.filter(state="pending").count() == 3 * cap

    cluster = start_cluster()
    try:
        # The restarted cluster fills the cap again, past the dead cluster's claims...
        wait_for(lambda: upstream_calls(world, "held") >= 2 * cap, timeout=60, interval=0.1)
        world.upstream.release.set()
        # ...and runs the whole queue.
        wait_for(lambda: jobs.filter(state="completed").count() == 4 * cap, timeout=60, interval=0.2)
    finally:
        kill_cluster(cluster)

    # Every job charged exactly once, though the dead cluster's jobs ran upstream twice.
    for job in jobs:
        assert len(flex_charges(job.id)) == 1, job.attempts
    assert CreditTransaction.objects.filter(kind="usage").count() == 4 * cap
    assert balance_of(user_with_credits) == before - 4 * cap * FLEX_COST
