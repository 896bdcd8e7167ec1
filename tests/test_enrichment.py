"""ErrorEnrichmentMiddleware renders denials, and leaves everything else exactly as it was."""

from __future__ import annotations

import asyncio

import orjson
from django.http import HttpResponse
from django.test import RequestFactory

from gateway.errors import BALANCE_TOO_LOW, BLOCKED_BY_RULE, NO_ACCESS, denied
from gateway.middleware import ErrorEnrichmentMiddleware


def run(path: str, response: HttpResponse) -> HttpResponse:
    async def get_response(request):  # type: ignore[no-untyped-def]
        return response

    middleware = ErrorEnrichmentMiddleware(get_response)
    return asyncio.run(middleware(RequestFactory().post(path)))


def error(response: HttpResponse) -> dict:
    return orjson.loads(response.content)["error"]


def test_no_access_denial_becomes_the_access_message():
    response = run("/ai/v1/chat/completions", denied(NO_ACCESS, "test-model"))
    assert response.status_code == 403
    assert error(response)["message"] == (
        "You do not have access to 'test-model'. Please contact your administrator to request access."
    )


def test_rule_denial_names_the_modality():
    response = run("/ai/v1/chat/completions", denied(BLOCKED_BY_RULE, "test-model", "batch"))
    assert response.status_code == 403
    assert error(response)["message"].startswith("Batch access to 'test-model' is blocked by a routing rule.")


def test_balance_denial_becomes_402():
    response = run("/ai/v1/responses", denied(BALANCE_TOO_LOW, "test-model"))
    assert response.status_code == 402
    assert error(response) == {
        "message": "Account balance too low. Please add credits to continue.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_credits",
    }


def test_a_403_without_a_denial_passes_through():
    response = run("/ai/v1/chat/completions", HttpResponse(b"Rate limit exceeded", status=403))
    assert response.content == b"Rate limit exceeded"


def test_non_ai_paths_are_never_touched():
    response = run("/admin/", denied(NO_ACCESS, "test-model"))
    assert response.content == b"Forbidden"


def test_other_statuses_are_never_touched():
    response = run("/ai/v1/chat/completions", HttpResponse(b"Not Found", status=404))
    assert (response.status_code, response.content) == (404, b"Not Found")
