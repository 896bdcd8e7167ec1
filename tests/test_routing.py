"""The request path's decisions as pure functions: tier routing, validation, authorization order."""

from __future__ import annotations

import pytest

from gateway.call import Route
from gateway.errors import BLOCKED_BY_RULE, NO_ACCESS, Denial, modality_label
from gateway.policy import BadRequest, authorize, route_tier, validate_body
from gateway.queue import is_retryable
from gateway.snapshot import EndpointEntry, KeyEntry, ModelEntry, Snapshot

ENDPOINT = EndpointEntry(id=1, base_url="http://up/v1", auth_headers={}, timeout_seconds=5, connect_timeout_seconds=1)


def model(alias: str, *, groups=(10,), public=False, rules=None, paid=("realtime", "flex")) -> ModelEntry:  # type: ignore[no-untyped-def]
    return ModelEntry(
        id=hash(alias) % 1000,
        alias=alias,
        upstream_model=alias,
        kind="chat",
        endpoint=ENDPOINT,
        group_ids=frozenset(groups),
        public=public,
        rules=rules or {},
        paid_tiers=frozenset(paid),
        requests_per_second=None,
        burst_size=None,
        capacity=None,
        flex_concurrency=10,
        created=0,
    )


def key(purpose: str = "realtime", user_id: int = 1) -> KeyEntry:
    return KeyEntry(id=1, user_id=user_id, purpose=purpose, expires_at=None, requests_per_second=None, burst_size=None)


def snapshot(*models: ModelEntry, groups=(10,)) -> Snapshot:  # type: ignore[no-untyped-def]
    return Snapshot(
        version="v",
        models={m.alias: m for m in models},
        user_groups={1: frozenset(groups)},
    )


@pytest.mark.parametrize("tier", [None, "auto", "default", "priority", "scale"])
@pytest.mark.parametrize("endpoint", ["chat/completions", "responses", "embeddings"])
def test_every_non_flex_tier_is_realtime(endpoint, tier):
    assert route_tier(endpoint, {"model": "m", "service_tier": tier}) == Route.REALTIME


@pytest.mark.parametrize("endpoint", ["chat/completions", "responses"])
@pytest.mark.parametrize("background", [False, True])
def test_flex_is_queued_on_chat_and_responses_whatever_background_says(endpoint, background):
    assert route_tier(endpoint, {"service_tier": "flex", "background": background}) == Route.FLEX


def test_flex_embeddings_are_served_realtime():
    assert route_tier("embeddings", {"service_tier": "flex"}) == Route.REALTIME


def test_background_is_a_responses_field_only():
    assert route_tier("responses", {"background": True}) == Route.BACKGROUND
    assert route_tier("chat/completions", {"background": True}) == Route.REALTIME


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({}, "model"),
        ({"model": ""}, "model"),
        ({"model": 3}, "model"),
        ({"model": "m", "stream": 1}, "stream"),
        ({"model": "m", "background": "yes"}, "background"),
        ({"model": "m", "service_tier": ["flex"]}, "service_tier"),
        ({"model": "m", "service_tier": "turbo"}, "service_tier"),
    ],
)
def test_invalid_bodies_name_the_field(body, param):
    with pytest.raises(BadRequest) as exc_info:
        validate_body(body)
    assert exc_info.value.param == param


def test_a_valid_body_yields_its_model():
    assert validate_body({"model": "m", "stream": True, "service_tier": "flex"}) == "m"


def test_group_access_comes_before_rules_and_balance():
    blocked = model("m", groups=(99,), rules={"realtime": ("deny", "")})
    assert authorize(snapshot(blocked), key(), blocked, "realtime") == Denial(NO_ACCESS, "m")


def test_a_public_model_needs_no_group():
    public = model("m", groups=(), public=True)
    assert not isinstance(authorize(snapshot(public, groups=()), key(), public, "realtime"), Denial)


def test_a_deny_rule_for_the_keys_purpose_comes_before_balance():
    denied_model = model("m", rules={"batch": ("deny", "")})
    decision = authorize(snapshot(denied_model), key("batch"), denied_model, "realtime")
    assert decision == Denial(BLOCKED_BY_RULE, "m", "batch")


def test_a_rule_for_another_purpose_does_not_apply():
    other = model("m", rules={"batch": ("deny", "")})
    assert not isinstance(authorize(snapshot(other), key("realtime"), other, "realtime"), Denial)


def test_redirect_serves_the_target_and_checks_its_price():
    free = model("free", paid=())
    source = model("m", rules={"realtime": ("redirect", "free")})
    decision = authorize(snapshot(source, free), key(), source, "realtime")
    assert decision.model.alias == "free" and decision.requested_alias == "m"


@pytest.mark.parametrize(
    ("purpose", "label"),
    [
        ("batch", "Batch"),
        ("realtime", "Real-time"),
        ("playground", "Playground"),
        ("platform", "Platform"),
        ("evaluation", "Evaluation"),
        ("", "This"),
    ],
)
def test_modality_labels(purpose, label):
    assert modality_label(purpose) == label


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (422, False),
        (408, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
    ],
)
def test_a_flex_attempt_is_retried_only_for_statuses_that_may_succeed_later(status, retried):
    assert is_retryable(status) is retried
