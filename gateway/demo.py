"""The demo upstream the gateway serves itself (`manage.py demo`): an echo model under /demo/v1/.

It answers chat completions and responses, JSON or streamed, with what the caller said, and
reports usage as every upstream does — a token per word — so a call through /ai/ is priced,
charged and logged like any other. It is an upstream, not the API: it answers only the gateway,
which presents the credential `demo_credential()` derives from the secret key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST


def demo_credential() -> str:
    """The key the gateway sends the demo upstream: the same in every process sharing the secret key."""
    return hmac.new(settings.SECRET_KEY.encode(), b"dwctl demo upstream", hashlib.sha256).hexdigest()


def tokens_of(text: str) -> int:
    return max(len(text.split()), 1)


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def said(items: Any) -> tuple[str, int]:
    """What the caller said last, and the input tokens of everything it sent."""
    if isinstance(items, str):
        return items, tokens_of(items)
    messages = [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []
    texts = [text_of(message.get("content")) for message in messages]
    last = next((text_of(m.get("content")) for m in reversed(messages) if m.get("role", "user") == "user"), "")
    return last, sum(tokens_of(text) for text in texts) or 1


def refused(request: HttpRequest, body: Any) -> HttpResponse | None:
    presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(presented.encode(), demo_credential().encode()):
        return JsonResponse({"error": {"message": "Not the gateway's demo credential.", "type": "auth"}}, status=401)
    if not isinstance(body, dict):
        return JsonResponse({"error": {"message": "A JSON object is required.", "type": "invalid"}}, status=400)
    return None


def parsed(request: HttpRequest) -> Any:
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError:
        return None


def events(pieces: list[dict[str, Any]], *, named: bool) -> StreamingHttpResponse:
    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            name = f"event: {piece['type']}\n".encode() if named else b""
            yield name + b"data: " + orjson.dumps(piece) + b"\n\n"
        if not named:
            yield b"data: [DONE]\n\n"

    return StreamingHttpResponse(stream(), content_type="text/event-stream")


@csrf_exempt
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    body = parsed(request)
    if (refusal := refused(request, body)) is not None:
        return refusal
    last, input_tokens = said(body.get("messages"))
    reply = f"You said: {last}"
    usage = {"prompt_tokens": input_tokens, "completion_tokens": tokens_of(reply)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    base = {"id": f"chatcmpl-demo{time.time_ns()}", "created": int(time.time()), "model": body.get("model", "echo")}
    if body.get("stream") is not True:
        message = {"role": "assistant", "content": reply, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return JsonResponse({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
    chunk = {**base, "object": "chat.completion.chunk"}
    words = reply.split(" ")
    pieces = [
        {
            **chunk,
            "choices": [{"index": 0, "delta": {"content": word if i == 0 else f" {word}"}, "finish_reason": None}],
        }
        for i, word in enumerate(words)
    ]
    pieces.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        pieces.append({**chunk, "choices": [], "usage": usage})
    return events(pieces, named=False)


@csrf_exempt
@require_POST
async def responses(request: HttpRequest) -> HttpResponseBase:
    body = parsed(request)
    if (refusal := refused(request, body)) is not None:
        return refusal
    last, input_tokens = said(body.get("input"))
    reply = f"You said: {last}"
    output_tokens = tokens_of(reply)
    content = {"type": "output_text", "text": reply, "annotations": [], "logprobs": []}
    message = {"type": "message", "id": "msg_demo", "status": "completed", "role": "assistant", "content": [content]}
    completed = {
        "id": f"resp_demo{time.time_ns()}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": body.get("model", "echo"),
        "output": [message],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    }
    if body.get("stream") is not True:
        return JsonResponse(completed)
    created = {**completed, "status": "in_progress", "output": [], "usage": None}
    at = {"item_id": "msg_demo", "output_index": 0, "content_index": 0}
    pieces: list[dict[str, Any]] = [
        {"type": "response.created", "response": created},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **at, "part": {**content, "text": ""}},
    ]
    for i, word in enumerate(reply.split(" ")):
        pieces.append(
            {"type": "response.output_text.delta", **at, "delta": word if i == 0 else f" {word}", "logprobs": []}
        )
    pieces += [
        {"type": "response.output_text.done", **at, "text": reply, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": content},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": completed},
    ]
    for number, piece in enumerate(pieces):
        piece["sequence_number"] = number
    return events(pieces, named=True)
