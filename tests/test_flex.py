"""Flex tier end to end: the official openai client, the live gateway, the fake upstream and flex workers."""

from __future__ import annotations

import time
from decimal import Decimal

import openai
import pytest

from billing.models import CreditTransaction
from billing.services import create_user, remove_credits
from gateway import flex
from gateway.models import InferenceRequest, RequestLog
from gateway.queue import sweep_jobs
from routing_rules.services import add_traffic_rule
from tests.conftest import (
    FLEX_COST,
    HELLO,
    WorkerThread,
    balance_of,
    drain,
    flex_charges,
    post,
    upstream_calls,
    wait_for,
)
from tests.upstream import COMPLETION_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)


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
    assert RequestLog.objects.get(request_id=f"req_{job.id.hex}").service_tier == "flex"


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
    secret = make_key(user_with_credits)
    client = world.client(secret)
    body = post(
        world, secret, "responses", {"model": "held", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    with WorkerThread():
        wait_for(lambda: client.responses.retrieve(body["id"]).status == "in_progress")
        world.upstream.release.set()
        wait_for(lambda: client.responses.retrieve(body["id"]).status == "completed")


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

    # The loop of OpenAI's docs: every chunk has a choice, as no usage chunk was asked for.
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "Hello from upstream"
    assert {chunk.service_tier for chunk in chunks} == {"flex"}
    assert "stream" not in world.upstream.requests[-1]["body"]


def test_a_streamed_flex_chat_that_asks_for_usage_gets_it_last(world, flex_worker, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    chunks = list(
        client.chat.completions.create(
            model="gpt-test",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
            service_tier="flex",
        )
    )

    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == COMPLETION_TOKENS
    assert all(chunk.choices for chunk in chunks[:-1])


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
    secret = make_key(user_with_credits)
    client = world.client(secret)
    body = post(
        world, secret, "responses", {"model": "held", "input": "hi", "service_tier": "flex", "background": True}
    ).json()
    with WorkerThread() as worker:
        wait_for(lambda: upstream_calls(world, "held") == 1)  # the call is running upstream
        client.responses.cancel(body["id"])
        world.upstream.release.set()  # the upstream answers after the cancel
        wait_for(lambda: not worker.runner.in_flight)  # and the worker has settled that answer
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

    wait_for(lambda: body["id"] in {f"resp_{job_id.hex}" for job_id in sweep_jobs()})  # once its 1 s is up

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


def test_a_waiting_client_is_woken_by_a_push(world, flex_worker, user_with_credits, make_key, monkeypatch):
    if flex.push_layer() is None:
        pytest.skip("needs a channel layer that crosses processes (REDIS_URL)")
    time.sleep(1.2)  # let a poller of an earlier test notice it has nothing left to watch
    monkeypatch.setattr(flex, "PUSHED_POLL_SECONDS", 60.0)
    client = world.client(make_key(user_with_credits), timeout=15)

    completion = client.chat.completions.create(model="gpt-test", messages=HELLO, service_tier="flex")

    assert completion.choices[0].message.content == "Hello from upstream"


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
