"""Every error of the request path, as the official client sees it: typed exception, exact message."""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import openai
import pytest
from django.test import override_settings
from django.utils import timezone

from accounts.models import ApiKey
from accounts.services import revoke_api_key
from billing.services import remove_credits
from gateway.models import DeployedModel
from gateway.services import add_endpoint, add_model
from routing_rules.services import add_traffic_rule
from tests.conftest import upstream_calls, wait_for
from tests.upstream import free_port

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hi"}]
NO_ACCESS = "You do not have access to 'gpt-test'. Please contact your administrator to request access."
BLOCKED = (
    "{label} access to 'gpt-test' is blocked by a routing rule. Please contact your administrator to request access."
)
BALANCE = "Account balance too low. Please add credits to continue."


def message_of(exc_info) -> str:  # type: ignore[no-untyped-def]
    return exc_info.value.body["message"]


def post(world, path: str, secret: str | None, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(f"{world.url}/ai/v1/{path}", headers=headers, **kwargs)


def test_missing_key_is_401(world):
    reply = post(world, "chat/completions", None, json={"model": "gpt-test", "messages": HELLO})
    assert reply.status_code == 401
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_key_is_401(world):
    with pytest.raises(openai.AuthenticationError) as exc_info:
        world.client("sk-unknown").chat.completions.create(model="gpt-test", messages=HELLO)
    assert message_of(exc_info) == "Incorrect API key provided."


def test_revoked_key_is_401(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    revoke_api_key(ApiKey.objects.get(owner=user_with_credits))
    with pytest.raises(openai.AuthenticationError):
        world.client(secret).chat.completions.create(model="gpt-test", messages=HELLO)


def test_expired_key_is_401(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    world.client(secret).chat.completions.create(model="gpt-test", messages=HELLO)  # served while valid
    key = ApiKey.objects.get(owner=user_with_credits)
    key.expires_at = timezone.now() + timedelta(seconds=1)
    key.save()  # the snapshot learns the expiry time; the clock, not a rebuild, then ends the key

    models = f"{world.url}/ai/v1/models"
    wait_for(lambda: httpx.get(models, headers={"Authorization": f"Bearer {secret}"}).status_code == 401, timeout=15)
    with pytest.raises(openai.AuthenticationError):
        world.client(secret).chat.completions.create(model="gpt-test", messages=HELLO)


def test_platform_key_is_refused_on_the_api(world, user_with_credits, make_key):
    with pytest.raises(openai.PermissionDeniedError) as exc_info:
        world.client(make_key(user_with_credits, purpose="platform")).models.list()
    assert "management only" in message_of(exc_info)


def test_unknown_model_is_404(world, user_with_credits, make_key):
    with pytest.raises(openai.NotFoundError) as exc_info:
        world.client(make_key(user_with_credits)).chat.completions.create(model="nope", messages=HELLO)
    assert exc_info.value.body["code"] == "model_not_found"


def test_no_group_access_is_403_with_the_exact_message(world, outsider, make_key):
    with pytest.raises(openai.PermissionDeniedError) as exc_info:
        world.client(make_key(outsider)).chat.completions.create(model="gpt-test", messages=HELLO)
    assert message_of(exc_info) == NO_ACCESS


@pytest.mark.parametrize(
    ("purpose", "label"), [("realtime", "Real-time"), ("batch", "Batch"), ("playground", "Playground")]
)
def test_deny_rule_for_the_keys_purpose_is_403(world, user_with_credits, make_key, purpose, label):
    add_traffic_rule(world.paid, purpose=purpose, action="deny")
    with pytest.raises(openai.PermissionDeniedError) as exc_info:
        world.client(make_key(user_with_credits, purpose=purpose)).chat.completions.create(
            model="gpt-test", messages=HELLO
        )
    assert message_of(exc_info) == BLOCKED.format(label=label)


def test_deny_rule_for_another_purpose_does_not_block(world, user_with_credits, make_key):
    add_traffic_rule(world.paid, purpose="batch", action="deny")
    completion = world.client(make_key(user_with_credits)).chat.completions.create(model="gpt-test", messages=HELLO)
    assert completion.choices[0].message.content == "Hello from upstream"


def test_redirect_rule_serves_the_target_model(world, user_with_credits, make_key):
    add_traffic_rule(world.paid, purpose="realtime", action="redirect", target=world.free)
    world.client(make_key(user_with_credits)).chat.completions.create(model="gpt-test", messages=HELLO)
    assert world.upstream.requests[-1]["body"]["model"] == "free-model"


def test_zero_balance_on_a_paid_model_is_402(world, user_without_credits, make_key):
    with pytest.raises(openai.APIStatusError) as exc_info:
        world.client(make_key(user_without_credits)).chat.completions.create(model="gpt-test", messages=HELLO)
    assert exc_info.value.status_code == 402
    assert message_of(exc_info) == BALANCE


def test_spent_balance_is_402_once_it_crosses_zero(world, user_with_credits, make_key):
    client = world.client(make_key(user_with_credits))
    client.chat.completions.create(model="gpt-test", messages=HELLO)
    remove_credits(user_with_credits, "100")  # the usage charge above leaves it just below zero
    with pytest.raises(openai.APIStatusError) as exc_info:
        client.chat.completions.create(model="gpt-test", messages=HELLO)
    assert exc_info.value.status_code == 402


def test_zero_balance_can_still_use_free_models(world, user_without_credits, make_key):
    completion = world.client(make_key(user_without_credits)).chat.completions.create(
        model="free-model", messages=HELLO
    )
    assert completion.choices[0].message.content == "Hello from upstream"


def test_access_is_checked_before_rules_and_rules_before_balance(world, outsider, user_without_credits, make_key):
    add_traffic_rule(world.paid, purpose="realtime", action="deny")
    remove_credits(outsider, "100")
    with pytest.raises(openai.PermissionDeniedError) as exc_info:
        world.client(make_key(outsider)).chat.completions.create(model="gpt-test", messages=HELLO)
    assert message_of(exc_info) == NO_ACCESS
    with pytest.raises(openai.PermissionDeniedError) as exc_info:
        world.client(make_key(user_without_credits)).chat.completions.create(model="gpt-test", messages=HELLO)
    assert message_of(exc_info) == BLOCKED.format(label="Real-time")


def test_an_upstreams_own_403_passes_through_untouched(world, user_with_credits, make_key):
    reply = post(world, "chat/completions", make_key(user_with_credits), json={"model": "forbidden", "messages": HELLO})
    assert reply.status_code == 403
    assert reply.text == "Upstream Forbidden"


def test_upstream_error_status_and_body_pass_through(world, user_with_credits, make_key):
    with pytest.raises(openai.InternalServerError) as exc_info:
        world.client(make_key(user_with_credits)).chat.completions.create(model="fail-500", messages=HELLO)
    assert message_of(exc_info) == "upstream says 500"


def test_upstream_timeout_is_504(world, user_with_credits, make_key):
    world.upstream.slow_seconds = 5  # the endpoint's timeout is 3 s
    with pytest.raises(openai.APIStatusError) as exc_info:
        world.client(make_key(user_with_credits), timeout=20).chat.completions.create(model="slow", messages=HELLO)
    assert exc_info.value.status_code == 504


def test_unreachable_upstream_is_502(world, user_with_credits, make_key):
    dead, _ = add_endpoint("dead", f"http://127.0.0.1:{free_port()}/v1")
    add_model("dead-model", endpoint=dead, public=True)
    with pytest.raises(openai.APIStatusError) as exc_info:
        world.client(make_key(user_with_credits)).chat.completions.create(model="dead-model", messages=HELLO)
    assert exc_info.value.status_code == 502


def test_errors_are_not_charged(world, user_with_credits, make_key):
    from billing.models import CreditTransaction
    from gateway.models import RequestLog

    with pytest.raises(openai.InternalServerError):
        world.client(make_key(user_with_credits)).chat.completions.create(model="fail-500", messages=HELLO)
    wait_for(lambda: RequestLog.objects.filter(status_code=500).exists())
    assert not CreditTransaction.objects.filter(kind="usage").exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", None),
        (b"[1, 2]", None),
        (b"{}", "model"),
        (b'{"model": 5}', "model"),
        (b'{"model": "gpt-test", "stream": "yes"}', "stream"),
        (b'{"model": "gpt-test", "service_tier": 3}', "service_tier"),
        (b'{"model": "gpt-test", "service_tier": "turbo"}', "service_tier"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(world, user_with_credits, make_key, body, param):
    reply = post(world, "chat/completions", make_key(user_with_credits), content=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_oversized_body_is_413(world, user_with_credits, make_key):
    with override_settings(GATEWAY_MAX_BODY_BYTES=1000):
        reply = post(
            world, "chat/completions", make_key(user_with_credits), json={"model": "gpt-test", "input": "x" * 2000}
        )
    assert reply.status_code == 413
    assert "larger than the limit" in reply.json()["error"]["message"]


def test_key_rate_limit_is_429_with_retry_after(world, user_with_credits, make_key, limits_clock):
    secret = make_key(user_with_credits, requests_per_second=1, burst_size=3)
    request = {"model": "free-model", "messages": HELLO}
    # The limits' clock stands still, so the count is exact however slowly the calls go: the burst
    # is served and the very next call refused.
    statuses = [post(world, "chat/completions", secret, json=request).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    reply = post(world, "chat/completions", secret, json=request)
    assert reply.status_code == 429
    assert reply.headers["Retry-After"] == "1"
    assert reply.json()["error"]["type"] == "rate_limit_error"


def test_model_capacity_is_429_while_full(world, user_with_credits, make_key):
    DeployedModel.objects.filter(alias="held").update(capacity=1)
    DeployedModel.objects.get(alias="held").save()  # a save, so the snapshot sees the capacity
    secret = make_key(user_with_credits)
    request = {"model": "held", "messages": HELLO}
    first = threading.Thread(target=lambda: post(world, "chat/completions", secret, json=request, timeout=30))
    first.start()
    # The first call holds the only slot until released (an earlier test's call may still be in flight).
    wait_for(lambda: upstream_calls(world, "held") == 1)

    reply = post(world, "chat/completions", secret, json=request)
    world.upstream.release.set()
    first.join()

    assert reply.status_code == 429
    assert reply.json()["error"]["code"] == "model_at_capacity"


def test_unknown_api_path_is_an_openai_404(world, user_with_credits, make_key):
    reply = post(world, "fine_tuning/jobs", make_key(user_with_credits), json={})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "unknown_url"


def test_a_failure_of_the_gateway_itself_is_a_500_in_the_envelope_and_on_record(
    world, user_with_credits, make_key, monkeypatch
):
    from dwctl_site.asgi import gateway_application
    from gateway import views
    from gateway.models import RequestLog

    @views.calls_model
    async def broken(call):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    monkeypatch.setitem(gateway_application.inference_views, "/ai/v1/chat/completions", broken)
    reply = post(world, "chat/completions", make_key(user_with_credits), json={"model": "gpt-test", "messages": HELLO})

    assert reply.status_code == 500
    assert reply.json()["error"]["message"] == "The gateway failed to handle this request."
    assert reply.headers["x-request-id"].startswith("req_")
    wait_for(lambda: RequestLog.objects.filter(request_id=reply.headers["x-request-id"], status_code=500).exists())


def test_the_api_reads_repeated_headers_as_one_and_names_in_any_case(world, user_with_credits, make_key):
    from gateway.models import RequestLog

    secret = make_key(user_with_credits)
    reply = httpx.post(
        f"{world.url}/ai/v1/chat/completions",
        headers=[("AUTHORIZATION", f"Bearer {secret}"), ("x-client-request-id", "a"), ("X-Client-Request-Id", "b")],
        json={"model": "gpt-test", "messages": HELLO},
    )

    assert reply.status_code == 200
    wait_for(lambda: RequestLog.objects.filter(request_id=reply.headers["x-request-id"]).exists())
    assert RequestLog.objects.get(request_id=reply.headers["x-request-id"]).client_request_id == "a,b"
