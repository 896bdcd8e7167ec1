"""Flex tier end to end: the official openai client, the live gateway, the fake upstream and flex workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from django.conf import settings
from django.db import close_old_connections

from billing.models import CreditTransaction
from billing.services import create_user, remove_credits
from gateway import flex
from gateway.jobs import create_job
from gateway.models import DeployedModel, InferenceRequest, JobState, RequestLog
from gateway.queue import claim_jobs, sweep_jobs
from gateway.worker import run_flex_jobs
from routing_rules.services import add_traffic_rule
from tests.conftest import FLEX_IN, FLEX_OUT, balance_of, live_database_url, wait_for
from tests.upstream import COMPLETION_TOKENS, PROMPT_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)

FLEX_COST = (FLEX_IN * PROMPT_TOKENS + FLEX_OUT * COMPLETION_TOKENS) / Decimal(1_000_000)
HELLO = [{"role": "user", "content": "hi"}]
MANAGE = Path(settings.BASE_DIR) / "manage.py"


class WorkerThread:
    """A flex runner on its own thread and event loop, as a qcluster worker would run it."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            run_flex_jobs(linger=True, lifetime=3600, hard_stop=3600, stop=self.stop)
        finally:
            close_old_connections()

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the flex worker did not stop"


@pytest.fixture
def flex_worker(world) -> Iterator[WorkerThread]:
    with WorkerThread() as worker:
        yield worker


def drain() -> int:
    """Run one runner until nothing is due, on a thread of its own (as a worker process would)."""
    finished: list[int] = []
    thread = threading.Thread(target=lambda: finished.append(run_flex_jobs()))
    thread.start()
    thread.join(60)
    return finished[0]


def flex_charges(job_id: object) -> list[CreditTransaction]:
    return list(CreditTransaction.objects.filter(kind="usage", source_id=str(job_id)))


def upstream_calls(world, model: str) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for seen in world.upstream.requests if seen["body"].get("model") == model)


def post(world, secret: str, path: str, body: dict) -> httpx.Response:  # type: ignore[no-untyped-def, type-arg]
    return httpx.post(f"{world.url}/ai/v1/{path}", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=30)


# --- the happy paths ---------------------------------------------------------------------------


def test_blocking_flex_chat_returns_the_upstream_result_charged_once_at_the_flex_price(
    world, flex_worker, user_with_credits, make_key
):
    client = world.client(make_key(user_with_credits))
    before = balance_of(user_with_credits)

    completion = client.chat.completions.create(model="gpt-test", messages=HELLO, service_tier="flex")

    assert completion.choices[0].message.content == "Hello from upstream"
    seen = world.upstream.requests[-1]
    assert seen["body"]["model"] == "gpt-upstream"
    assert "service_tier" not in seen["body"]
    assert seen["headers"]["Authorization"] == "Bearer upstream-secret"
    job = InferenceRequest.objects.get()
    assert (job.state, job.service_tier, job.model_alias, job.attempts) == ("completed", "flex", "gpt-test", 1)
    assert job.deadline is not None
    assert [row.amount for row in flex_charges(job.id)] == [FLEX_COST]
    assert flex_charges(job.id)[0].tier == "flex"
    assert balance_of(user_with_credits) == before - FLEX_COST
    assert RequestLog.objects.get(request_id=job.id.hex).service_tier == "flex"


