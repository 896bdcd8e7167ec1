"""Client libraries as their users write them, against the live gateway and the fake upstream.

The official `openai` client (sync and async) through each endpoint a user reaches first, and
LangChain's `ChatOpenAI`. Their bodies are validated on the way in (tests/conformance.py).
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.conformance import conforming_async_client, conforming_client
from tests.conftest import HELLO, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class Weather(BaseModel):
    city: str
    degrees: int


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def client(world, user_with_credits, make_key) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return world.client(make_key(user_with_credits))


# --- openai, sync --------------------------------------------------------------------------------


def test_chat_json_and_the_docs_streaming_loop(client):
    assert client.chat.completions.create(model="gpt-test", messages=HELLO).choices[0].message.content

    text = ""
    for chunk in client.chat.completions.create(model="gpt-test", messages=HELLO, stream=True):
        text += chunk.choices[0].delta.content or ""  # as OpenAI's docs write it

    assert text == "Hello from upstream"


def test_chat_tool_call(client):
    message = client.chat.completions.create(model="gpt-test", messages=HELLO, tools=[WEATHER_TOOL]).choices[0].message

    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "hello"}


def test_chat_structured_output_parses(client):
    parsed = client.chat.completions.parse(model="gpt-test", messages=HELLO, response_format=Weather)

    assert parsed.choices[0].message.parsed == Weather(city="hello", degrees=1)


def test_embeddings(client):
    assert client.embeddings.create(model="embed-test", input="hi").data[0].embedding == [0.1, 0.2, 0.3]


def test_responses_json_stream_and_retrieve(client):
    response = client.responses.create(model="gpt-test", input="hi")
    events = list(client.responses.create(model="gpt-test", input="hi", stream=True))

    assert response.output_text == "Hello from upstream"
    assert client.responses.retrieve(response.id).output_text == "Hello from upstream"
    assert events[-1].type == "response.completed" and events[-1].response.id.startswith("resp_")
    assert {event.response.model for event in events} == {"gpt-test"}  # the alias, not "gpt-upstream"


def test_responses_background_then_retrieve_and_input_items(client):
    response = client.responses.create(model="gpt-test", input="hi", background=True)

    done = wait_for(lambda: (r := client.responses.retrieve(response.id)).status == "completed" and r)

    assert done.output_text == "Hello from upstream"
    assert [item.content[0].text for item in client.responses.input_items.list(response.id).data] == ["hi"]


def test_responses_background_stream(client):
    events = list(client.responses.create(model="gpt-test", input="hi", background=True, stream=True))

    assert [events[0].type, events[-1].type] == ["response.created", "response.completed"]
    assert events[-1].response.output_text == "Hello from upstream"


def test_responses_cancel(world, client):
    response = client.responses.create(model="held", input="hi", background=True)

    cancelled = client.responses.cancel(response.id)
    world.upstream.release.set()

    assert cancelled.status == "cancelled"


# --- openai, async -------------------------------------------------------------------------------


def test_the_async_client_through_chat_stream_and_responses(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)

    async def use() -> tuple[str, str, str]:
        client = openai.AsyncOpenAI(
            base_url=f"{world.url}/ai/v1",
            api_key=secret,
            max_retries=0,
            timeout=20,
            http_client=conforming_async_client(),
        )
        async with client:
            completion = await client.chat.completions.create(model="gpt-test", messages=HELLO)
            streamed = ""
            async for chunk in await client.chat.completions.create(model="gpt-test", messages=HELLO, stream=True):
                streamed += chunk.choices[0].delta.content or ""
            response = await client.responses.create(model="gpt-test", input="hi")
            return completion.choices[0].message.content or "", streamed, response.output_text

    assert asyncio.run(use()) == ("Hello from upstream",) * 3


# --- LangChain -----------------------------------------------------------------------------------


@pytest.fixture
def chat(world, user_with_credits, make_key) -> ChatOpenAI:  # type: ignore[no-untyped-def]
    return ChatOpenAI(
        model="gpt-test",
        base_url=f"{world.url}/ai/v1",
        api_key=make_key(user_with_credits),
        max_retries=0,
        timeout=20,
        http_client=conforming_client(),
    )


def test_langchain_invoke_and_stream(chat):
    assert chat.invoke("hi").content == "Hello from upstream"
    assert "".join(str(chunk.content) for chunk in chat.stream("hi")) == "Hello from upstream"


def test_langchain_tool_call(chat):
    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    message = chat.bind_tools([get_weather]).invoke("What is the weather in Paris?")

    assert message.tool_calls[0]["name"] == "get_weather" and message.tool_calls[0]["args"] == {"city": "hello"}


def test_langchain_structured_output(chat):
    assert chat.with_structured_output(Weather).invoke("Weather in Paris?") == Weather(city="hello", degrees=1)
