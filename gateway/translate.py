"""The Responses API on a chat-completions upstream: a request, an answer and a stream, converted.

An endpoint set to translate (``Endpoint.responses_api``) serves ``/v1/responses`` by calling its
``/chat/completions``. Three conversions, all pure, so whatever makes model calls (one, or a loop of
them) can use them per call:

- :func:`chat_request`: a Responses request body → a chat completions request body;
- :func:`responses_body`: a chat completion → the Responses-shaped upstream body the gateway stores
  (output, usage, status) and ``gateway.render.response_object`` renders;
- :class:`ResponsesStream`: chat chunks → the Responses API's events, as :func:`translated_stream`
  runs it over the upstream's SSE bytes.

Fields the gateway answers itself (metadata, store, previous_response_id, background, service_tier)
are never sent: only what a chat completions server knows goes upstream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import orjson

# Responses request fields sent to a chat upstream as they are.
SAME_FIELDS = ("temperature", "top_p", "user", "seed", "top_logprobs", "stream")
# Chat's finish reasons that leave a response incomplete, and the reason it then gives.
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


# --- the request ---------------------------------------------------------------------------------


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the chat completions request that asks the same of the model."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    given = body.get("input")
    for item in [{"role": "user", "content": given}] if isinstance(given, str) else given or []:
        add_item(messages, item)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    chat.update({name: body[name] for name in SAME_FIELDS if body.get(name) is not None})
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_tokens"] = body["max_output_tokens"]  # what every chat server knows
    tools = [chat_tool(tool) for tool in body.get("tools") or [] if tool.get("type") == "function"]
    if tools:
        chat["tools"] = tools
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = chat_tool_choice(body["tool_choice"])
    response_format = chat_response_format((body.get("text") or {}).get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:
        chat["reasoning_effort"] = effort
    return chat


def add_item(messages: list[dict[str, Any]], item: Any) -> None:
    """Append one input item to the chat messages: a message, a tool call, or a tool's result."""
    if not isinstance(item, dict):
        return
    kind = item.get("type", "message")
    if kind == "message":
        role = "system" if item.get("role") == "developer" else item.get("role", "user")
        content = item.get("content")
        if role == "assistant":
            messages.append({"role": "assistant", "content": text_of(content)})
        else:
            messages.append({"role": role, "content": chat_content(content)})
    elif kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
        }
        last = messages[-1] if messages else None
        # Calls made in one turn (and the text before them) are one assistant message in chat.
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        content = output if isinstance(output, str) else text_of(output)
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
    # Anything else (reasoning, references to stored items) has no chat equivalent: left out.


def text_of(content: Any) -> str:
    """A message's text, whether a string or typed parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return "".join(part.get("text") or part.get("refusal") or "" for part in parts if isinstance(part, dict))


def chat_content(content: Any) -> Any:
    """A user or system message's content: its text, or chat's parts when it holds images."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content if isinstance(content, list) else []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image" and part.get("image_url"):
            image = {"url": part["image_url"], **({"detail": part["detail"]} if part.get("detail") else {})}
            parts.append({"type": "image_url", "image_url": image})
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses function tool (name, parameters… at the top) as chat nests it."""
    function = {name: tool[name] for name in ("name", "description", "parameters", "strict") if name in tool}
    return {"type": "function", "function": function}


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice  # "auto", "none", "required"


def chat_response_format(given: Any) -> dict[str, Any] | None:
    if not isinstance(given, dict):
        return None
    if given.get("type") == "json_schema":
        schema = {name: given[name] for name in ("name", "description", "schema", "strict") if name in given}
        return {"type": "json_schema", "json_schema": schema}
    if given.get("type") == "json_object":
        return {"type": "json_object"}
    return None  # plain text: chat's default


# --- the answer ----------------------------------------------------------------------------------


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def responses_usage(usage: Any) -> dict[str, Any] | None:
    """Chat's usage as the Responses API counts it."""
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return None
    input_tokens, output_tokens = usage["prompt_tokens"], usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.get("total_tokens", input_tokens + output_tokens),
    }


def ending(output: list[dict[str, Any]], usage: Any, finish_reason: Any) -> dict[str, Any]:
    """The Responses-shaped body of a finished model call: its output, usage and status."""
    reason = INCOMPLETE_REASONS.get(finish_reason) if isinstance(finish_reason, str) else None
    body: dict[str, Any] = {
        "status": "incomplete" if reason else "completed",
        "incomplete_details": {"reason": reason} if reason else None,
        "output": output,
    }
    converted = responses_usage(usage)
    if converted is not None:
        body["usage"] = converted
    return body


