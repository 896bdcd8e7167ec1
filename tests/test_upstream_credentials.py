"""The client's key never leaves the gateway: an endpoint without a credential gets none, in every tier,
and one with a credential gets its own, read back from its encrypted form (across a key rotation too)."""

from __future__ import annotations

from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command

from gateway.services import add_endpoint, add_model
from gateway.snapshot import mark_changed
from tests.conftest import HELLO, WorkerThread

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def keyless(world):  # type: ignore[no-untyped-def]
    endpoint, _ = add_endpoint("keyless", world.upstream.base_url, timeout_seconds=3)
    return add_model("keyless-model", endpoint=endpoint, upstream_model="keyless-upstream", public=True)


def seen_headers(world) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    return [
        {name.lower(): value for name, value in seen["headers"].items()}
        for seen in world.upstream.requests
        if seen["body"].get("model") == "keyless-upstream"
    ]


def test_a_keyless_endpoint_sees_no_credential_in_any_tier(world, keyless, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    client = world.client(secret)

    client.chat.completions.create(model="keyless-model", messages=HELLO)
    list(client.chat.completions.create(model="keyless-model", messages=HELLO, stream=True))
    with WorkerThread():
        client.chat.completions.create(model="keyless-model", messages=HELLO, service_tier="flex")

    headers = seen_headers(world)
    assert len(headers) == 3
    for sent in headers:
        assert "authorization" not in sent
        assert not any(secret in value for value in sent.values())


def test_an_endpoint_with_a_credential_sends_its_own_never_the_clients(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)

    world.client(secret).chat.completions.create(model="gpt-test", messages=HELLO)

    sent = world.upstream.requests[-1]["headers"]
    assert sent["Authorization"] == "Bearer upstream-secret"
    assert not any(secret in value for value in sent.values())


def test_after_a_key_rotation_every_tier_still_sends_the_credential(world, user_with_credits, make_key, settings):
    new_key = Fernet.generate_key().decode()
    settings.GATEWAY_ENCRYPTION_KEYS = [new_key, *settings.GATEWAY_ENCRYPTION_KEYS]
    call_command("rotate_encryption_key", stdout=StringIO())
    settings.GATEWAY_ENCRYPTION_KEYS = [new_key]  # the old key dropped
    mark_changed()  # the gateway and the worker read the credentials again, with the new key alone
    client = world.client(make_key(user_with_credits))

    client.chat.completions.create(model="gpt-test", messages=HELLO)
    with WorkerThread():
        client.chat.completions.create(model="gpt-test", messages=HELLO, service_tier="flex")

    sent = [seen["headers"] for seen in world.upstream.requests if seen["body"].get("model") == "gpt-upstream"]
    assert [headers["Authorization"] for headers in sent] == ["Bearer upstream-secret"] * 2
