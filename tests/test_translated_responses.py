"""/v1/responses on an endpoint that speaks chat completions only: the gateway calls the upstream's
/chat/completions and converts both ways, in every mode (blocking, stream, background, flex), and
bills what the upstream reported, as on a native endpoint."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest
from django.test import Client, override_settings
from django.urls import reverse

from billing.models import CreditTransaction
from gateway.models import InferenceRequest, RequestLog
from gateway.services import add_endpoint, add_model
from tests.conformance import assert_stream_conforms
from tests.conftest import (
    FLEX_COST,
    FLEX_IN,
    FLEX_OUT,
    PRICE_IN,
    PRICE_OUT,
    REALTIME_COST,
    WorkerThread,
    post,
    wait_for,
)
from tests.test_admin import form_data
from tests.upstream import COMPLETION_TOKENS, HELLO_TEXT, PROMPT_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


@pytest.fixture
def chat_only(world):  # type: ignore[no-untyped-def]
    """The fake upstream as an endpoint set to translate, with a paid model and failure models."""
    endpoint, _ = add_endpoint(
        "chat-only", world.upstream.base_url, api_key="upstream-secret", timeout_seconds=30, responses_api="translate"
    )
    prices = {
        "input_price": PRICE_IN,
        "output_price": PRICE_OUT,
        "flex_input_price": FLEX_IN,
        "flex_output_price": FLEX_OUT,
    }
    add_model("chat-test", endpoint=endpoint, upstream_model="gpt-upstream", groups=["research"], **prices)
    for behaviour in ("length", "fail-500", "fail-400", "long-stream"):
        add_model(f"chat-{behaviour}", endpoint=endpoint, upstream_model=behaviour, groups=["research"], **prices)
    return world


def upstream_bodies(world) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """What the upstream was asked, in order; every call a chat completions call."""
    assert {seen["path"] for seen in world.upstream.requests} == {"/v1/chat/completions"}
    return [seen["body"] for seen in world.upstream.requests]


def cost_of(response_id: str) -> Decimal:
    """What the call of this response was billed, once written (its request log and its ledger row)."""
    request_id = response_id.replace("resp_", "req_")
    logs = RequestLog.objects.filter(request_id=request_id, cost__isnull=False)
    wait_for(logs.exists)
    charges = CreditTransaction.objects.filter(
        kind="usage", source_id=str(uuid.UUID(response_id.removeprefix("resp_")))
    )
    wait_for(charges.exists)
    assert charges.count() == 1
    assert charges.get().amount == logs.get().cost
    return logs.get().cost  # type: ignore[return-value]


def test_a_translated_response_asks_the_chat_upstream_the_same_and_answers_as_the_responses_api(
    chat_only, user_with_credits, make_key
):
    client = chat_only.client(make_key(user_with_credits))

    response = client.responses.create(
        model="chat-test",
        input="hi",
        instructions="Answer briefly.",
        max_output_tokens=50,
        temperature=0.2,
        top_p=0.9,
        metadata={"ticket": "42"},
        store=True,
    )

    assert (response.status, response.model, response.output_text) == ("completed", "chat-test", HELLO_TEXT)
    assert response.output[0].type == "message" and response.output[0].content[0].annotations == []
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        PROMPT_TOKENS + COMPLETION_TOKENS,
    )
    assert response.metadata == {"ticket": "42"}  # kept in our record, never sent
    assert upstream_bodies(chat_only) == [
        {
            "model": "gpt-upstream",
            "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}],
            "max_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
        }
    ]
    fetched = client.responses.retrieve(response.id)
    assert (fetched.status, fetched.output_text, fetched.output[0].id) == (
        "completed",
        HELLO_TEXT,
        response.output[0].id,
    )
    assert cost_of(response.id) == REALTIME_COST


def test_a_translated_stream_is_the_responses_event_sequence_and_is_billed_once(chat_only, user_with_credits, make_key):
    secret = make_key(user_with_credits)

    reply = post(chat_only, secret, "responses", {"model": "chat-test", "input": "hi", "stream": True})

    assert reply.status_code == 200
    events = assert_stream_conforms(reply.content, "ResponseStreamEvent")
    ours = "resp_" + reply.headers["x-request-id"].removeprefix("req_")
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    for event in events:
        if "response" in event:
            assert (event["response"]["id"], event["response"]["model"]) == (ours, "chat-test")
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == HELLO_TEXT
    assert events[-1]["response"]["usage"]["input_tokens"] == PROMPT_TOKENS
    (asked,) = upstream_bodies(chat_only)
    assert asked["stream"] is True and asked["stream_options"] == {"include_usage": True}
    client = chat_only.client(secret)
    fetched = client.responses.retrieve(ours)  # on record before the last event went out
    assert (fetched.status, fetched.output_text) == ("completed", HELLO_TEXT)
    assert cost_of(ours) == REALTIME_COST


def leave_after(world, secret: str, model: str, events: int) -> str:  # type: ignore[no-untyped-def]
    """Read `events` events of a streamed response, then hang up; returns the response's id."""
    request = {"model": model, "input": "hi", "stream": True}
    headers = {"Authorization": f"Bearer {secret}"}
    with httpx.stream("POST", f"{world.url}/ai/v1/responses", json=request, headers=headers) as reply:
        seen = b""
        for chunk in reply.iter_raw():
            seen += chunk
            if seen.count(b"\n\n") >= events:
                break
    return "resp_" + reply.headers["x-request-id"].removeprefix("req_")


