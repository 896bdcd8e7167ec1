"""Every OpenAI body the gateway writes itself: a recorded job's response object, a finished job's reply, replays."""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpResponse

from gateway.errors import DEADLINE_MESSAGE, openai_error
from gateway.jobs import as_items
from gateway.models import Batch, InferenceRequest, JobState, StoredFile


def json_response(payload: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(payload), status=status, content_type="application/json")


def file_object(stored: StoredFile) -> dict[str, Any]:
    """An OpenAI File object. `status` is always "processed": a file is validated before it is stored.
    `expires_at` only when set (OpenAI's description types it as an integer, never null)."""
    body: dict[str, Any] = {
        "id": stored.public_id,
        "object": "file",
        "bytes": stored.bytes,
        "created_at": int(stored.created_at.timestamp()),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
    }
    if stored.expires_at is not None:
        body["expires_at"] = int(stored.expires_at.timestamp())
    return body


BATCH_TIMES = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def batch_object(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    """An OpenAI Batch object. Times and file ids only once set (the description types them as
    integers and strings, never null)."""
    body: dict[str, Any] = {
        "id": batch.public_id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_public_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "created_at": int(batch.created_at.timestamp()),
        "request_counts": counts,
        "metadata": batch.metadata,
    }
    for name in BATCH_TIMES:
        when = getattr(batch, name)
        if when is not None:
            body[name] = int(when.timestamp())
    if batch.output_file_id is not None:
        body["output_file_id"] = f"file-{batch.output_file_id.hex}"
    if batch.error_file_id is not None:
        body["error_file_id"] = f"file-{batch.error_file_id.hex}"
    return body


# OpenAI's ResponseErrorCode is a closed list: an upstream's own code passes only if it is on it.
RESPONSE_ERROR_CODES = frozenset(
    {
        "server_error", "rate_limit_exceeded", "invalid_prompt", "data_residency_mismatch", "bio_policy",
        "vector_store_timeout", "invalid_image", "invalid_image_format", "invalid_base64_image",
        "invalid_image_url", "image_too_large", "image_too_small", "image_parse_error",
        "image_content_policy_violation", "invalid_image_mode", "image_file_too_large",
        "unsupported_image_media_type", "empty_image_file", "failed_to_download_image", "image_file_not_found",
    }
)  # fmt: skip
# What a Response says about its request when the request did not say (OpenAI's defaults).
REQUEST_DEFAULTS: dict[str, Any] = {
    "instructions": None,
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "temperature": None,
    "top_p": None,
    "metadata": {},
    "previous_response_id": None,
}


def response_error(job: InferenceRequest) -> dict[str, str]:
    """A failed job's error as a Response carries it: a ResponseErrorCode and a message."""
    body = job.response_body if isinstance(job.response_body, dict) else {}
    upstream: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    code = upstream.get("code")
    if code not in RESPONSE_ERROR_CODES:
        code = {429: "rate_limit_exceeded", 400: "invalid_prompt"}.get(job.response_status or 500, "server_error")
    return {"code": code, "message": job.error or upstream.get("message") or "The request failed."}


def response_usage(usage: Any) -> dict[str, Any] | None:
    """An upstream's Responses usage with the breakdowns OpenAI always sends (zero when not reported)."""
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int):
        return None
    input_tokens, output_tokens = usage["input_tokens"], usage.get("output_tokens") or 0
    cached = {"cached_tokens": 0, "cache_write_tokens": 0}
    return {
        **usage,
        "input_tokens_details": {**cached, **(usage.get("input_tokens_details") or {})},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0, **(usage.get("output_tokens_details") or {})},
        "total_tokens": usage.get("total_tokens", input_tokens + output_tokens),
    }


def response_object(job: InferenceRequest) -> dict[str, Any]:
    """The OpenAI Response object for a recorded call or job, in whatever state it is.

    The one builder of every Response the gateway writes: its id, creation time and model (the alias
    the client asked for) never change between states, and it says what the request asked.
    """
    request = job.request_body if isinstance(job.request_body, dict) else {}
    completed = job.state == JobState.COMPLETED and isinstance(job.response_body, dict)
    upstream: dict[str, Any] = dict(job.response_body) if completed else {}  # type: ignore[arg-type]
    usage = response_usage(upstream.pop("usage", None))
    status = upstream.get("status") if upstream.get("status") == "incomplete" else job.openai_status
    payload = {
        **upstream,
        "id": job.public_id,
        "object": "response",
        "created_at": int(job.created_at.timestamp()),
        "status": status,
        "completed_at": int(job.completed_at.timestamp()) if completed and job.completed_at else None,
        "model": request.get("model") or job.model_alias,
        "output": upstream.get("output") or [],
        "error": response_error(job) if job.state == JobState.FAILED else None,
        "incomplete_details": upstream.get("incomplete_details"),
        "background": job.background,
        "service_tier": "flex" if job.service_tier == "flex" else "default",
    }
    for name, default in REQUEST_DEFAULTS.items():
        payload[name] = request.get(name, upstream.get(name, default))
    # A function tool as OpenAI describes it back: `strict` and `parameters` always there (null when not sent).
    payload["tools"] = [
        {"parameters": None, "strict": None, **tool}
        if isinstance(tool, dict) and tool.get("type") == "function"
        else tool
        for tool in payload["tools"] or []
    ]
    if usage is not None:
        payload["usage"] = usage
    return payload


