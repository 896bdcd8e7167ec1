"""Rate and token limits through the live gateway, on a stopped clock: exact bursts, tokens per
minute for keys and models, and the x-ratelimit-* headers as the official client reads them."""

from __future__ import annotations

import openai
import pytest

from gateway.models import DeployedModel
from tests.conftest import HELLO, WorkerThread, post, wait_for
from tests.upstream import COMPLETION_TOKENS, PROMPT_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)

CALL_TOKENS = PROMPT_TOKENS + COMPLETION_TOKENS  # what every call to the fake upstream uses
FREE = {"model": "free-model", "messages": HELLO}
RATE_HEADERS = ("limit", "remaining", "reset")


def limit_model(alias: str, **limits: int) -> None:
    DeployedModel.objects.filter(alias=alias).update(**limits)
    DeployedModel.objects.get(alias=alias).save()  # a save, so the snapshot sees the limits


def statuses(world, secret: str, count: int, request: dict = FREE) -> list[int]:  # type: ignore[no-untyped-def, type-arg]
    return [post(world, secret, "chat/completions", request).status_code for _ in range(count)]


def rate_headers(headers, kind: str) -> tuple[str | None, ...]:  # type: ignore[no-untyped-def]
    return tuple(headers.get(f"x-ratelimit-{name}-{kind}") for name in RATE_HEADERS)


# --- requests per second ---------------------------------------------------------------------------


def test_a_keys_burst_is_served_and_the_next_call_waits_for_the_refill(
    world, user_with_credits, make_key, limits_clock
):
    secret = make_key(user_with_credits, requests_per_second=1, burst_size=3)

    assert statuses(world, secret, 4) == [200, 200, 200, 429]
    refused = post(world, secret, "chat/completions", FREE)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"

    limits_clock.advance(1)  # one request back, and only one
    assert statuses(world, secret, 2) == [200, 429]


def test_a_models_rate_counts_every_key_and_names_the_model(world, user_with_credits, make_key, limits_clock):
    limit_model("free-model", requests_per_second=1, burst_size=2)
    first, second = make_key(user_with_credits), make_key(user_with_credits)

    assert statuses(world, first, 1) + statuses(world, second, 2) == [200, 200, 429]
    error = post(world, first, "chat/completions", FREE).json()["error"]
    assert error["message"] == "Rate limit reached for 'free-model'. Please slow down."


# --- tokens per minute -----------------------------------------------------------------------------


