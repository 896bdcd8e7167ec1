"""Upstream credentials are encrypted at rest: a database dump alone leaks none, and the key rotates."""

from __future__ import annotations

from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from common.crypto import UndecryptableToken, decrypt
from gateway.checks import check_credentials
from gateway.db import in_thread
from gateway.handler import lifespan
from gateway.models import Endpoint, UnreadableCredentials
from gateway.services import add_endpoint, add_model
from gateway.snapshot import build_snapshot

CREDENTIAL = "sk-upstream-do-not-leak"
URL = "http://127.0.0.1:9/v1"
NEW_KEY = Fernet.generate_key().decode()
OTHER_KEY = Fernet.generate_key().decode()
BEFORE = [("gateway", "0003_limits_and_budgets")]
AFTER = [("gateway", "0004_encrypt_endpoint_credentials")]


def stored_row(name: str) -> dict[str, object]:
    """The endpoint's row as a raw SQL read (a database dump) sees it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM gateway_endpoint WHERE name = %s", [name])
        columns = [column[0] for column in cursor.description]
        return dict(zip(columns, cursor.fetchone(), strict=True))


def stored_token(name: str) -> str:
    return str(stored_row(name)["api_key_encrypted"])


@pytest.mark.django_db
def test_a_database_dump_shows_no_clear_credential():
    add_endpoint("vendor", URL, api_key=CREDENTIAL)

    assert not any(CREDENTIAL in str(value) for value in stored_row("vendor").values())
    dump = StringIO()
    call_command("dumpdata", "gateway.endpoint", stdout=dump)
    assert CREDENTIAL not in dump.getvalue()
    assert decrypt(stored_token("vendor")) == CREDENTIAL  # stored, not dropped


@pytest.mark.django_db
def test_rotation_reencrypts_with_the_first_key_so_the_old_one_can_be_dropped(settings):
    add_endpoint("vendor", URL, api_key=CREDENTIAL)
    add_endpoint("keyless", URL)
    before = stored_token("vendor")

    settings.GATEWAY_ENCRYPTION_KEYS = [NEW_KEY, *settings.GATEWAY_ENCRYPTION_KEYS]
    out = StringIO()
    call_command("rotate_encryption_key", stdout=out)
    settings.GATEWAY_ENCRYPTION_KEYS = [NEW_KEY]

    assert "Re-encrypted 1 upstream credential " in out.getvalue()
    assert stored_token("vendor") != before
    assert Fernet(NEW_KEY).decrypt(stored_token("vendor").encode()).decode() == CREDENTIAL
    assert Endpoint.objects.get(name="vendor").decrypt_credential() == CREDENTIAL
    assert stored_token("keyless") == ""
    with pytest.raises(UndecryptableToken):
        decrypt(before)  # the old key is gone: only the re-encrypted value is still readable


@pytest.mark.django_db
def test_rotation_without_the_old_key_fails_naming_the_endpoint_and_rewrites_nothing(settings):
    add_endpoint("vendor", URL, api_key=CREDENTIAL)
    add_endpoint("readable", URL, api_key="another")
    before = stored_token("vendor")
    settings.GATEWAY_ENCRYPTION_KEYS = [NEW_KEY]
    Endpoint.objects.filter(name="readable").update(api_key_encrypted=Fernet(NEW_KEY).encrypt(b"another").decode())
    readable = stored_token("readable")

    with pytest.raises(CommandError, match="endpoint 'vendor': put back the key"):
        call_command("rotate_encryption_key")

    assert (stored_token("vendor"), stored_token("readable")) == (before, readable)


@pytest.mark.django_db
def test_a_credential_no_key_decrypts_is_named_by_the_check_and_the_snapshot_build(settings):
    endpoint, _ = add_endpoint("vendor", URL, api_key=CREDENTIAL)
    add_model("vendor-model", endpoint=endpoint, public=True)
    assert check_credentials(databases=["default"]) == []

    settings.GATEWAY_ENCRYPTION_KEYS = [OTHER_KEY]

    errors = check_credentials(databases=["default"])
    assert [error.id for error in errors] == ["gateway.E001"]
    assert "endpoint 'vendor'" in errors[0].msg
    with pytest.raises(UnreadableCredentials, match="endpoint 'vendor'"):
        build_snapshot()


@pytest.mark.django_db(transaction=True)
async def test_the_gateway_refuses_to_start_naming_the_endpoint_it_cannot_read(settings):
    await in_thread(add_endpoint, "vendor", URL, api_key=CREDENTIAL)
    settings.GATEWAY_ENCRYPTION_KEYS = [OTHER_KEY]
    sent: list[dict[str, str]] = []
    # Then a shutdown, so a lifespan that wrongly starts still returns.
    received = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, str]:
        return next(received)

    async def send(message: dict[str, str]) -> None:
        sent.append(message)

    await lifespan({"type": "lifespan"}, receive, send)

    assert [message["type"] for message in sent] == ["lifespan.startup.failed"]
    assert "endpoint 'vendor'" in sent[0]["message"]


def migrate(targets: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
    """Move the test database to these migrations; returns the models as they are there."""
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_a_clear_credential_and_back():
    try:
        old_models = migrate(BEFORE)
        old_models.get_model("gateway", "Endpoint").objects.create(name="legacy", base_url=URL, api_key=CREDENTIAL)

        migrate(AFTER)
        assert not any(CREDENTIAL in str(value) for value in stored_row("legacy").values())
        assert decrypt(stored_token("legacy")) == CREDENTIAL

        migrate(BEFORE)
        assert stored_row("legacy")["api_key"] == CREDENTIAL
    finally:
        migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())


@pytest.mark.django_db
def test_rotation_reencrypts_tool_credentials_too(settings):
    from gateway.models import Tool
    from gateway.services import add_tool

    tool, _ = add_tool("lookup", URL, description="d", parameters={"type": "object"}, api_key=CREDENTIAL)
    before = tool.api_key_encrypted

    settings.GATEWAY_ENCRYPTION_KEYS = [NEW_KEY, *settings.GATEWAY_ENCRYPTION_KEYS]
    call_command("rotate_encryption_key", stdout=StringIO())
    settings.GATEWAY_ENCRYPTION_KEYS = [NEW_KEY]

    tool = Tool.objects.get(name="lookup")
    assert tool.api_key_encrypted != before
    assert tool.decrypt_credential() == CREDENTIAL


@pytest.mark.django_db
def test_a_tool_credential_no_key_decrypts_is_named(settings):
    from gateway.models import UnreadableCredentials
    from gateway.services import add_tool

    tool, _ = add_tool("lookup", URL, description="d", parameters={"type": "object"}, api_key=CREDENTIAL)
    settings.GATEWAY_ENCRYPTION_KEYS = [NEW_KEY]

    with pytest.raises(UnreadableCredentials, match="credential of tool 'lookup'"):
        tool.decrypt_credential()
