"""What the gateway writes itself, held to OpenAI's OpenAPI description and OpenAI's behaviour.

Every JSON body a test client receives is validated by tests/conformance.py's hook; these tests
produce each body the gateway writes in each of its states, and pin the behaviours around them.
"""

from __future__ import annotations

import copy

import httpx
import openai
import pytest

from gateway.models import InferenceRequest, RequestLog
from tests.conformance import assert_conforms, assert_stream_conforms, conforming_client, violations
from tests.conftest import (
    FLEX_COST,
    HELLO,
    REALTIME_COST,
    WorkerThread,
    flex_charges,
    post,
    upstream_calls,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTED = {
    "instructions": "Answer briefly.",
    "temperature": 0.2,
    "top_p": 0.9,
    "metadata": {"ticket": "42"},
    "parallel_tool_calls": False,
}


def raw(world, secret: str, method: str, path: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    with conforming_client(timeout=30) as client:
        headers = {"Authorization": f"Bearer {secret}"}
        return client.request(method, f"{world.url}/ai/v1/{path}", headers=headers, **kwargs)


# --- the helper itself ---------------------------------------------------------------------------


def test_the_helper_names_a_missing_required_property():
    model = {"id": "gpt-test", "object": "model", "created": 1, "owned_by": "dwctl"}
    assert_conforms(model, "Model")

    found = violations({key: value for key, value in model.items() if key != "owned_by"}, "Model")

    assert found == ["(the body): 'owned_by' is a required property"]
    with pytest.raises(AssertionError, match="owned_by"):
        assert_conforms({"id": "gpt-test", "object": "model", "created": 1}, "Model")


def test_the_helper_rejects_a_response_error_code_off_the_closed_list():
    response = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "gpt-test",
        "output": [],
        "error": {"code": "upstream_error", "message": "no"},
        "incomplete_details": None,
        "instructions": None,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "metadata": {},
        "temperature": None,
        "top_p": None,
    }
    fixed = copy.deepcopy(response)
    fixed["error"]["code"] = "server_error"
    assert_conforms(fixed, "Response")

    assert any(line.startswith("error/code:") for line in violations(response, "Response"))


# --- the Response object, in every state ---------------------------------------------------------


def test_a_response_keeps_its_id_creation_time_alias_and_request_fields_in_every_state(
    world, user_with_credits, make_key
):
    secret = make_key(user_with_credits)
    client = world.client(secret)
    body = {"model": "held", "input": "hi", "service_tier": "flex", "background": True, **REQUESTED}

    states = [post(world, secret, "responses", body).json()]  # queued; validated by the hook
    with WorkerThread():
        states.append(wait_for(lambda: (r := client.responses.retrieve(states[0]["id"])).status == "in_progress" and r))
        world.upstream.release.set()
        states.append(wait_for(lambda: (r := client.responses.retrieve(states[0]["id"])).status == "completed" and r))

    first, *later = states
    assert first["status"] == "queued" and "usage" not in first
    for response in later:
        assert (response.id, response.created_at, response.model) == (first["id"], first["created_at"], "held")
        for name, value in REQUESTED.items():
            assert getattr(response, name) == value
    assert later[-1].usage.input_tokens_details.cached_tokens == 0
    assert later[-1].completed_at is not None


def test_a_realtime_response_shows_the_alias_asked_for_and_the_requests_tools(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}, "strict": False}

    response = client.responses.create(model="gpt-test", input="hi", tools=[tool], tool_choice="auto")

    assert response.model == "gpt-test"  # not the upstream's "gpt-upstream"
    assert [t.name for t in response.tools] == ["lookup"]
    assert client.responses.retrieve(response.id).created_at == response.created_at