def test_a_key_out_of_tokens_for_the_minute_is_429_with_retry_after(world, user_with_credits, make_key, limits_clock):
    secret = make_key(user_with_credits, tokens_per_minute=2 * CALL_TOKENS)

    assert statuses(world, secret, 3) == [200, 200, 429]  # the second call reaches the limit
    with pytest.raises(openai.RateLimitError) as refused:
        world.client(secret).chat.completions.create(**FREE)
    assert refused.value.body == {
        "message": "Tokens per minute limit reached for this API key. Please slow down.",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert refused.value.response.headers["Retry-After"] == "60"  # the first call's tokens leave then
    assert rate_headers(refused.value.response.headers, "tokens") == (str(2 * CALL_TOKENS), "0", "1m0s")

    limits_clock.advance(59)
    assert statuses(world, secret, 1) == [429]
    limits_clock.advance(1)
    assert statuses(world, secret, 1) == [200]


def test_a_model_out_of_tokens_for_the_minute_is_429_naming_it(world, user_with_credits, make_key, limits_clock):
    limit_model("free-model", tokens_per_minute=CALL_TOKENS)
    first, second = make_key(user_with_credits), make_key(user_with_credits)

    assert statuses(world, first, 1) == [200]
    refused = post(world, second, "chat/completions", FREE)  # another key: the model's minute is spent
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "60"
    assert refused.json()["error"]["message"] == "Tokens per minute limit reached for 'free-model'. Please slow down."
    assert post(world, first, "chat/completions", {**FREE, "model": "gpt-test"}).status_code == 200


def test_flex_calls_count_against_their_keys_tokens_but_not_the_models(
    world, user_with_credits, make_key, limits_clock
):
    limit_model("gpt-test", tokens_per_minute=CALL_TOKENS)
    flex_key = make_key(user_with_credits, tokens_per_minute=CALL_TOKENS)
    request = {"model": "gpt-test", "messages": HELLO}

    with WorkerThread():
        world.client(flex_key).chat.completions.create(**request, service_tier="flex")

    assert statuses(world, flex_key, 1, request) == [429]  # the key's minute holds the flex call's tokens
    # The model's does not: flex has its own bound (flex_concurrency), so a real-time call still passes.
    assert statuses(world, make_key(user_with_credits), 1, request) == [200]


def test_a_keys_limit_counts_tokens_of_responses_and_streamed_calls(world, user_with_credits, make_key, limits_clock):
    secret = make_key(user_with_credits, tokens_per_minute=2 * CALL_TOKENS)
    client = world.client(secret)

    client.responses.create(model="free-model", input="hi")
    list(client.chat.completions.create(**FREE, stream=True, stream_options={"include_usage": True}))

    # A stream's tokens are counted when the relay ends, which the client need not wait for: probe
    # with calls that use no tokens themselves (the upstream fails them) until the count has landed.
    failing = {"model": "fail-500", "messages": HELLO}
    wait_for(lambda: post(world, secret, "chat/completions", failing).status_code == 429)


# --- headers ---------------------------------------------------------------------------------------


def test_every_call_under_a_limit_tells_what_is_left_in_openais_headers(
    world, user_with_credits, make_key, limits_clock
):
    client = world.client(make_key(user_with_credits, requests_per_second=1, burst_size=5, tokens_per_minute=1000))

    first = client.chat.completions.with_raw_response.create(**FREE)
    second = client.chat.completions.with_raw_response.create(**FREE)
    limits_clock.advance(0.5)
    third = client.chat.completions.with_raw_response.create(**FREE)

    assert [rate_headers(reply.headers, "requests") for reply in (first, second, third)] == [
        ("5", "4", "1s"),
        ("5", "3", "2s"),
        ("5", "2", "2.5s"),  # half a request refilled: 3.5 left before this call, 2.5 after
    ]
    # Tokens are counted when a call ends, so a call's headers show the calls before it.
    assert [rate_headers(reply.headers, "tokens") for reply in (first, second, third)] == [
        ("1000", "1000", "0s"),
        ("1000", str(1000 - CALL_TOKENS), "1m0s"),
        ("1000", str(1000 - 2 * CALL_TOKENS), "59.5s"),
    ]
    assert third.parse().choices[0].message.content == "Hello from upstream"


def test_the_headers_report_the_tighter_of_the_keys_and_the_models_limits(
    world, user_with_credits, make_key, limits_clock
):
    limit_model("free-model", requests_per_second=1, burst_size=2, tokens_per_minute=10_000)
    secret = make_key(user_with_credits, requests_per_second=10, burst_size=10, tokens_per_minute=100)
    client = world.client(secret)

    client.chat.completions.create(**FREE)
    reply = client.chat.completions.with_raw_response.create(**FREE)

    # Requests: the model has 0 of 2 left, the key 8 of 10. Tokens: the key 58 of 100, the model 9958.
    assert rate_headers(reply.headers, "requests") == ("2", "0", "2s")
    assert rate_headers(reply.headers, "tokens") == ("100", str(100 - CALL_TOKENS), "1m0s")


def test_a_call_under_no_limit_carries_no_rate_headers(world, user_with_credits, make_key):
    reply = world.client(make_key(user_with_credits)).chat.completions.with_raw_response.create(**FREE)
    assert not [name for name in reply.headers if name.startswith("x-ratelimit-")]


def test_a_flex_call_tells_its_keys_headroom_too(world, user_with_credits, make_key, limits_clock):
    secret = make_key(user_with_credits, requests_per_second=1, burst_size=4)
    reply = post(
        world, secret, "responses", {"model": "gpt-test", "input": "hi", "background": True, "service_tier": "flex"}
    )
    assert reply.status_code == 202
    assert rate_headers(reply.headers, "requests") == ("4", "3", "1s")
