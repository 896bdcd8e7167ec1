"""The pure conversions between the Responses API and chat completions (gateway.translate)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.render import response_usage
from gateway.translate import ResponsesStream, chat_request, responses_body, translated_stream
from tests.conformance import assert_conforms

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_a_string_input_with_instructions_is_a_system_and_a_user_message():
    assert chat_request({"model": "m", "input": "hi", "instructions": "Be brief."}) == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    }


def test_the_gateways_own_fields_never_go_upstream():
    body = {
        "model": "m",
        "input": "hi",
        "metadata": {"a": "b"},
        "store": False,
        "previous_response_id": "resp_1",
        "background": True,
        "service_tier": "flex",
        "truncation": "auto",
    }
    assert set(chat_request(body)) == {"model", "messages"}


def test_input_items_become_chat_messages_with_tool_calls_and_results():
    items = [
        {"type": "message", "role": "developer", "content": "Use tools."},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in "},
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"},
            ],
        },
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "c1", "name": "look", "arguments": '{"x":1}'},
        {"type": "function_call", "call_id": "c2", "name": "look", "arguments": '{"x":2}'},
        {"type": "function_call_output", "call_id": "c1", "output": "a cat"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "a dog"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "user", "content": [{"type": "input_text", "text": "So?"}]},
    ]

    messages = chat_request({"model": "m", "input": items})["messages"]

    def call(call_id: str, arguments: str) -> dict[str, Any]:
        return {"id": call_id, "type": "function", "function": {"name": "look", "arguments": arguments}}

    assert messages == [
        {"role": "system", "content": "Use tools."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in "},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
            ],
        },
        # The text and both calls of one turn are one assistant message.
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call("c1", '{"x":1}'), call("c2", '{"x":2}')]},
        {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
        {"role": "tool", "tool_call_id": "c2", "content": "a dog"},
        {"role": "user", "content": "So?"},
    ]


def test_function_tools_tool_choice_and_sampling_are_asked_in_chats_shape():
    tool = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}
    body = {
        "model": "m",
        "input": "hi",
        "tools": [tool, {"type": "web_search"}],
        "tool_choice": {"type": "function", "name": "f"},
        "parallel_tool_calls": False,
        "max_output_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.8,
        "text": {"format": {"type": "json_object"}},
        "reasoning": {"effort": "low"},
    }

    chat = chat_request(body)

    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True},
        }
    ]  # a tool chat cannot run is left out
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert (chat["parallel_tool_calls"], chat["max_tokens"], chat["temperature"], chat["top_p"]) == (
        False,
        64,
        0.5,
        0.8,
    )
    assert (chat["response_format"], chat["reasoning_effort"]) == ({"type": "json_object"}, "low")
    assert "parallel_tool_calls" not in chat_request({"model": "m", "input": "hi", "parallel_tool_calls": True})


def completion(message: dict[str, Any], finish_reason: str = "stop") -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}
    return {"id": "x", "object": "chat.completion", "choices": [choice], "usage": USAGE}


def as_response(body: dict[str, Any]) -> dict[str, Any]:
    """A body as the Response object the gateway renders from it (usage as gateway.render completes it)."""
    if "usage" in body:
        body = {**body, "usage": response_usage(body["usage"])}
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "m",
        "error": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": None,
        "top_p": None,
        "tool_choice": "auto",
        "tools": [],
        "incomplete_details": None,
        **body,
    }


def test_a_chat_completion_is_a_responses_body_with_message_and_function_call_items():
    call = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}

    body = responses_body(completion({"content": "Sure.", "tool_calls": [call]}, "tool_calls"), "abc")

    assert body == {
        "status": "completed",
        "incomplete_details": None,
        "output": [
            {
                "type": "message",
                "id": "msg_abc",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Sure.", "annotations": [], "logprobs": []}],
            },
            {
                "type": "function_call",
                "id": "fc_abc_0",
                "call_id": "call_9",
                "name": "f",
                "arguments": '{"a":1}',
                "status": "completed",
            },
        ],
        "usage": {
            "input_tokens": 7,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 3,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 10,
        },
    }
    assert_conforms(as_response(body), "Response")


def test_an_answer_stopped_on_length_is_incomplete_for_max_output_tokens_and_a_refusal_is_a_refusal_part():
    cut = responses_body(completion({"content": "Once upon"}, "length"), "a")
    refused = responses_body(completion({"content": None, "refusal": "I can't."}), "b")

    assert (cut["status"], cut["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert refused["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't."}]
    for body in (cut, refused):
        assert_conforms(as_response(body), "Response")


# --- the stream ----------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": choices, **extra}) + b"\n\n"


def run(chunks: list[bytes]) -> tuple[list[dict[str, Any]], ResponsesStream]:
    started = as_response({"status": "in_progress", "output": []})
    translator = ResponsesStream(started, "p", lambda body: as_response({**started, **body}))

    async def source() -> AsyncIterator[bytes]:
        for piece in chunks:
            yield piece

    async def collect() -> bytes:
        return b"".join([piece async for piece in translated_stream(source(), translator)])

    raw = asyncio.run(collect())
    events = [orjson.loads(line[5:]) for line in raw.split(b"\n") if line.startswith(b"data:")]
    for event in events:
        assert_conforms(event, "ResponseStreamEvent")
    return events, translator


def test_a_streamed_text_then_tool_call_closes_the_message_before_the_call_starts():
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}
    stream = b"".join(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hi"}),
            chunk({"tool_calls": [call]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
            chunk({}, "tool_calls"),
            chunk(usage=USAGE),
            b"data: [DONE]\n\n",
        ]
    )
    # Cut anywhere, even inside a line: the events are the same.
    events, translator = run([stream[:37], stream[37:200], stream[200:]])

    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert events[3]["part"]["text"] == ""  # as added, before any delta
    assert events[11]["arguments"] == '{"a":1}'
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["call_id"] == "call_1" and final["usage"]["input_tokens"] == 7
    assert translator.body is not None and translator.body["status"] == "completed"


def test_a_stream_cut_before_its_end_has_no_final_event_and_one_that_ends_without_done_still_completes():
    cut, cut_translator = run([chunk({"content": "Hi"})])
    ended, _ = run([chunk({"content": "Hi"}), chunk({}, "length")])

    assert cut[-1]["type"] == "response.output_text.delta" and cut_translator.body is None
    assert ended[-1]["type"] == "response.incomplete"
    assert ended[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
