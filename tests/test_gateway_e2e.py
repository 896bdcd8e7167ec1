"""End-to-end: the official openai client against a live gateway and a live fake upstream."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from billing.models import CreditTransaction
from gateway.models import InferenceRequest, RequestLog
from tests.conftest import PRICE_IN, REALTIME_COST, balance_of, wait_for
from tests.upstream import COMPLETION_TOKENS, PROMPT_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hi"}]


def test_chat_completion_is_proxied_and_charged_exactly(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    before = balance_of(user_with_credits)

    completion = client.chat.completions.create(model="gpt-test", messages=HELLO)

    assert completion.choices[0].message.content == "Hello from upstream"
    seen = world.upstream.requests[-1]
    assert seen["body"]["model"] == "gpt-upstream"
    assert seen["headers"]["Authorization"] == "Bearer upstream-secret"
    wait_for(lambda: balance_of(user_with_credits) != before)
    assert balance_of(user_with_credits) == before - REALTIME_COST
    row = CreditTransaction.objects.get(kind="usage", user=user_with_credits)
    assert row.amount == REALTIME_COST
    log = RequestLog.objects.get(request_id=f"req_{row.source_id}")
    assert (log.status_code, log.input_tokens, log.output_tokens) == (200, PROMPT_TOKENS, COMPLETION_TOKENS)


def test_streamed_chat_is_relayed_and_charged_from_the_usage_chunk(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    before = balance_of(user_with_credits)

    chunks = list(client.chat.completions.create(model="gpt-test", messages=HELLO, stream=True))

    # The loop of OpenAI's docs: the usage chunk (no choices) the gateway asked for is not relayed.
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "Hello from upstream"
    assert world.upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    wait_for(lambda: balance_of(user_with_credits) != before)
    assert balance_of(user_with_credits) == before - REALTIME_COST


def test_a_streamed_chat_that_asks_for_usage_gets_the_usage_chunk_last(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    stream = client.chat.completions.create(
        model="gpt-test", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == COMPLETION_TOKENS
    assert all(chunk.choices for chunk in chunks[:-1])


def test_embeddings_are_proxied_and_charged(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    before = balance_of(user_with_credits)

    result = client.embeddings.create(model="embed-test", input="hello")

    assert result.data[0].embedding == [0.1, 0.2, 0.3]
    expected = (PRICE_IN * PROMPT_TOKENS) / Decimal(1_000_000)
    wait_for(lambda: balance_of(user_with_credits) != before)
    assert balance_of(user_with_credits) == before - expected


def test_free_model_is_never_charged(world, user_without_credits, make_key):
    client = world.client(make_key(user_without_credits))

    client.chat.completions.create(model="free-model", messages=HELLO)

    wait_for(lambda: RequestLog.objects.filter(model_alias="free-model").exists())
    assert not CreditTransaction.objects.filter(kind="usage").exists()


def test_models_lists_only_reachable_models(world, outsider, user_without_credits, make_key):
    outsider_ids = {m.id for m in world.client(make_key(outsider)).models.list()}
    member_ids = {m.id for m in world.client(make_key(user_without_credits)).models.list()}

    assert outsider_ids == {"free-model"}
    assert {"gpt-test", "embed-test", "free-model"} <= member_ids


def test_responses_call_is_recorded_under_the_id_the_client_saw(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    response = client.responses.create(model="gpt-test", input="hi")

    assert response.id.startswith("resp_") and response.id != "resp_upstream123"
    assert response.output_text == "Hello from upstream"
    fetched = client.responses.retrieve(response.id)
    assert fetched.id == response.id
    assert fetched.status == "completed"
    assert fetched.output_text == "Hello from upstream"


def test_streamed_responses_call_shows_our_id(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    events = list(client.responses.create(model="gpt-test", input="hi", stream=True))

    completed = events[-1].response
    assert completed.id.startswith("resp_") and completed.id != "resp_upstream123"
    assert events[0].response.id == completed.id
    wait_for(lambda: InferenceRequest.objects.filter(state="completed").exists())
    assert client.responses.retrieve(completed.id).status == "completed"


def test_background_response_returns_202_then_completes(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    reply = httpx.post(
        f"{world.url}/ai/v1/responses",
        json={"model": "gpt-test", "input": "hi", "background": True},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert reply.status_code == 202
    body = reply.json()
    assert (body["object"], body["status"], body["background"]) == ("response", "in_progress", True)

    client = world.client(secret)
    done = wait_for(lambda: (r := client.responses.retrieve(body["id"])).status == "completed" and r)
    assert done.output_text == "Hello from upstream"


def test_another_users_response_is_not_found(world, user_with_credits, user_without_credits, make_key):
    response = world.client(make_key(user_with_credits)).responses.create(model="gpt-test", input="hi")

    with pytest.raises(openai.NotFoundError):
        world.client(make_key(user_without_credits)).responses.retrieve(response.id)


def test_a_streamed_responses_call_is_charged_from_its_completed_event(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    before = balance_of(user_with_credits)

    events = list(client.responses.create(model="gpt-test", input="hi", stream=True))

    job = InferenceRequest.objects.get(pk=events[-1].response.id.removeprefix("resp_"))
    wait_for(lambda: balance_of(user_with_credits) != before)
    assert balance_of(user_with_credits) == before - REALTIME_COST
    wait_for(lambda: InferenceRequest.objects.get(pk=job.pk).cost is not None)
    job.refresh_from_db()
    assert (job.state, job.input_tokens, job.output_tokens, job.cost) == (
        "completed",
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        REALTIME_COST,
    )


def test_a_background_responses_call_is_charged_with_its_tokens(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    before = balance_of(user_with_credits)
    reply = httpx.post(
        f"{world.url}/ai/v1/responses",
        json={"model": "gpt-test", "input": "hi", "background": True},
        headers={"Authorization": f"Bearer {secret}"},
    )
    job_id = reply.json()["id"].removeprefix("resp_")

    wait_for(lambda: balance_of(user_with_credits) != before)
    assert balance_of(user_with_credits) == before - REALTIME_COST
    job = InferenceRequest.objects.get(pk=job_id)
    assert (job.state, job.input_tokens, job.output_tokens) == ("completed", PROMPT_TOKENS, COMPLETION_TOKENS)
    log = RequestLog.objects.get(request_id=f"req_{job.id.hex}")
    assert (log.input_tokens, log.output_tokens, log.cost) == (PROMPT_TOKENS, COMPLETION_TOKENS, REALTIME_COST)