def test_a_cancelled_background_response_conforms_and_stays_cancelled(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    client = world.client(secret)
    body = post(world, secret, "responses", {"model": "held", "input": "hi", "background": True}).json()

    cancelled = client.responses.cancel(body["id"])
    world.upstream.release.set()

    assert (cancelled.status, cancelled.created_at) == ("cancelled", body["created_at"])
    assert client.responses.retrieve(body["id"]).status == "cancelled"


def test_a_failed_response_carries_a_code_from_openais_closed_list(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    client = world.client(secret)
    body = post(world, secret, "responses", {"model": "fail-500", "input": "hi", "background": True}).json()

    failed = wait_for(lambda: (r := client.responses.retrieve(body["id"])).status == "failed" and r)

    assert failed.error.code == "server_error" and failed.error.message == "upstream says 500"


def test_a_flex_chat_completion_says_it_was_served_flex(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    with WorkerThread():
        completion = client.chat.completions.create(model="gpt-test", messages=HELLO, service_tier="flex")
        chunks = raw(
            world,
            client.api_key,
            "POST",
            "chat/completions",
            json={"model": "gpt-test", "messages": HELLO, "service_tier": "flex", "stream": True},
        )

    assert completion.service_tier == "flex"
    events = assert_stream_conforms(chunks.content, "CreateChatCompletionStreamResponse")
    assert all(event["choices"] for event in events)  # no usage chunk: the client did not ask


# --- background streams and streamed retrieval ---------------------------------------------------


def test_a_background_stream_sends_every_event_then_bills_once(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)

    reply = raw(
        world,
        secret,
        "POST",
        "responses",
        json={"model": "gpt-test", "input": "hi", "background": True, "stream": True},
    )

    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = assert_stream_conforms(reply.content, "ResponseStreamEvent")
    assert [e["type"] for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "stream" not in world.upstream.requests[-1]["body"]  # the upstream call is a plain one
    job = InferenceRequest.objects.get()
    assert job.response_body["output"][0]["content"][0]["text"] == "Hello from upstream"
    wait_for(lambda: flex_charges(job.id))
    assert [row.amount for row in flex_charges(job.id)] == [REALTIME_COST]


def test_a_queued_background_stream_follows_the_job_to_its_end(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    body = {"model": "gpt-test", "input": "hi", "background": True, "stream": True, "service_tier": "flex"}
    with WorkerThread():
        reply = raw(world, secret, "POST", "responses", json=body)

    events = assert_stream_conforms(reply.content, "ResponseStreamEvent")
    assert [e["type"] for e in events][:2] == ["response.created", "response.queued"]
    assert events[-1]["type"] == "response.completed"
    job = InferenceRequest.objects.get()
    wait_for(lambda: flex_charges(job.id))
    assert [row.amount for row in flex_charges(job.id)] == [FLEX_COST]


def test_a_response_can_be_retrieved_as_a_stream_and_resumed(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    client = world.client(secret)
    response = client.responses.create(model="gpt-test", input="hi")

    whole = list(client.responses.retrieve(response.id, stream=True))
    resumed = raw(world, secret, "GET", f"responses/{response.id}", params={"stream": "true", "starting_after": "2"})

    assert whole[-1].type == "response.completed" and whole[-1].response.output_text == "Hello from upstream"
    events = assert_stream_conforms(resumed.content, "ResponseStreamEvent")
    assert [e["sequence_number"] for e in events] == [e.sequence_number for e in whole][3:]


# --- endpoints the spec has ----------------------------------------------------------------------


def test_a_get_on_a_model_call_is_405(world, user_with_credits, make_key):
    reply = raw(world, make_key(user_with_credits), "GET", "chat/completions")

    assert reply.status_code == 405 and "GET" in reply.json()["error"]["message"]


def test_a_model_can_be_read_by_its_alias_when_the_key_reaches_it(world, user_with_credits, outsider, make_key):
    client = world.client(make_key(user_with_credits))

    assert client.models.retrieve("gpt-test").id == "gpt-test"
    with pytest.raises(openai.NotFoundError):
        world.client(make_key(outsider)).models.retrieve("gpt-test")  # a group model it cannot reach
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_input_items_list_what_the_response_was_given(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    given = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And 3 + 3?"}]},
    ]
    response = client.responses.create(model="gpt-test", input=given)

    items = client.responses.input_items.list(response.id, order="asc")
    first_page = client.responses.input_items.list(response.id, order="asc", limit=2)
    rest = client.responses.input_items.list(response.id, order="asc", after=first_page.data[-1].id)

    assert [item.role for item in items.data] == ["user", "assistant", "user"]
    assert items.data[0].content[0].text == "What is 2 + 2?"
    assert first_page.has_more and [i.id for i in first_page.data + rest.data] == [i.id for i in items.data]
    assert [i.id for i in client.responses.input_items.list(response.id).data] == [i.id for i in items.data][::-1]


def test_a_deleted_response_is_gone(world, user_with_credits, user_without_credits, make_key):
    client = world.client(make_key(user_with_credits))
    response = client.responses.create(model="gpt-test", input="hi")
    with pytest.raises(openai.NotFoundError):
        world.client(make_key(user_without_credits)).responses.delete(response.id)  # not theirs

    client.responses.delete(response.id)

    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_a_deleted_queued_response_never_runs(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    body = post(
        world, secret, "responses", {"model": "gpt-test", "input": "hi", "service_tier": "flex", "background": True}
    )

    assert raw(world, secret, "DELETE", f"responses/{body.json()['id']}").json()["deleted"] is True
    with WorkerThread():
        pass
    assert upstream_calls(world, "gpt-upstream") == 0 and not InferenceRequest.objects.exists()


def test_a_response_created_with_store_false_cannot_be_read_back(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    response = client.responses.create(model="gpt-test", input="hi", store=False)

    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError, match="store"):
        client.responses.create(model="gpt-test", input="hi", store=False, background=True)


# --- x-request-id ------------------------------------------------------------------------------


def test_every_answer_carries_an_x_request_id_refusals_included(world, user_with_credits, make_key, settings):
    secret = make_key(user_with_credits)
    settings.GATEWAY_MAX_BODY_BYTES = 1000
    answers = [
        raw(world, "sk-unknown", "POST", "chat/completions", json={"model": "gpt-test", "messages": HELLO}),  # 401
        raw(world, secret, "POST", "chat/completions", content=b"{not json"),  # 400
        raw(world, secret, "POST", "chat/completions", json={"model": "nope", "messages": HELLO}),  # 404
        raw(world, secret, "GET", "no/such/path"),  # 404
        raw(
            world, secret, "POST", "chat/completions", json={"model": "gpt-test", "messages": HELLO, "pad": "x" * 2000}
        ),
        raw(world, secret, "POST", "chat/completions", json={"model": "gpt-test", "messages": HELLO}),  # 200
    ]

    assert [answer.status_code for answer in answers] == [401, 400, 404, 404, 413, 200]
    ids = [answer.headers.get("x-request-id") for answer in answers]
    assert all(id_ and id_.startswith("req_") for id_ in ids) and len(set(ids)) == len(ids)


# --- previous_response_id ------------------------------------------------------------------------


def test_a_follow_up_is_sent_upstream_with_the_conversation_it_continues(
    world, user_with_credits, user_without_credits, make_key
):
    client = world.client(make_key(user_with_credits))
    first = client.responses.create(model="gpt-test", input="What is 2 + 2?", instructions="Be brief.")

    follow_up = client.responses.create(model="gpt-test", input="And 3 + 3?", previous_response_id=first.id)

    sent = world.upstream.requests[-1]["body"]
    assert "previous_response_id" not in sent and "instructions" not in sent  # instructions do not carry over
    assert [item.get("role") for item in sent["input"]] == ["user", "assistant", "user"]
    assert sent["input"][1]["content"][0]["text"] == "Hello from upstream"
    assert follow_up.previous_response_id == first.id
    with pytest.raises(openai.NotFoundError) as refused:
        world.client(make_key(user_without_credits)).responses.create(
            model="free-model", input="hi", previous_response_id=first.id
        )
    assert refused.value.code == "previous_response_not_found"  # someone else's response


def test_the_x_request_id_is_the_id_on_the_calls_record_with_the_clients_own_id(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    reply = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO, extra_headers={"X-Client-Request-Id": "my-trace-7"}
    )

    log = wait_for(lambda: RequestLog.objects.filter(request_id=reply.headers["x-request-id"]).first())
    assert log.client_request_id == "my-trace-7"