ITEM_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def input_items(job: InferenceRequest) -> list[dict[str, Any]]:
    """A response's input as the items OpenAI lists for it, first to last, each with a stable id."""
    items = []
    for index, item in enumerate(as_items(job.request_body.get("input"))):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        listed = {**item, "type": kind, "status": item.get("status", "completed")}
        listed.setdefault("id", f"{ITEM_PREFIXES.get(kind, 'item')}_{job.id.hex}{index:04d}")
        if kind == "message":
            listed["content"] = message_parts(item.get("role"), item.get("content"))
        items.append(listed)
    return items


def message_parts(role: Any, content: Any) -> Any:
    """A message's content as typed parts: input_text for what was said to the model, output_text for what it said."""
    if not isinstance(content, str):
        return content
    if role == "assistant":
        return [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}]
    return [{"type": "input_text", "text": content}]


def job_reply(job: InferenceRequest, *, stream: bool) -> HttpResponse:
    """Answer a held client with its finished job, as the upstream would have answered the call."""
    if job.state == JobState.COMPLETED and isinstance(job.response_body, dict):
        status = job.response_status or 200
        if job.path == "responses":
            payload = response_object(job)
            return replay_response(payload, status) if stream else json_response(payload, status)
        completion = {**job.response_body, "service_tier": "flex" if job.service_tier == "flex" else "default"}
        if not stream:
            return json_response(completion, status)
        return replay_chat(completion, status, include_usage=include_usage(job.request_body))
    if job.state == JobState.CANCELED:
        return openai_error(409, "The request was cancelled before it finished.", code="cancelled")
    if job.state in (JobState.PENDING, JobState.CLAIMED, JobState.PROCESSING):
        # Only when expiring lost a race with a worker that is storing the result right now.
        return openai_error(504, DEADLINE_MESSAGE, code="deadline_exceeded")
    status = job.response_status or 500
    if isinstance(job.response_body, dict) and "error" in job.response_body:
        return json_response(job.response_body, status)
    return openai_error(status, job.error or "The request failed.", code="upstream_error")


# --- replaying a finished result as a stream -----------------------------------------------------


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def event_stream(body: bytes, status: int) -> HttpResponse:
    response = HttpResponse(body, status=status, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response


def include_usage(body: Any) -> bool:
    """Whether a streamed chat call asked for the usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options") if isinstance(body, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


def replay_chat(completion: dict[str, Any], status: int, *, include_usage: bool) -> HttpResponse:
    """A finished chat.completion as the chunks a streamed call would have sent, and the usage
    chunk last when the client asked for it."""
    base = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    for name in ("service_tier", "system_fingerprint"):
        if completion.get(name) is not None:
            base[name] = completion[name]
    chunks = []
    for choice in completion.get("choices") or []:
        message = dict(choice.get("message") or {})
        delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **tool} for i, tool in enumerate(message["tool_calls"])]
        if message.get("refusal") is not None:
            delta["refusal"] = message["refusal"]
        index = choice.get("index", 0)
        chunks.append(sse({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}))
        done = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        chunks.append(sse({**base, "choices": [done]}))
    if include_usage and completion.get("usage") is not None:
        chunks.append(sse({**base, "choices": [], "usage": completion["usage"]}))
    chunks.append(b"data: [DONE]\n\n")
    return event_stream(b"".join(chunks), status)


def replay_response(response: dict[str, Any], status: int) -> HttpResponse:
    """A finished response object as the Responses API's events, from response.created to response.completed."""
    return event_stream(b"".join(sse(event, event["type"]) for event in response_events(response)), status)


def response_events(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The Responses API's events of a response, numbered from 0: response.created and
    response.in_progress first, then its output item by item, and its end event last."""
    events: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append({"type": kind, "sequence_number": len(events), **fields})

    started = {key: value for key, value in response.items() if key != "usage"}
    started.update(status="in_progress", output=[], error=None, incomplete_details=None, completed_at=None)
    emit("response.created", response=started)
    emit("response.in_progress", response=started)
    for output_index, item in enumerate(response.get("output") or []):
        for kind, fields in item_events(item, output_index):
            emit(kind, **fields)
    ending = {"completed": "completed", "incomplete": "incomplete"}.get(response.get("status", ""), "failed")
    emit(f"response.{ending}", response=response)
    return events


def item_events(item: Any, output_index: int) -> list[tuple[str, dict[str, Any]]]:
    """The events (type, fields; not yet numbered) that stream one output item of a response."""
    if not isinstance(item, dict):
        return []
    events: list[tuple[str, dict[str, Any]]] = []
    item_id = item.get("id", "")
    parts = item.get("content") if item.get("type") == "message" else None
    added = {**item, "status": "in_progress", **({"content": []} if parts is not None else {})}
    events.append(("response.output_item.added", {"output_index": output_index, "item": added}))
    for content_index, part in enumerate(parts or []):
        place = {"item_id": item_id, "output_index": output_index, "content_index": content_index}
        if part.get("type") == "output_text":
            events.append(("response.content_part.added", {**place, "part": {**part, "text": ""}}))
            text = part.get("text", "")
            events.append(("response.output_text.delta", {**place, "delta": text, "logprobs": []}))
            events.append(("response.output_text.done", {**place, "text": text, "logprobs": []}))
        else:
            events.append(("response.content_part.added", {**place, "part": part}))
        events.append(("response.content_part.done", {**place, "part": part}))
    events.append(("response.output_item.done", {"output_index": output_index, "item": item}))
    return events
