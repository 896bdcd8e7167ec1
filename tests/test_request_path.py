"""One owner per concern on the request path: capacity held for a call's whole life, one price for
every tier, and a streamed /responses record that tells the truth whatever the upstream did."""

from __future__ import annotations

import httpx
import openai
import pytest

from billing.models import CreditTransaction
from gateway.models import DeployedModel, InferenceRequest, RequestLog
from gateway.services import add_endpoint, add_model
from tests.conftest import FLEX_COST, HELLO, REALTIME_COST, WorkerThread, post, wait_for
from tests.upstream import PROMPT_TOKENS, free_port

pytestmark = pytest.mark.django_db(transaction=True)


def response_id(reply: httpx.Response) -> str:
    """The id of the /responses record of a call, from the x-request-id every admitted call carries."""
    request_id = reply.headers["x-request-id"]
    assert request_id.startswith("req_")
    return "resp_" + request_id.removeprefix("req_")


# --- capacity --------------------------------------------------------------------------------------


def test_background_calls_hold_the_models_capacity_until_their_upstream_call_ends(world, user_with_credits, make_key):
    DeployedModel.objects.filter(alias="held").update(capacity=1)
    DeployedModel.objects.get(alias="held").save()  # a save, so the snapshot sees the capacity
    secret = make_key(user_with_credits)
    body = {"model": "held", "input": "hi", "background": True}

    statuses = [post(world, secret, "responses", body).status_code for _ in range(5)]

    # The first call holds the only slot until the upstream answers, which it does when released.
    assert statuses == [202, 429, 429, 429, 429]
    accepted = InferenceRequest.objects.filter(background=True)
    assert accepted.count() == 1  # a refused call leaves no record
    world.upstream.release.set()
    wait_for(lambda: accepted.get().state == "completed")
    assert world.upstream.peak_in_flight == 1
    # The slot came back when the call ended.
    wait_for(lambda: post(world, secret, "responses", body).status_code == 202)


def test_a_streamed_call_holds_its_slot_until_the_stream_ends(world, user_with_credits, make_key):
    DeployedModel.objects.filter(alias="long-stream").update(capacity=1)
    DeployedModel.objects.get(alias="long-stream").save()
    secret = make_key(user_with_credits)
    client = world.client(secret)
    request = {"model": "long-stream", "messages": HELLO}

    stream = client.chat.completions.create(**request, stream=True)
    next(iter(stream))  # the stream has started, and is not over
    during = post(world, secret, "chat/completions", request)
    list(stream)

    assert during.status_code == 429
    assert during.json()["error"]["code"] == "model_at_capacity"
    wait_for(lambda: post(world, secret, "chat/completions", request).status_code == 200)


# --- one price for every tier ----------------------------------------------------------------------


def test_flex_realtime_and_background_calls_of_the_same_usage_cost_what_the_tariff_says(
    world, user_with_credits, make_key
):
    secret = make_key(user_with_credits)
    client = world.client(secret)

    chat = post(world, secret, "chat/completions", {"model": "gpt-test", "messages": HELLO})
    realtime = client.responses.create(model="gpt-test", input="hi")
    background = post(world, secret, "responses", {"model": "gpt-test", "input": "hi", "background": True}).json()
    with WorkerThread():
        client.chat.completions.create(model="gpt-test", messages=HELLO, service_tier="flex")

    flex_job = InferenceRequest.objects.get(service_tier="flex")
    records = {  # by the x-request-id each client saw, as their records hold it
        "chat": chat.headers["x-request-id"],
        "realtime": realtime.id.replace("resp_", "req_"),
        "background": background["id"].replace("resp_", "req_"),
        "flex": f"req_{flex_job.id.hex}",
    }
    wait_for(lambda: RequestLog.objects.filter(request_id__in=records.values(), cost__isnull=False).count() == 4)
    costs = dict(RequestLog.objects.filter(request_id__in=records.values()).values_list("request_id", "cost"))
    expected = {"chat": REALTIME_COST, "realtime": REALTIME_COST, "background": REALTIME_COST, "flex": FLEX_COST}
    assert {name: costs[request_id] for name, request_id in records.items()} == expected
    # Each recorded call carries its cost too, and the ledger charged each exactly that, once.
    jobs = {f"req_{job.id.hex}": job.cost for job in InferenceRequest.objects.all()}
    assert [jobs[records[name]] for name in ("realtime", "background", "flex")] == [
        REALTIME_COST,
        REALTIME_COST,
        FLEX_COST,
    ]
    charged = sorted(CreditTransaction.objects.filter(kind="usage").values_list("amount", flat=True))
    assert charged == sorted(expected.values())


# --- streamed /responses whose upstream did not stream ---------------------------------------------


def stream_request(world, secret: str, model: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    return post(world, secret, "responses", {"model": model, "input": "hi", "stream": True})


@pytest.mark.parametrize(
    ("model", "status", "reason"),
    [
        ("fail-400", 400, "upstream says 400"),
        ("fail-500", 500, "upstream says 500"),
        ("slow", 504, "did not answer in time"),
        ("unreachable", 502, "could not be reached"),
    ],
)
def test_a_streamed_response_whose_upstream_fails_first_is_failed_at_once(
    world, user_with_credits, make_key, model, status, reason
):
    if model == "unreachable":
        closed, _ = add_endpoint("closed", f"http://127.0.0.1:{free_port()}/v1", timeout_seconds=3)
        add_model("unreachable", endpoint=closed, groups=["research"])
    secret = make_key(user_with_credits)

    reply = stream_request(world, secret, model)

    assert reply.status_code == status
    fetched = world.client(secret).responses.retrieve(response_id(reply))  # right after: no waiting
    assert fetched.status == "failed"
    assert fetched.error is not None and reason in fetched.error.message


def test_a_streamed_response_answered_with_json_is_completed_with_that_body(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)

    reply = stream_request(world, secret, "json-only")

    assert reply.status_code == 200
    ours = response_id(reply)
    assert reply.json()["id"] == ours  # our id, not the upstream's
    fetched = world.client(secret).responses.retrieve(ours)
    assert (fetched.id, fetched.status, fetched.output_text) == (ours, "completed", "Hello from upstream")
    assert InferenceRequest.objects.get().input_tokens == PROMPT_TOKENS


def test_the_client_of_a_streamed_response_learns_its_id_from_the_first_event(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))

    with client.responses.with_streaming_response.create(model="gpt-test", input="hi", stream=True) as reply:
        header_id = "resp_" + reply.headers["x-request-id"].removeprefix("req_")
        events = list(reply.parse())

    assert events[0].type == "response.created"
    assert events[0].response.id == header_id
    wait_for(lambda: client.responses.retrieve(header_id).status == "completed")


def test_every_admitted_call_carries_its_request_id_even_when_refused(world, user_without_credits, make_key):
    reply = post(world, make_key(user_without_credits), "chat/completions", {"model": "gpt-test", "messages": HELLO})

    assert reply.status_code == 402
    assert reply.headers["x-request-id"].startswith("req_")
    with pytest.raises(openai.APIStatusError) as excinfo:
        world.client(make_key(user_without_credits)).chat.completions.create(model="gpt-test", messages=HELLO)
    assert excinfo.value.request_id is not None and excinfo.value.request_id.startswith("req_")