def test_a_client_that_leaves_a_translated_stream_is_billed_the_upstreams_usage(chat_only, user_with_credits, make_key):
    ours = leave_after(chat_only, make_key(user_with_credits), "chat-long-stream", 3)

    # The gateway read the chat stream on (6 s more) to its usage chunk, and finished the record.
    log = wait_for(lambda: RequestLog.objects.filter(request_id=ours.replace("resp_", "req_")).first(), timeout=20)
    assert (log.input_tokens, log.output_tokens, log.usage_estimated) == (PROMPT_TOKENS, COMPLETION_TOKENS, False)
    assert cost_of(ours) == REALTIME_COST
    record = wait_for(lambda: InferenceRequest.objects.filter(state="completed").first())
    assert record.response_body["output"][0]["content"][0]["text"] == HELLO_TEXT * 20


@override_settings(GATEWAY_STREAM_DRAIN_SECONDS=0)
def test_a_translated_stream_cut_before_its_usage_is_billed_the_gateways_own_count(
    chat_only, user_with_credits, make_key
):
    chat_only.upstream.stream_closed.clear()
    ours = leave_after(chat_only, make_key(user_with_credits), "chat-long-stream", 5)

    wait_for(chat_only.upstream.stream_closed.is_set, timeout=5)  # not waited for: the upstream was hung up on
    log = wait_for(lambda: RequestLog.objects.filter(request_id=ours.replace("resp_", "req_")).first())
    assert log.usage_estimated and log.input_tokens > 0 and log.output_tokens >= 2
    assert cost_of(ours) == log.cost > 0
    failed = wait_for(lambda: InferenceRequest.objects.filter(state="failed").first())
    assert failed.error  # the stream was cut: never shown as completed


