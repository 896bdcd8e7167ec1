"""A real local HTTP server standing in for an OpenAI-compatible upstream.

It behaves by the upstream model name it is asked for:
- anything else: a normal answer (usage: 12 prompt + 30 completion tokens; responses 12 in + 30 out)
- `fail-500` / `fail-400`: that status with an OpenAI error body
- `forbidden`: the upstream's own 403
- `slow`: waits `slow_seconds` before answering
- `held`: waits until the test sets `release` (at most 30 s), so a test controls when a call ends
- `flaky`: answers 503 to the first `flaky_failures` calls of each request, then normally
- `json-only`: answers /responses with a JSON body even when asked for a stream
- `length`: a chat answer cut at the token limit (`finish_reason: "length"`)
- `agent`: follows the plan its first user message states, `plan: a, b+c, d*`: one step per comma,
  calling the named tools (`+`: in parallel; `*`: at every step from there on), then answers
  `AGENT_DONE` and the last tool output it was given (see `agent_answer`)
It records every request it saw (path, headers, body) in `requests`, and the most calls it had in
flight at once in `peak_in_flight`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import orjson
from aiohttp import web

HELLO_TEXT = "Hello from upstream"
PROMPT_TOKENS = 12
OVERLOADED = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
COMPLETION_TOKENS = 30


def example_of(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """A value of a JSON schema (as clients send for tools and structured output): the model's answer."""
    root = root or schema
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return example_of(target, root)
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return example_of(next(s for s in schema["anyOf"] if s.get("type") != "null"), root)
    kind = schema.get("type", "object")
    if kind == "object":
        return {name: example_of(sub, root) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [example_of(schema.get("items") or {"type": "string"}, root)]
    return {"string": "hello", "integer": 1, "number": 1.5, "boolean": True}.get(kind)


def answer_of(body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """What the fake model answers: a text, or a call of the first tool it was given."""
    tools = [tool for tool in body.get("tools") or [] if tool.get("type") == "function"]
    if tools and body.get("tool_choice") != "none":
        function = tools[0].get("function", tools[0])  # chat nests it; the Responses API does not
        arguments = orjson.dumps(example_of(function.get("parameters") or {})).decode()
        return None, {"name": function["name"], "arguments": arguments}
    response_format = body.get("response_format") or (body.get("text") or {}).get("format") or {}
    if response_format.get("type") == "json_schema":
        schema = response_format.get("json_schema", response_format).get("schema") or {}
        return orjson.dumps(example_of(schema)).decode(), None
    return HELLO_TEXT, None


AGENT_DONE = "Done after tool results:"


def conversation_of(body: dict[str, Any]) -> tuple[str, list[str]]:
    """The first user text of a chat or Responses request, and the tool outputs it holds, in order."""
    first, outputs = "", []
    for entry in body.get("messages") or body.get("input") or []:
        if not isinstance(entry, dict):
            continue
        if entry.get("role") == "tool" or entry.get("type") == "function_call_output":
            outputs.append(str(entry.get("content", entry.get("output"))))
        elif entry.get("role") == "user" and not first:
            content = entry.get("content")
            first = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content or [])
    if isinstance(body.get("input"), str):
        first = body["input"]
    return first, outputs


def agent_answer(body: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """What the `agent` model answers: the calls of its plan's next step, or its final text."""
    first, outputs = conversation_of(body)
    plan = [step.strip() for step in first.partition("plan:")[2].split(",") if step.strip()]
    calls_so_far = sum(calls_in(entry) for entry in body.get("messages") or body.get("input") or [])
    steps_done, counted = 0, 0
    for step in plan:  # how many steps the calls made so far cover
        width = len(step.rstrip("*").split("+"))
        if counted + width > calls_so_far:
            break
        counted += width
        steps_done += 1
    forever = next((step for step in plan if step.endswith("*")), None)
    step = plan[steps_done] if steps_done < len(plan) else forever
    tools = {tool.get("name") or tool.get("function", {}).get("name"): tool for tool in body.get("tools") or []}
    if step is None:
        return f"{AGENT_DONE} {outputs[-1] if outputs else 'none'}", []
    calls = []
    for index, name in enumerate(step.rstrip("*").split("+")):
        tool = tools.get(name) or {}
        schema = tool.get("parameters") or tool.get("function", {}).get("parameters") or {}
        arguments = orjson.dumps(example_of(schema)).decode()
        calls.append({"call_id": f"call_{calls_so_far + index + 1}", "name": name, "arguments": arguments})
    return None, calls


def calls_in(entry: Any) -> int:
    """How many tool calls an input item (Responses) or a message (chat) holds."""
    if not isinstance(entry, dict):
        return 0
    if entry.get("type") == "function_call":
        return 1
    return len(entry.get("tool_calls") or [])


def item_events(outputs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The events that stream a Responses answer's items (arguments and text in two deltas each)."""
    events = []
    for index, item in enumerate(outputs):
        place = {"item_id": item["id"], "output_index": index}
        added = {**item, "status": "in_progress", **({"content": []} if item["type"] == "message" else {})}
        if item["type"] == "function_call":
            added["arguments"] = ""
        events.append(("response.output_item.added", {"output_index": index, "item": added}))
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(("response.content_part.added", {**place, "content_index": 0, "part": part}))
            for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
                events.append(
                    ("response.output_text.delta", {**place, "content_index": 0, "delta": piece, "logprobs": []})
                )
            events.append(("response.output_text.done", {**place, "content_index": 0, "text": text, "logprobs": []}))
            events.append(("response.content_part.done", {**place, "content_index": 0, "part": item["content"][0]}))
        else:
            arguments = item["arguments"]
            for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
                events.append(("response.function_call_arguments.delta", {**place, "delta": piece}))
            events.append(
                ("response.function_call_arguments.done", {**place, "name": item["name"], "arguments": arguments})
            )
        events.append(("response.output_item.done", {"output_index": index, "item": item}))
    return [(kind, {"type": kind, **fields}) for kind, fields in events]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self.slow_seconds = 5.0
        self.flaky_failures = 2
        self.calls_by_content: dict[str, int] = {}
        self.in_flight = 0
        self.peak_in_flight = 0
        self.stream_closed = threading.Event()
        self.release = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(middlewares=[self._count_in_flight])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()

    @web.middleware
    async def _count_in_flight(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def _common(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        body = await request.json()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        model = body.get("model", "")
        if model in {"fail-500", "fail-400"}:
            status = int(model[-3:])
            error = {"error": {"message": f"upstream says {status}", "type": "upstream", "param": None, "code": None}}
            return body, web.json_response(error, status=status)
        if model == "forbidden":
            return body, web.Response(text="Upstream Forbidden", status=403)
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        if model == "held":
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        if model == "flaky":
            content = orjson.dumps(body.get("messages") or body.get("input")).decode()
            seen = self.calls_by_content.get(content, 0)
            self.calls_by_content[content] = seen + 1
            if seen < self.flaky_failures:
                return body, web.json_response(OVERLOADED, status=503)
        return body, None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._common(request)
        if early is not None:
            return early
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        }
        base = {"id": "chatcmpl-upstream", "created": 1700000000, "model": body["model"]}
        text, tool_call = answer_of(body)
        tool_calls = [{"id": "call_1", "type": "function", "function": tool_call}] if tool_call else None
        if body["model"] == "agent":
            text, planned = agent_answer(body)
            tool_calls = [
                {
                    "id": call["call_id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for call in planned
            ] or None
        finish_reason = "tool_calls" if tool_call else "length" if body["model"] == "length" else "stop"
        if not body.get("stream"):
            message = {"role": "assistant", "content": text, "refusal": None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        if tool_calls:
            deltas = [{"role": "assistant", "tool_calls": [{"index": i, **call}]} for i, call in enumerate(tool_calls)]
        elif text == HELLO_TEXT:
            deltas = [{"content": word} for word in ["Hello", " from", " upstream"]]
            deltas *= 20 if body["model"] == "long-stream" else 1
        else:
            deltas = [{"content": text}]
        try:
            for delta in deltas:
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                await response.write(b"data: " + orjson.dumps({**chunk, "choices": [choice]}) + b"\n\n")
                if body["model"] == "long-stream":
                    await asyncio.sleep(0.1)
            final = {"index": 0, "delta": {}, "finish_reason": finish_reason}
            await response.write(b"data: " + orjson.dumps({**chunk, "choices": [final]}) + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_closed.set()
            raise
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body, early = await self._common(request)
        if early is not None:
            return early
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": body["model"],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS},
            }
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._common(request)
        if early is not None:
            return early
        text, tool_call = answer_of(body)
        output: dict[str, Any] = {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }
        if tool_call:
            output = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "status": "completed", **tool_call}
        outputs = [output]
        if body["model"] == "agent":
            text, planned = agent_answer(body)
            content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            output = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": content}
            # Every answer numbers its items from 1, as some servers do: ids repeat across calls.
            outputs = [
                {"type": "function_call", "id": f"fc_{index}", "status": "completed", **call}
                for index, call in enumerate(planned, start=1)
            ] or [output]
        completed = {
            "id": "resp_upstream123",
            "object": "response",
            "created_at": 1700000000,
            "status": "completed",
            "model": body["model"],
            "output": outputs,
            "usage": {
                "input_tokens": PROMPT_TOKENS,
                "output_tokens": COMPLETION_TOKENS,
                "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
            },
        }
        if not body.get("stream") or body["model"] == "json-only":
            return web.json_response(completed)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        created = {**completed, "status": "in_progress", "output": [], "usage": None}
        events = [("response.created", {"type": "response.created", "response": created})]
        if body["model"] == "agent":  # item by item, as OpenAI streams them
            events += item_events(outputs)
        events.append(("response.completed", {"type": "response.completed", "response": completed}))
        for number, (_, data) in enumerate(events):
            data["sequence_number"] = number
        for name, data in events:
            await response.write(f"event: {name}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n")
        return response


class ToolServer:
    """A real local HTTP server standing in for operators' tools, by path:
    - `/lookup`: answers JSON naming what it was sent (`{"looked_up": arguments}`)
    - `/text`: answers plain text
    - `/slow`: answers after `slow_seconds`
    - `/fail`: answers 500
    It records every call (path, headers, arguments) in `calls`, and the most it had at once in `peak_in_flight`.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.calls: list[dict[str, Any]] = []
        self.slow_seconds = 5.0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.hold_seconds = 0.0  # every /lookup waits this long first (to show calls run at once)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def start(self) -> ToolServer:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/{name}", self.call)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()

    async def call(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        arguments = await request.json()
        self.calls.append({"path": name, "headers": dict(request.headers), "arguments": arguments})
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if name == "lookup":
                await asyncio.sleep(self.hold_seconds)
                return web.json_response({"looked_up": arguments})
            if name == "text":
                return web.Response(text="plain words", content_type="text/plain")
            if name == "slow":
                await asyncio.sleep(self.slow_seconds)
                return web.json_response({"late": True})
            return web.json_response({"error": "tool broke"}, status=500)
        finally:
            self.in_flight -= 1
