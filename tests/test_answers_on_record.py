"""Every /ai/ answer is on record, refusals included: with its status, error code and the id the client saw."""

from __future__ import annotations

import httpx
import pytest

from gateway.accounting import accountant
from gateway.models import RequestLog
from tests.conftest import HELLO, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def ask(world, secret: str | None, path: str = "chat/completions", **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    method = "GET" if "json" not in kwargs and "content" not in kwargs else "POST"
    return httpx.request(method, f"{world.url}/ai/v1/{path}", headers=headers, timeout=30, **kwargs)


def record_of(reply: httpx.Response) -> RequestLog:
    accountant.flush()
    return wait_for(lambda: RequestLog.objects.filter(request_id=reply.headers["x-request-id"]).first())


def test_each_kind_of_refusal_is_recorded_with_its_code(
    world, user_with_credits, user_without_credits, outsider, make_key, limits_clock
):
    alice = make_key(user_with_credits, requests_per_second=1, burst_size=1)
    refusals = {
        "invalid_api_key": ask(world, "sk-not-a-key-at-all", json={"model": "gpt-test", "messages": HELLO}),
        "missing_api_key": ask(world, None, json={"model": "gpt-test", "messages": HELLO}),
        "invalid_json": ask(world, alice, content=b"{nope"),
        "model_not_found": ask(world, alice, json={"model": "no-such-model", "messages": HELLO}),
        "model_access_denied": ask(world, make_key(outsider), json={"model": "gpt-test", "messages": HELLO}),
        "insufficient_credits": ask(
            world, make_key(user_without_credits), json={"model": "gpt-test", "messages": HELLO}
        ),
    }
    served = ask(world, alice, json={"model": "gpt-test", "messages": HELLO})
    refusals["rate_limit_exceeded"] = ask(world, alice, json={"model": "gpt-test", "messages": HELLO})

    assert served.status_code == 200
    for code, reply in refusals.items():
        log = record_of(reply)
        assert (log.status_code, log.error_code) == (reply.status_code, code), code
        assert log.cost is None and log.client_ip == "127.0.0.1"
    unknown = record_of(refusals["invalid_api_key"])
    assert (unknown.user_id, unknown.api_key_id, unknown.key_prefix) == (None, None, "sk-not-a-k")
    limited = record_of(refusals["rate_limit_exceeded"])
    assert (limited.user, limited.model_alias, limited.key_prefix) == (user_with_credits, "gpt-test", alice[:10])
    assert RequestLog.objects.filter(request_id=served.headers["x-request-id"]).count() == 1  # once, by its call


def test_reads_are_recorded_and_a_served_call_only_once(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    models = ask(world, secret, "models")
    streamed = ask(world, secret, json={"model": "gpt-test", "messages": HELLO, "stream": True})

    assert record_of(models).status_code == 200 and record_of(models).path == "models"
    log = record_of(streamed)
    assert (log.input_tokens, log.cost is not None) == (12, True)  # the call's own record, not a second one
    assert RequestLog.objects.count() == 2
