"""Server-side tools and the multi-step loop of /v1/responses: a live gateway, a fake upstream whose
`agent` model follows a plan of tool calls (chat and Responses shapes), and a live tool server.
The same loop runs blocking, streamed, in the background and in the flex worker, on native and
translated endpoints, and every model call is billed on its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from billing.models import CreditTransaction
from gateway.models import DeployedModel, InferenceRequest
from gateway.services import add_endpoint, add_model, add_tool
from gateway.snapshot import ToolEntry
from gateway.tools import Branch, merged_tools, warm_path_branch
from tests.conformance import assert_stream_conforms, conforming_client
from tests.conftest import (
    FLEX_COST,
    FLEX_IN,
    FLEX_OUT,
    PRICE_IN,
    PRICE_OUT,
    REALTIME_COST,
    WorkerThread,
    balance_of,
    wait_for,
)
from tests.upstream import AGENT_DONE, COMPLETION_TOKENS, PROMPT_TOKENS, ToolServer

pytestmark = pytest.mark.django_db(transaction=True)

LOOKUP_PARAMETERS = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ENDPOINTS = ("native", "translated")
LOOKED_UP = '{"looked_up": {"query": "hello"}}'  # the lookup tool's answer, as it sent it


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ToolServer]:
    server = ToolServer().start()
    yield server
    server.stop()


@pytest.fixture
def agents(world, tool_server):  # type: ignore[no-untyped-def]
    """`agent-native` on an endpoint with its own Responses API and `agent-translated` on one that
    speaks chat completions only; tools `lookup`, `plain`, `broken`, `late` on both, for research."""
    prices = {
        "input_price": PRICE_IN,
        "output_price": PRICE_OUT,
        "flex_input_price": FLEX_IN,
        "flex_output_price": FLEX_OUT,
    }
    for name, api in (("native", "native"), ("translated", "translate")):
        endpoint, _ = add_endpoint(f"agents-{name}", world.upstream.base_url, timeout_seconds=30, responses_api=api)
        add_model(f"agent-{name}", endpoint=endpoint, upstream_model="agent", groups=["research"], **prices)
    models = [f"agent-{name}" for name in ENDPOINTS]
    for name, path in (("lookup", "lookup"), ("plain", "text"), ("broken", "fail"), ("late", "slow")):
        add_tool(
            name, tool_server.url(path), description=f"The {name} tool.", parameters=LOOKUP_PARAMETERS,
            api_key="tool-secret", timeout_seconds=1 if name == "late" else 10, models=models, groups=["research"],
        )  # fmt: skip
    tool_server.calls.clear()
    tool_server.hold_seconds = 0.0
    return world


def agent_calls(world) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return [seen for seen in world.upstream.requests if seen["body"].get("model") == "agent"]


def kinds(output: list[Any]) -> list[str]:
    return [item.type if hasattr(item, "type") else item["type"] for item in output]


def charges_of(response_id: str) -> list[CreditTransaction]:
    job_id = str(uuid.UUID(response_id.removeprefix("resp_")))
    return list(CreditTransaction.objects.filter(kind="usage", source_id__startswith=job_id).order_by("source_id"))


def billed(response_id: str, calls: int) -> list[CreditTransaction]:
    """The ledger rows of a response, once all `calls` of its model calls are written."""
    wait_for(lambda: len(charges_of(response_id)) == calls, timeout=15)
    return charges_of(response_id)


# --- pure decisions ------------------------------------------------------------------------------

TOOL = ToolEntry("lookup", "", LOOKUP_PARAMETERS, "http://tools/lookup", {}, 1.0, frozenset(), True)


def test_the_loop_runs_only_when_a_server_tool_is_offered():
    assert warm_path_branch(tools=(), stream=True, background=True) == Branch.PASS_THROUGH
    assert warm_path_branch(tools=(TOOL,), stream=False, background=False) == Branch.LOOP
    assert warm_path_branch(tools=(TOOL,), stream=True, background=False) == Branch.LOOP_STREAM
    assert warm_path_branch(tools=(TOOL,), stream=True, background=True) == Branch.LOOP_BACKGROUND


def test_server_tools_join_the_clients_and_a_client_tool_wins_a_name_clash():
    clients_lookup = {"type": "function", "name": "lookup", "parameters": {}}
    other = ToolEntry("other", "d", LOOKUP_PARAMETERS, "http://tools/other", {}, 1.0, frozenset(), True)
    merged = merged_tools({"tools": [WEATHER, clients_lookup]}, (TOOL, other))
    assert [tool["name"] for tool in merged["tools"]] == ["get_weather", "lookup", "other"]
    assert merged["tools"][1] is clients_lookup


# --- the loop, blocking --------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_one_server_tool_step_runs_in_the_gateway_and_the_model_reads_its_output(
    agents, tool_server, user_with_credits, make_key, endpoint
):
    client = agents.client(make_key(user_with_credits))

    response = client.responses.create(model=f"agent-{endpoint}", input="plan: lookup")

    assert response.status == "completed"
    assert kinds(response.output) == ["function_call", "function_call_output", "message"]
    call, output, _ = response.output
    assert output.call_id == call.call_id  # type: ignore[union-attr]
    assert orjson.loads(output.output) == {"looked_up": {"query": "hello"}}  # type: ignore[union-attr]
    assert response.output_text == f"{AGENT_DONE} {LOOKED_UP}"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (2 * PROMPT_TOKENS, 2 * COMPLETION_TOKENS)
    assert len(agent_calls(agents)) == 2
    (ran,) = tool_server.calls
    assert ran["arguments"] == {"query": "hello"}
    assert ran["headers"]["Authorization"] == "Bearer tool-secret"  # the tool's credential, never the client's
    assert ran["headers"]["X-Request-ID"] == response.id.replace("resp_", "req_")
    # What the model was offered: the server's tools, on the first call and every later one.
    first = agent_calls(agents)[0]["body"]
    names = {tool.get("name") or tool["function"]["name"] for tool in first["tools"]}
    assert names == {"lookup", "plain", "broken", "late"}
    assert client.responses.retrieve(response.id).output_text == response.output_text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_two_server_tool_steps_are_billed_once_each_at_their_tariff(
    agents, tool_server, user_with_credits, make_key, endpoint
):
    client = agents.client(make_key(user_with_credits))
    before = balance_of(user_with_credits)

    response = client.responses.create(model=f"agent-{endpoint}", input="plan: lookup, plain")

    assert kinds(response.output) == [
        "function_call", "function_call_output", "function_call", "function_call_output", "message",
    ]  # fmt: skip
    assert len({item.id for item in response.output}) == 5  # unique, though the upstream repeats its ids
    assert response.output_text == f"{AGENT_DONE} plain words"
    assert [call["path"] for call in tool_server.calls] == ["lookup", "text"]
    charges = billed(response.id, 3)
    job_id = str(uuid.UUID(response.id.removeprefix("resp_")))
    assert [charge.source_id for charge in charges] == [job_id, f"{job_id}:2", f"{job_id}:3"]
    assert all(charge.amount == REALTIME_COST for charge in charges)
    wait_for(lambda: InferenceRequest.objects.get(pk=job_id).cost == 3 * REALTIME_COST)
    assert before - balance_of(user_with_credits) == 3 * REALTIME_COST
    steps = InferenceRequest.objects.get(pk=job_id).steps
    assert [(step["kind"], step["name"]) for step in steps] == [
        ("model", f"agent-{endpoint}"), ("tool", "lookup"), ("model", f"agent-{endpoint}"), ("tool", "plain"),
        ("model", f"agent-{endpoint}"),
    ]  # fmt: skip


def test_the_calls_of_one_step_run_at_once(agents, tool_server, user_with_credits, make_key):
    tool_server.hold_seconds = 0.5
    client = agents.client(make_key(user_with_credits))

    response = client.responses.create(model="agent-translated", input="plan: lookup+lookup")

    assert kinds(response.output) == [
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
        "message",
    ]
    assert tool_server.peak_in_flight == 2


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_client_tool_call_ends_the_loop_and_goes_back_to_the_client(
    agents, tool_server, user_with_credits, make_key, endpoint
):
    client = agents.client(make_key(user_with_credits))

    response = client.responses.create(
        model=f"agent-{endpoint}",
        input="plan: lookup, get_weather",
        tools=[WEATHER],  # type: ignore[list-item]
    )

    assert kinds(response.output) == ["function_call", "function_call_output", "function_call"]
    assert response.output[-1].name == "get_weather"  # type: ignore[union-attr]
    assert [call["path"] for call in tool_server.calls] == ["lookup"]
    assert len(agent_calls(agents)) == 2


def test_a_step_calling_a_client_and_a_server_tool_runs_the_servers_and_returns_the_clients(
    agents, tool_server, user_with_credits, make_key
):
    client = agents.client(make_key(user_with_credits))

    response = client.responses.create(
        model="agent-native",
        input="plan: lookup+get_weather",
        tools=[WEATHER],  # type: ignore[list-item]
    )

    assert kinds(response.output) == ["function_call", "function_call", "function_call_output"]
    assert [item.name for item in response.output[:2]] == ["lookup", "get_weather"]  # type: ignore[union-attr]
    assert response.output[2].call_id == response.output[0].call_id  # type: ignore[union-attr]
    assert [call["path"] for call in tool_server.calls] == ["lookup"]
    assert len(agent_calls(agents)) == 1


def test_a_client_tool_named_like_a_server_tool_is_the_clients(agents, tool_server, user_with_credits, make_key):
    client = agents.client(make_key(user_with_credits))
    own_lookup = {"type": "function", "name": "lookup", "parameters": LOOKUP_PARAMETERS}

    response = client.responses.create(model="agent-native", input="plan: lookup", tools=[own_lookup])  # type: ignore[list-item]

    assert kinds(response.output) == ["function_call"]
    assert tool_server.calls == []


@pytest.mark.parametrize(("plan", "error"), [("broken", "answered 500"), ("late", "did not answer within 1 seconds")])
def test_a_tool_that_fails_or_times_out_gives_the_model_an_error_output(
    agents, user_with_credits, make_key, plan, error
):
    client = agents.client(make_key(user_with_credits))

    response = client.responses.create(model="agent-translated", input=f"plan: {plan}")

    assert response.status == "completed"
    output = response.output[1]
    assert error in orjson.loads(output.output)["error"]  # type: ignore[union-attr]
    assert error in response.output_text


def test_the_loop_stops_incomplete_at_its_models_cap(agents, tool_server, user_with_credits, make_key):
    DeployedModel.objects.filter(alias="agent-native").update(max_model_calls=3)
    DeployedModel.objects.get(alias="agent-native").save()  # the snapshot sees the change
    client = agents.client(make_key(user_with_credits))
    wait_for(lambda: client.responses.create(model="agent-native", input="plan: lookup*").status == "incomplete")
    agents.upstream.requests.clear()
    tool_server.calls.clear()

    response = client.responses.create(model="agent-native", input="plan: lookup*")

    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert len(agent_calls(agents)) == 3
    assert len(tool_server.calls) == 3
    job = InferenceRequest.objects.get(pk=uuid.UUID(response.id.removeprefix("resp_")))
    assert job.error == "Stopped after 3 model calls, the model's cap."
    assert len(billed(response.id, 3)) == 3


def test_a_tool_is_offered_only_on_its_models_to_its_groups(agents, tool_server, user_with_credits, make_key):
    add_tool("staff_only", tool_server.url("lookup"), description="x", parameters=LOOKUP_PARAMETERS,
             models=["agent-native"], groups=["staff"])  # fmt: skip
    add_tool("elsewhere", tool_server.url("lookup"), description="x", parameters=LOOKUP_PARAMETERS,
             models=["gpt-test"], groups=["Everyone"])  # fmt: skip
    client = agents.client(make_key(user_with_credits))
    wait_for(lambda: "staff_only" in str(agents.upstream.requests) or sent_tools(client, agents))

    assert sent_tools(client, agents) == {"lookup", "plain", "broken", "late"}


def sent_tools(client: openai.OpenAI, world: Any) -> set[str]:
    world.upstream.requests.clear()
    client.responses.create(model="agent-native", input="plan: none_at_all")
    return {tool["name"] for tool in agent_calls(world)[0]["body"]["tools"]}


# --- streamed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_streamed_loop_is_one_stream_of_every_steps_items(agents, user_with_credits, make_key, endpoint):
    secret = make_key(user_with_credits)
    body = {"model": f"agent-{endpoint}", "input": "plan: lookup, plain", "stream": True}

    with conforming_client(timeout=30) as http:
        reply = http.post(f"{agents.url}/ai/v1/responses", json=body, headers={"Authorization": f"Bearer {secret}"})

    events = assert_stream_conforms(reply.content, "ResponseStreamEvent")
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    added = [event["item"]["type"] for event in events if event["type"] == "response.output_item.added"]
    assert added == ["function_call", "function_call_output", "function_call", "function_call_output", "message"]
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == added
    done = [event["item"] for event in events if event["type"] == "response.output_item.done"]
    assert done == final["output"]  # the ids streamed are the ids kept, though the upstream repeats its own
    deltas = [event["delta"] for event in events if event["type"] == "response.output_text.delta"]
    assert "".join(deltas) == final["output"][-1]["content"][0]["text"]
    if endpoint == "native":
        assert len(deltas) == 2  # the upstream's own deltas, relayed as they came
    assert final["usage"]["input_tokens"] == 3 * PROMPT_TOKENS
    assert len(billed(final["id"], 3)) == 3


def test_the_sdks_response_stream_yields_the_whole_loops_final_response(agents, user_with_credits, make_key):
    client = agents.client(make_key(user_with_credits))

    with client.responses.stream(model="agent-translated", input="plan: lookup") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()

    assert final.output_text == f"{AGENT_DONE} {LOOKED_UP}"
    assert "".join(deltas) == final.output_text
    assert kinds(final.output) == ["function_call", "function_call_output", "message"]


# --- background and flex -------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_background_loop_answers_202_and_is_polled_to_its_end(agents, user_with_credits, make_key, endpoint):
    client = agents.client(make_key(user_with_credits))

    started = client.responses.create(model=f"agent-{endpoint}", input="plan: lookup, plain", background=True)

    assert started.status in ("queued", "in_progress")
    done = wait_for(lambda: (r := client.responses.retrieve(started.id)).status == "completed" and r, timeout=20)
    assert kinds(done.output)[-1] == "message"  # type: ignore[attr-defined]
    assert done.output_text == f"{AGENT_DONE} plain words"  # type: ignore[attr-defined]
    assert len(billed(started.id, 3)) == 3


def test_a_background_streamed_loop_is_followed_to_its_end(agents, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    body = {"model": "agent-translated", "input": "plan: lookup", "stream": True, "background": True}

    with conforming_client(timeout=30) as http:
        reply = http.post(f"{agents.url}/ai/v1/responses", json=body, headers={"Authorization": f"Bearer {secret}"})

    events = assert_stream_conforms(reply.content, "ResponseStreamEvent")
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "response.completed"
    assert [item["type"] for item in final["response"]["output"]] == [
        "function_call",
        "function_call_output",
        "message",
    ]


def test_cancelling_a_background_loop_stops_it(agents, tool_server, user_with_credits, make_key):
    tool_server.hold_seconds = 2.0  # the first step's tool is still running when the cancel comes
    client = agents.client(make_key(user_with_credits))
    started = client.responses.create(model="agent-native", input="plan: lookup, lookup, lookup", background=True)
    wait_for(lambda: tool_server.calls)

    cancelled = client.responses.cancel(started.id)

    assert cancelled.status == "cancelled"
    wait_for(lambda: len(billed(started.id, 1)) == 1)
    assert len(agent_calls(agents)) == 1  # no model call after the cancel
    assert client.responses.retrieve(started.id).status == "cancelled"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_flex_worker_runs_the_same_loop_and_bills_each_call_at_the_flex_tariff(
    agents, flex_worker, user_with_credits, make_key, endpoint
):
    client = agents.client(make_key(user_with_credits))

    response = client.responses.create(model=f"agent-{endpoint}", input="plan: lookup, plain", service_tier="flex")

    assert response.output_text == f"{AGENT_DONE} plain words"
    assert kinds(response.output).count("function_call_output") == 2
    charges = billed(response.id, 3)
    assert all(charge.amount == FLEX_COST for charge in charges)
    job = InferenceRequest.objects.get(pk=uuid.UUID(response.id.removeprefix("resp_")))
    assert job.cost == 3 * FLEX_COST
    assert [step["kind"] for step in job.steps] == ["model", "tool", "model", "tool", "model"]


def test_a_flex_loop_run_again_goes_on_from_its_last_finished_step(agents, tool_server, user_with_credits, make_key):
    client = agents.client(make_key(user_with_credits))
    tool_server.hold_seconds = 30  # the second step's lookup is still running when its worker stops
    started = client.responses.create(
        model="agent-native", input="plan: plain, lookup", service_tier="flex", background=True
    )
    job_id = uuid.UUID(started.id.removeprefix("resp_"))
    with WorkerThread():
        wait_for(lambda: [call["path"] for call in tool_server.calls] == ["text", "lookup"], timeout=20)
    assert InferenceRequest.objects.get(pk=job_id).state == "pending"  # given back, its first step kept
    tool_server.hold_seconds = 0.0

    with WorkerThread():
        done = wait_for(lambda: (r := client.responses.retrieve(started.id)).status == "completed" and r, timeout=20)

    assert done.output_text == f"{AGENT_DONE} {LOOKED_UP}"  # type: ignore[attr-defined]
    assert [call["path"] for call in tool_server.calls] == ["text", "lookup", "lookup"]  # `plain` not run again
    # Model calls 1 and 2 by the first worker, 2 again and 3 by the second: the first is not repeated.
    assert len(agent_calls(agents)) == 4
    charges = billed(started.id, 3)  # calls 1, 2 again and 3: a step that never finished is not billed
    assert all(charge.amount == FLEX_COST for charge in charges)
    kinds_of_steps = [step["kind"] for step in InferenceRequest.objects.get(pk=job_id).steps]
    assert kinds_of_steps == ["model", "tool", "resumed", "model", "tool", "model"]


# --- an agent framework ------------------------------------------------------------------------


def test_an_agents_sdk_agent_with_a_client_tool_runs_to_completion_on_a_translated_endpoint(
    agents, user_with_credits, make_key
):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return "sunny"

    client = openai.AsyncOpenAI(base_url=f"{agents.url}/ai/v1", api_key=make_key(user_with_credits), max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer about the weather.",
        model=OpenAIResponsesModel(model="agent-translated", openai_client=client),
        model_settings=ModelSettings(store=True),
        tools=[get_weather],
    )

    # The model calls the client's tool; the server's are offered too but not called (a framework
    # runs every function_call it is given, so it cannot be shown the server's: see README).
    result = Runner.run_sync(agent, "plan: get_weather")

    assert seen == ["hello"]
    assert result.final_output == f"{AGENT_DONE} sunny"
