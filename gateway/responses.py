"""OpenAI-shaped bodies the gateway answers itself: JSON, and the response object of a recorded job."""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpResponse

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