def test_the_sdks_stream_helper_yields_the_final_response_of_a_translated_stream(
    chat_only, user_with_credits, make_key
):
    client = chat_only.client(make_key(user_with_credits))

    with client.responses.stream(model="chat-test", input="hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()

    assert "".join(deltas) == HELLO_TEXT
    assert (final.status, final.output_text, final.model) == ("completed", HELLO_TEXT, "chat-test")
    with client.responses.stream(model="chat-test", input="hi", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        kinds = [event.type for event in stream]
        called = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    call = called.output[0]
    assert call.type == "function_call"
    assert (call.name, call.call_id, orjson.loads(call.arguments)) == ("get_weather", "call_1", {"city": "hello"})


def test_a_function_call_comes_back_and_its_output_goes_upstream_as_a_tool_result(
    chat_only, user_with_credits, make_key
):
    client = chat_only.client(make_key(user_with_credits))

    first = client.responses.create(model="chat-test", input="weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
    call = first.output[0]
    assert call.type == "function_call"
    assert (call.name, call.call_id, call.status) == ("get_weather", "call_1", "completed")
    follow_up = client.responses.create(
        model="chat-test",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
    )

    assert follow_up.output_text == HELLO_TEXT
    tool = {"type": "function", "function": {key: value for key, value in WEATHER.items() if key != "type"}}
    first_asked, second_asked = upstream_bodies(chat_only)
    assert first_asked["tools"] == [tool]
    assert second_asked["tool_choice"] == "none"
    assert second_asked["messages"] == [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert (cost_of(first.id), cost_of(follow_up.id)) == (REALTIME_COST, REALTIME_COST)


def test_a_json_schema_text_format_is_asked_as_a_chat_response_format(chat_only, user_with_credits, make_key):
    client = chat_only.client(make_key(user_with_credits))
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    text_format = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}

    response = client.responses.create(model="chat-test", input="2+2?", text={"format": text_format})  # type: ignore[typeddict-item]

    assert orjson.loads(response.output_text) == {"answer": 1}
    (asked,) = upstream_bodies(chat_only)
    assert asked["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


def test_an_answer_cut_at_the_token_limit_is_incomplete_in_json_and_stream(chat_only, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    client = chat_only.client(secret)

    response = client.responses.create(model="chat-length", input="hi", max_output_tokens=5)
    reply = post(chat_only, secret, "responses", {"model": "chat-length", "input": "hi", "stream": True})

    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert client.responses.retrieve(response.id).status == "incomplete"
    assert upstream_bodies(chat_only)[0]["max_tokens"] == 5
    last = assert_stream_conforms(reply.content, "ResponseStreamEvent")[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cost_of(response.id) == REALTIME_COST  # the tokens were spent all the same


def test_a_translated_background_response_is_polled_to_its_answer_and_billed(chat_only, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    client = chat_only.client(secret)

    accepted = client.responses.create(model="chat-test", input="hi", background=True)

    assert accepted.status in ("queued", "in_progress")
    done = wait_for(
        lambda: (r := client.responses.retrieve(accepted.id)).status not in ("queued", "in_progress") and r,
        timeout=30,
    )
    assert (done.status, done.output_text, done.background) == ("completed", HELLO_TEXT, True)
    (asked,) = upstream_bodies(chat_only)
    assert "stream" not in asked and "background" not in asked
    assert cost_of(accepted.id) == REALTIME_COST


def test_a_translated_flex_response_is_run_by_the_worker_on_chat_completions(chat_only, user_with_credits, make_key):
    client = chat_only.client(make_key(user_with_credits))

    with WorkerThread():
        response = client.responses.create(model="chat-test", input="hi", service_tier="flex")

    assert (response.status, response.output_text, response.service_tier) == ("completed", HELLO_TEXT, "flex")
    assert response.usage is not None and response.usage.output_tokens == COMPLETION_TOKENS
    (asked,) = upstream_bodies(chat_only)
    assert "service_tier" not in asked
    assert cost_of(response.id) == FLEX_COST


@pytest.mark.parametrize(
    ("model", "error", "code"),
    [
        ("chat-fail-500", openai.InternalServerError, "server_error"),
        ("chat-fail-400", openai.BadRequestError, "invalid_prompt"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_upstreams_error_fails_the_translated_response_like_a_native_one(
    chat_only, user_with_credits, make_key, model, error, code, stream
):
    secret = make_key(user_with_credits)
    client = chat_only.client(secret)

    with pytest.raises(error) as raised:
        client.responses.create(model=model, input="hi", stream=stream)

    assert [asked["model"] for asked in upstream_bodies(chat_only)] == [model.removeprefix("chat-")]
    ours = "resp_" + raised.value.response.headers["x-request-id"].removeprefix("req_")
    failed = client.responses.retrieve(ours)
    assert failed.status == "failed"
    assert failed.error is not None and (failed.error.code, failed.error.message) == (
        code,
        f"upstream says {model[-3:]}",
    )
    wait_for(RequestLog.objects.filter(request_id=ours.replace("resp_", "req_")).exists)
    assert not CreditTransaction.objects.filter(kind="usage").exists()


def test_an_endpoint_set_to_translate_in_the_admin_reaches_the_auth_snapshot(
    staff_client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    from gateway.snapshot import get_snapshot

    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1")
    add_model("chat-model", endpoint=endpoint, public=True)
    assert get_snapshot().models["chat-model"].endpoint.translates_responses is False
    url = reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    data = form_data(staff_client.get(url))
    data["responses_api"] = "translate"
    with django_capture_on_commit_callbacks(execute=True):
        assert staff_client.post(url, data).status_code == 302
    assert get_snapshot().models["chat-model"].endpoint.translates_responses is True