def test_background_flex_response_is_queued_then_completes(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    client = world.client(secret)
    reply = post(
        world, secret, "responses", {"model": "gpt-test", "input": "hi", "service_tier": "flex", "background": True}
    )

    assert reply.status_code == 202
    body = reply.json()
    assert (body["object"], body["status"], body["service_tier"], body["background"]) == (
        "response",
        "queued",
        "flex",
        True,
    )
    assert client.responses.retrieve(body["id"]).status == "queued"

    with WorkerThread():
        done = wait_for(lambda: (r := client.responses.retrieve(body["id"])).status == "completed" and r)

    assert done.id == body["id"]
    assert done.output_text == "Hello from upstream"
    assert done.service_tier == "flex"
    job = InferenceRequest.objects.get()
    assert [row.amount for row in flex_charges(job.id)] == [FLEX_COST]


def test_a_job_is_in_progress_while_a_worker_runs_it(world, user_with_credits, make_key):
    world.upstream.slow_seconds = 1.5
    secret = make_key(user_with_credits)
    client = world.client(secret)
    body = post(
        world, secret, "responses", {"model": "slow", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    try:
        with WorkerThread():
            wait_for(lambda: client.responses.retrieve(body["id"]).status == "in_progress")
            wait_for(lambda: client.responses.retrieve(body["id"]).status == "completed")
    finally:
        world.upstream.slow_seconds = 5.0


def test_blocking_flex_response_carries_our_id(world, flex_worker, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    response = client.responses.create(model="gpt-test", input="hi", service_tier="flex")

    assert response.id.startswith("resp_") and response.id != "resp_upstream123"
    assert response.output_text == "Hello from upstream"
    assert response.service_tier == "flex"
    assert client.responses.retrieve(response.id).status == "completed"


def test_streamed_flex_chat_is_replayed_as_chunks(world, flex_worker, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    chunks = list(client.chat.completions.create(model="gpt-test", messages=HELLO, stream=True, service_tier="flex"))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from upstream"
    assert chunks[-1].usage.completion_tokens == COMPLETION_TOKENS
    assert "stream" not in world.upstream.requests[-1]["body"]


def test_streamed_flex_response_is_replayed_as_events(world, flex_worker, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    events = list(client.responses.create(model="gpt-test", input="hi", stream=True, service_tier="flex"))

    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "Hello from upstream"
    assert events[0].response.id == events[-1].response.id != "resp_upstream123"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["Hello from upstream"]


# --- failures and retries ----------------------------------------------------------------------


def test_flex_job_retries_two_503s_then_completes_and_is_charged_once(world, flex_worker, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    messages = [{"role": "user", "content": f"flaky {time.time()}"}]

    completion = client.chat.completions.create(model="flaky", messages=messages, service_tier="flex")

    assert completion.choices[0].message.content == "Hello from upstream"
    job = InferenceRequest.objects.get()
    assert (job.state, job.attempts) == ("completed", 3)
    assert upstream_calls(world, "flaky") == 3
    assert [row.amount for row in flex_charges(job.id)] == [FLEX_COST]


def test_upstream_400_fails_a_flex_job_at_once(world, flex_worker, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="fail-400", messages=HELLO, service_tier="flex")

    assert "upstream says 400" in str(excinfo.value)
    job = InferenceRequest.objects.get()
    assert (job.state, job.attempts, job.response_status) == ("failed", 1, 400)
    assert job.response_body["error"]["message"] == "upstream says 400"
    assert upstream_calls(world, "fail-400") == 1
    assert not flex_charges(job.id)
    assert client.responses.retrieve(job.public_id).status == "failed"


def test_a_job_cancelled_before_its_claim_never_runs_and_is_never_charged(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    client = world.client(secret)
    body = post(
        world, secret, "responses", {"model": "gpt-test", "input": "hi", "service_tier": "flex", "background": True}
    ).json()

    cancelled = client.responses.cancel(body["id"])
    drain()

    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(body["id"]).status == "cancelled"
    assert upstream_calls(world, "gpt-upstream") == 0
    assert not CreditTransaction.objects.filter(kind="usage").exists()


def test_a_job_cancelled_while_running_is_not_charged(world, user_with_credits, make_key):
    world.upstream.slow_seconds = 1.5
    secret = make_key(user_with_credits)
    client = world.client(secret)
    body = post(
        world, secret, "responses", {"model": "slow", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    try:
        with WorkerThread():
            wait_for(lambda: client.responses.retrieve(body["id"]).status == "in_progress")
            client.responses.cancel(body["id"])
            wait_for(lambda: upstream_calls(world, "slow") == 1)
            time.sleep(2)
    finally:
        world.upstream.slow_seconds = 5.0
    assert client.responses.retrieve(body["id"]).status == "cancelled"
    assert not CreditTransaction.objects.filter(kind="usage").exists()


def test_deadline_passed_gives_504_to_the_blocking_client_and_failed_to_get(
    world, user_with_credits, make_key, settings
):
    settings.GATEWAY_FLEX_WINDOW = 1
    client = world.client(make_key(user_with_credits))

    with pytest.raises(openai.APIStatusError) as excinfo:
        client.responses.create(model="gpt-test", input="hi", service_tier="flex")

    assert excinfo.value.status_code == 504
    assert "deadline" in excinfo.value.message
    job = InferenceRequest.objects.get()
    fetched = client.responses.retrieve(job.public_id)
    assert fetched.status == "failed"
    assert "deadline" in fetched.error.message
    drain()
    assert upstream_calls(world, "gpt-upstream") == 0


def test_the_sweep_fails_a_background_job_past_its_deadline(world, user_with_credits, make_key, settings):
    settings.GATEWAY_FLEX_WINDOW = 1
    secret = make_key(user_with_credits)
    body = post(
        world, secret, "responses", {"model": "gpt-test", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    time.sleep(1.2)

    sweep_jobs()

    fetched = world.client(secret).responses.retrieve(body["id"])
    assert fetched.status == "failed"
    assert "deadline" in fetched.error.message


# --- admission is the same as in real time -------------------------------------------------------


def test_a_deny_rule_blocks_flex_as_it_blocks_realtime(world, user_with_credits, make_key):
    add_traffic_rule(world.paid, purpose="realtime", action="deny")
    client = world.client(make_key(user_with_credits))

    for tier in ("flex", "auto"):
        with pytest.raises(openai.PermissionDeniedError) as excinfo:
            client.chat.completions.create(model="gpt-test", messages=HELLO, service_tier=tier)
        assert excinfo.value.body["message"] == (
            "Real-time access to 'gpt-test' is blocked by a routing rule. "
            "Please contact your administrator to request access."
        )
    assert not InferenceRequest.objects.exists()


def test_a_zero_balance_is_refused_for_flex_as_for_realtime(world, user_without_credits, make_key):
    client = world.client(make_key(user_without_credits))

    for tier in ("flex", "auto"):
        with pytest.raises(openai.APIStatusError) as excinfo:
            client.chat.completions.create(model="gpt-test", messages=HELLO, service_tier=tier)
        assert excinfo.value.status_code == 402
        assert excinfo.value.body["message"] == "Account balance too low. Please add credits to continue."
    assert not InferenceRequest.objects.exists()


def test_a_user_who_ran_dry_after_submitting_fails_at_dispatch_uncalled(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    body = post(
        world, secret, "responses", {"model": "gpt-test", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    remove_credits(user_with_credits, balance_of(user_with_credits))

    drain()

    job = InferenceRequest.objects.get()
    assert (job.state, job.response_status) == ("failed", 402)
    fetched = world.client(secret).responses.retrieve(body["id"])
    assert fetched.error.message == "Account balance too low. Please add credits to continue."
    assert upstream_calls(world, "gpt-upstream") == 0


# --- workers ---------------------------------------------------------------------------------


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
    world.upstream.slow_seconds = 2.0
    (job,) = queue_jobs(user_with_credits, "slow", 1)
    try:
        with WorkerThread():
            wait_for(lambda: InferenceRequest.objects.filter(state="processing").exists())
        job.refresh_from_db()
        assert (job.state, job.claimed_by, job.attempts) == ("pending", "", 0)

        assert drain() == 1
    finally:
        world.upstream.slow_seconds = 5.0
    job.refresh_from_db()
    assert (job.state, job.attempts) == ("completed", 1)
    assert len(flex_charges(job.id)) == 1


def test_a_waiting_client_is_woken_by_a_push(world, flex_worker, user_with_credits, make_key, monkeypatch):
    if flex.push_layer() is None:
        pytest.skip("needs a channel layer that crosses processes (REDIS_URL)")
    time.sleep(1.2)  # let a poller of an earlier test notice it has nothing left to watch
    monkeypatch.setattr(flex, "PUSHED_POLL_SECONDS", 60.0)
    client = world.client(make_key(user_with_credits), timeout=15)

    completion = client.chat.completions.create(model="gpt-test", messages=HELLO, service_tier="flex")

    assert completion.choices[0].message.content == "Hello from upstream"


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


def test_a_worker_killed_mid_job_is_swept_and_the_job_completes_once(world, user_with_credits, make_key):
    world.upstream.slow_seconds = 2.0
    secret = make_key(user_with_credits)
    body = post(
        world, secret, "responses", {"model": "slow", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    env = {**os.environ, "DATABASE_URL": live_database_url(), "DJANGO_SECRET_KEY": settings.SECRET_KEY}
    cluster = subprocess.Popen(
        [sys.executable, str(MANAGE), "qcluster"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        job = wait_for(lambda: InferenceRequest.objects.filter(state="processing").first(), timeout=60, interval=0.1)
        assert job.id.hex in body["id"]
        assert job.claimed_by.split(":")[1] != str(os.getpid())
    finally:
        os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait(10)
    try:
        # The dead worker's claim is returned to the queue at once: its process is gone.
        time.sleep(0.2)
        sweep_jobs()
        job.refresh_from_db()
        assert (job.state, job.claimed_by) == ("pending", "")

        assert drain() == 1
    finally:
        world.upstream.slow_seconds = 5.0

    job.refresh_from_db()
    assert (job.state, job.attempts) == ("completed", 2)  # the killed attempt counts
    assert world.client(secret).responses.retrieve(body["id"]).status == "completed"
    assert len(flex_charges(job.id)) == 1
    assert CreditTransaction.objects.filter(kind="usage").count() == 1


def test_flex_users_only_see_their_own_jobs(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    body = post(
        world, secret, "responses", {"model": "gpt-test", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    stranger = create_user("eve", credits=Decimal("5"), groups=["research"])

    with pytest.raises(openai.NotFoundError):
        world.client(make_key(stranger)).responses.retrieve(body["id"])
    with pytest.raises(openai.NotFoundError):
        world.client(make_key(stranger)).responses.cancel(body["id"])


def test_the_keys_rate_limit_counts_flex_submissions_too(world, user_with_credits, make_key):
    secret = make_key(user_with_credits, requests_per_second=1, burst_size=1)
    body = {"model": "gpt-test", "input": "hi", "service_tier": "flex", "background": True}

    assert post(world, secret, "responses", body).status_code == 202
    refused = post(world, secret, "responses", body)

    assert refused.status_code == 429
    assert InferenceRequest.objects.count() == 1
