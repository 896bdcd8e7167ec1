"""Every OpenAI body the gateway writes itself: a recorded job's response object, a finished job's reply, replays."""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpResponse

from gateway.errors import DEADLINE_MESSAGE, openai_error
from gateway.models import InferenceRequest, JobState


def json_response(payload: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(payload), status=status, content_type="application/json")


def response_object(job: InferenceRequest) -> dict[str, Any]:
    """The OpenAI response object for a recorded call or job, in whatever state it is."""
    body = job.response_body
    if job.state == JobState.COMPLETED and isinstance(body, dict):
        payload = dict(body)
    else:
        payload = {
            "object": "response",
            "created_at": int(job.created_at.timestamp()),
            "model": job.model_alias,
            "output": [],
            "usage": None,
            "error": None,
        }
        if job.state == JobState.FAILED:
            upstream_error = body.get("error") if isinstance(body, dict) else None
            message = job.error or (upstream_error or {}).get("message") or "The request failed."
            payload["error"] = {"code": str((upstream_error or {}).get("code") or "server_error"), "message": message}
    payload.update(
        id=job.public_id,
        status=job.openai_status,
        background=job.background,
        service_tier="flex" if job.service_tier == "flex" else "default",
    )
    return payload


def job_reply(job: InferenceRequest, *, stream: bool) -> HttpResponse:
    """Answer a held client with its finished job, as the upstream would have answered the call."""
    if job.state == JobState.COMPLETED and isinstance(job.response_body, dict):
        status = job.response_status or 200
        if job.path == "responses":
            payload = response_object(job)
            return replay_response(payload, status) if stream else json_response(payload, status)
        return replay_chat(job.response_body, status) if stream else json_response(job.response_body, status)
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


def replay_chat(completion: dict[str, Any], status: int) -> HttpResponse:
    """A finished chat.completion as the chunks a streamed call would have sent, usage last."""
    base = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    if completion.get("system_fingerprint") is not None:
        base["system_fingerprint"] = completion["system_fingerprint"]
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
    if completion.get("usage") is not None:
        chunks.append(sse({**base, "choices": [], "usage": completion["usage"]}))
    chunks.append(b"data: [DONE]\n\n")
    return event_stream(b"".join(chunks), status)


def replay_response(response: dict[str, Any], status: int) -> HttpResponse:
    """A finished response object as the Responses API's events, from response.created to response.completed."""
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append(sse({"type": kind, "sequence_number": len(events), **fields}, kind))

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    emit("response.created", response=started)
    emit("response.in_progress", response=started)
    for output_index, item in enumerate(response.get("output") or []):
        if not isinstance(item, dict):
            continue
        item_id = item.get("id", "")
        parts = item.get("content") if item.get("type") == "message" else None
        emit(
            "response.output_item.added",
            output_index=output_index,
            item={**item, "status": "in_progress", **({"content": []} if parts is not None else {})},
        )
        for content_index, part in enumerate(parts or []):
            place = {"item_id": item_id, "output_index": output_index, "content_index": content_index}
            if part.get("type") == "output_text":
                emit("response.content_part.added", **place, part={**part, "text": ""})
                emit("response.output_text.delta", **place, delta=part.get("text", ""), logprobs=[])
                emit("response.output_text.done", **place, text=part.get("text", ""), logprobs=[])
            else:
                emit("response.content_part.added", **place, part=part)
            emit("response.content_part.done", **place, part=part)
        emit("response.output_item.done", output_index=output_index, item=item)
    emit("response.completed", response=response)
    return event_stream(b"".join(events), status)
