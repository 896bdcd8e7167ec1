"""Every /ai/ answer on record: a call that no upstream call recorded — a refusal (bad key, bad
body, unknown model, no access, no credits, a limit), a read of a stored response or of the models
— gets its request-log row here, with its error code, in the same journal and batches as the rest.

A call that reached a model is recorded where it ends (gateway.views.record_call, a flex
worker), and says so on the call (`GatewayCall.recorded`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from accounts.services import DISPLAY_PREFIX_LENGTH
from gateway import metrics
from gateway.accounting import accountant, journal_line
from gateway.call import GatewayCall


def error_code(response: HttpResponseBase) -> str:
    """The `error.code` of an OpenAI error body; "" for anything else."""
    if response.status_code < 400 or response.streaming or "json" not in response.get("Content-Type", ""):
        return ""
    try:
        error = orjson.loads(response.content).get("error")  # type: ignore[attr-defined]
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    code = error.get("code") if isinstance(error, dict) else None
    return str(code or error.get("type") or "")[:64] if isinstance(error, dict) else ""


def presented_prefix(request: HttpRequest) -> str:
    """The first characters of the key a request presented, as the admin shows a key's prefix."""
    _, _, secret = request.headers.get("Authorization", "").partition(" ")
    return secret.strip()[:DISPLAY_PREFIX_LENGTH]


def record_answer(request: HttpRequest, response: HttpResponseBase, request_id: str, started_at: float) -> None:
    """Put an answer on record unless the call that produced it records itself."""
    call: GatewayCall | None = getattr(request, "gateway", None)
    if call is not None and call.recorded:
        return
    body: dict[str, Any] = call.body if call is not None else {}
    model = call.model if call is not None else None
    alias = body.get("model")
    # The alias a client sent may be anything: a metric's label only names a model the snapshot knows.
    metrics.observe_call(
        model.alias if model is not None else "",
        call.tier if call is not None else "realtime",
        response.status_code,
        time.time() - started_at,
    )
    accountant.add(
        journal_line(
            request_id=request_id,
            user_id=call.key.user_id if call is not None else None,
            api_key_id=call.key.id if call is not None else None,
            model_id=None,  # nothing to price: no model answered
            model_alias=model.alias if model is not None else alias if isinstance(alias, str) else "",
            path=request.path.removeprefix("/ai/v1/")[:100],
            tier=call.tier if call is not None else "realtime",
            status_code=response.status_code,
            started_at=started_at,
            latency_ms=(time.time() - started_at) * 1000,
            ttfb_ms=None,
            input_tokens=None,
            output_tokens=None,
            job_id=None,
            usage_estimated=False,
            committed=0,
            job=None,
            client_request_id=call.client_request_id if call is not None else "",
            error_code=error_code(response),
            key_prefix=presented_prefix(request),
            client_ip=request.META.get("REMOTE_ADDR") or None,
        )
    )
