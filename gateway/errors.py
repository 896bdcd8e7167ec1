"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, so SDKs raise typed exceptions.

Every message a client or an operator reads about a refused or failed call is written here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from django.http import HttpResponse

from accounts.models import Purpose

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_denied",
    404: "not_found_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "server_error",
    504: "timeout",
}


BALANCE_TOO_LOW_MESSAGE = "Account balance too low. Please add credits to continue."
UPSTREAM_TIMEOUT_MESSAGE = "The upstream model server did not answer in time."
UPSTREAM_UNREACHABLE_MESSAGE = "The upstream model server could not be reached."
STREAM_CUT_MESSAGE = "The stream ended before the response completed."
DEADLINE_MESSAGE = "The flex request did not finish before its deadline."
MODEL_RETIRED_MESSAGE = "The model of this request is no longer available."
GATEWAY_STOPPED_MESSAGE = "The gateway process serving this request stopped before it finished. Please retry."
CLIENT_GONE_MESSAGE = "The client disconnected."
# A batch line that never ran, as its error-file line says (OpenAI's codes and messages).
BATCH_EXPIRED = "batch_expired"
BATCH_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
BATCH_CANCELLED = "batch_cancelled"
BATCH_CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
FILE_TOO_LARGE_MESSAGE = "The file is larger than the limit of {limit} bytes."
# Answers of the server itself (dwctl_site/server.py), to a client cut off before its request is read.
HEADERS_TOO_LARGE_MESSAGE = "The request headers are larger than the limit of {limit} bytes."
HEADERS_TIMEOUT_MESSAGE = "The request headers did not arrive within {seconds} seconds."
BODY_TIMEOUT_MESSAGE = "The request body stopped arriving for {seconds} seconds."
SERVER_BUSY_MESSAGE = "This gateway process is serving as many connections as it may. Please retry."


def error_envelope(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps(error_envelope(status, message, param=param, code=code))


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    response = HttpResponse(
        error_body(status, message, param=param, code=code), status=status, content_type="application/json"
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def internal_error() -> HttpResponse:
    return openai_error(500, "The gateway failed to handle this request.", code="internal_error")


def missing_api_key() -> HttpResponse:
    return openai_error(
        401, "You didn't provide an API key. Send it as 'Authorization: Bearer sk-…'.", code="missing_api_key"
    )


def invalid_api_key() -> HttpResponse:
    return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")


def platform_key_refused() -> HttpResponse:
    return openai_error(403, "Platform keys are for management only and cannot call the API.", code="wrong_key_purpose")


def invalid_json() -> HttpResponse:
    return openai_error(400, "The request body is not valid JSON.", code="invalid_json")


def invalid_request(message: str, param: str | None) -> HttpResponse:
    return openai_error(400, message, param=param, code="invalid_request")


def model_not_found(alias: str) -> HttpResponse:
    return openai_error(
        404, f"The model '{alias}' does not exist or you do not have access to it.", code="model_not_found"
    )


def rate_limited(message: str, wait: float, code: str = "rate_limit_exceeded") -> HttpResponse:
    return openai_error(429, message, code=code, headers={"Retry-After": str(max(1, math.ceil(wait)))})


def key_rate_limited(wait: float) -> HttpResponse:
    return rate_limited("Rate limit reached for this API key. Please slow down.", wait)


def model_rate_limited(alias: str, wait: float) -> HttpResponse:
    return rate_limited(f"Rate limit reached for '{alias}'. Please slow down.", wait)


def key_tokens_limited(wait: float) -> HttpResponse:
    return rate_limited("Tokens per minute limit reached for this API key. Please slow down.", wait)


def model_tokens_limited(alias: str, wait: float) -> HttpResponse:
    return rate_limited(f"Tokens per minute limit reached for '{alias}'. Please slow down.", wait)


def model_at_capacity(alias: str) -> HttpResponse:
    return rate_limited(f"'{alias}' is at capacity. Please retry shortly.", 1.0, "model_at_capacity")


def spend_limit_reached(limit: str, window: str, resets_at: datetime) -> HttpResponse:
    return openai_error(
        402,
        f"This API key has reached its spend limit of {limit} credits per {window}. "
        f"It resets at {resets_at.isoformat().replace('+00:00', 'Z')}.",
        code="spend_limit_exceeded",
    )


def database_unavailable() -> HttpResponse:
    return openai_error(
        503,
        "The gateway cannot reach its database right now. Please retry shortly.",
        code="database_unavailable",
        headers={"Retry-After": "2"},
    )


def response_not_found(response_id: str) -> HttpResponse:
    return openai_error(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")


def file_not_found(file_id: str) -> HttpResponse:
    return openai_error(404, f"No such File object: {file_id}", param="file_id", code="not_found")


def file_too_large(limit: int) -> HttpResponse:
    return openai_error(413, FILE_TOO_LARGE_MESSAGE.format(limit=limit), code="file_too_large")


def invalid_file(message: str, param: str) -> HttpResponse:
    return openai_error(400, message, param=param, code="invalid_file")


def batch_not_found(batch_id: str) -> HttpResponse:
    return openai_error(404, f"No batch found with id '{batch_id}'.", param="batch_id", code="not_found")


def previous_response_not_found(response_id: str) -> HttpResponse:
    message = f"Previous response with id '{response_id}' not found."
    return openai_error(404, message, param="previous_response_id", code="previous_response_not_found")


def method_not_allowed(method: str) -> HttpResponse:
    return openai_error(405, f"Method {method} is not allowed here.")


# --- denials: a bare 403 from routing that carries its reason, rendered by enrichment ---------

NO_ACCESS = "no_access"
BLOCKED_BY_RULE = "blocked_by_rule"
BALANCE_TOO_LOW = "balance_too_low"

MODALITY_LABELS: dict[str, str] = {
    Purpose.BATCH: "Batch",
    Purpose.REALTIME: "Real-time",
    Purpose.PLAYGROUND: "Playground",
    Purpose.PLATFORM: "Platform",
}


def modality_label(purpose: str) -> str:
    if not purpose:
        return "This"
    return MODALITY_LABELS.get(purpose, purpose[:1].upper() + purpose[1:])


@dataclass(frozen=True, slots=True)
class Denial:
    reason: str
    model: str
    purpose: str = ""


def denied(reason: str, model: str, purpose: str = "") -> HttpResponse:
    """A plain 403 that remembers why; ErrorEnrichmentMiddleware turns it into the specific error."""
    response = HttpResponse(b"Forbidden", status=403, content_type="text/plain")
    response.denial = Denial(reason, model, purpose)  # type: ignore[attr-defined]
    return response


def render_denial(denial: Denial) -> HttpResponse:
    if denial.reason == NO_ACCESS:
        return openai_error(
            403,
            f"You do not have access to '{denial.model}'. Please contact your administrator to request access.",
            code="model_access_denied",
        )
    if denial.reason == BLOCKED_BY_RULE:
        return openai_error(
            403,
            f"{modality_label(denial.purpose)} access to '{denial.model}' is blocked by a routing rule. "
            "Please contact your administrator to request access.",
            code="blocked_by_routing_rule",
        )
    return openai_error(402, BALANCE_TOO_LOW_MESSAGE, code="insufficient_credits")