def responses_body(completion: dict[str, Any], item_prefix: str) -> dict[str, Any]:
    """A chat completion as the Responses-shaped body of the same answer; its items' ids start
    with `item_prefix` (unique per response)."""
    choices = completion.get("choices") or [{}]
    message = choices[0].get("message") or {}
    output = []
    text = message.get("content")
    if isinstance(text, str) and text:
        output.append(message_item(f"msg_{item_prefix}", text))
    elif message.get("refusal"):
        item = message_item(f"msg_{item_prefix}", "")
        item["content"] = [{"type": "refusal", "refusal": message["refusal"]}]
        output.append(item)
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        output.append(
            call_item(
                f"fc_{item_prefix}_{index}", call.get("id") or f"call_{item_prefix}_{index}",
                function.get("name", ""), function.get("arguments") or "",
            )
        )  # fmt: skip
    return ending(output, completion.get("usage"), choices[0].get("finish_reason"))


# --- the stream ----------------------------------------------------------------------------------


class ResponsesStream:
    """Chat completion chunks in, the Responses API's events out (numbered from 0).

    `started` is the response as it is while in progress (every lifecycle event carries it);
    `complete` renders the finished response from the Responses-shaped body (:func:`ending`), for
    the last event. An item is closed when the next one starts, as OpenAI streams them; a chunk for a
    tool call already closed (chat servers send calls one after another) still counts in the body.
    """

    def __init__(
        self, started: dict[str, Any], item_prefix: str, complete: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        self.started = started
        self.item_prefix = item_prefix
        self.complete = complete
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # tool call index → its item
        self.usage: Any = None
        self.finish_reason: Any = None
        self.body: dict[str, Any] | None = None  # once ended

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [
            self.event("response.created", response=self.started),
            self.event("response.in_progress", response=self.started),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of one chat chunk."""
        events: list[dict[str, Any]] = []
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in (chunk.get("choices") or [])[:1]:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                events += self.text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self.tool_call(call)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        return events

    def text(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self.close()
            item = message_item(f"msg_{self.item_prefix}_{len(self.output)}", "", status="in_progress")
            events += self.add(item)
            part = dict(item["content"][0])  # a copy: the item's own part grows with every delta
            events.append(self.event("response.content_part.added", **self.place(item), content_index=0, part=part))
        open_item = self.open
        assert open_item is not None
        open_item["content"][0]["text"] += delta
        place = self.place(open_item)
        events.append(self.event("response.output_text.delta", **place, content_index=0, delta=delta, logprobs=[]))
        return events

    def tool_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            events += self.close()
            item_id = f"fc_{self.item_prefix}_{len(self.output)}"
            call_id = call.get("id") or f"call_{self.item_prefix}_{index}"
            item = self.calls[index] = call_item(item_id, call_id, function.get("name") or "", "", "in_progress")
            events += self.add(item)
        arguments = function.get("arguments") or ""
        if arguments:
            item["arguments"] += arguments
            if item is self.open:
                events.append(self.event("response.function_call_arguments.delta", **self.place(item), delta=arguments))
        return events

    def place(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.output.append(item)
        self.open = item
        added = {**item, "content": []} if item["type"] == "message" else dict(item)
        return [self.event("response.output_item.added", output_index=len(self.output) - 1, item=added)]

    def close(self) -> list[dict[str, Any]]:
        """The events that end the item being streamed, if any."""
        item, self.open = self.open, None
        if item is None:
            return []
        place = self.place(item)
        events = []
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            events.append(
                self.event("response.output_text.done", **place, content_index=0, text=part["text"], logprobs=[])
            )
            events.append(self.event("response.content_part.done", **place, content_index=0, part=part))
        else:
            events.append(
                self.event(
                    "response.function_call_arguments.done", **place, name=item["name"], arguments=item["arguments"]
                )
            )
        events.append(self.event("response.output_item.done", output_index=place["output_index"], item=dict(item)))
        return events

    def end(self) -> list[dict[str, Any]]:
        """The closing events, the last one carrying the finished response."""
        events = self.close()
        for item in self.output:
            item["status"] = "completed"
        self.body = ending(self.output, self.usage, self.finish_reason)
        response = self.complete(self.body)
        kind = "response.incomplete" if response.get("status") == "incomplete" else "response.completed"
        events.append(self.event(kind, response=response))
        return events


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


async def translated_stream(chunks: AsyncIterator[bytes], translator: ResponsesStream) -> AsyncGenerator[bytes]:
    """A chat upstream's SSE bytes as the Responses API's events, one chunk out per chunk in.

    The stream ends with the finished response once the upstream says `[DONE]`, or ends its stream
    after saying why it stopped; a stream cut before that ends without it (its relay records the cut).
    """
    buffer = b""
    ended = False
    out = b"".join(sse(event) for event in translator.start())
    try:
        async for chunk in chunks:
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                data = line.strip()
                if not data.startswith(b"data:") or ended:
                    continue
                data = data[5:].strip()
                if data == b"[DONE]":
                    ended = True
                    out += b"".join(sse(event) for event in translator.end())
                    continue
                try:
                    parsed = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(parsed, dict):
                    out += b"".join(sse(event) for event in translator.feed(parsed))
            if out:
                yield out
                out = b""
        if not ended and translator.finish_reason is not None:
            yield b"".join(sse(event) for event in translator.end())
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
