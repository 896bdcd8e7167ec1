"""The tool registry: `add_tool`, the tools admin (credential write-only) and the tools the auth
snapshot holds for each model and group."""

from __future__ import annotations

import orjson
import pytest

from gateway.services import add_tool

pytestmark = pytest.mark.django_db(transaction=True)

LOOKUP_PARAMETERS = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}


def test_add_tool_refuses_bad_input_naming_what_is_wrong(world):
    from django.core.management import CommandError, call_command

    good = {"description": "d", "parameters": orjson.dumps(LOOKUP_PARAMETERS).decode()}
    cases = [
        (["bad name", "http://127.0.0.1/x"], good, "not a valid tool name"),
        (["t", "not-a-url"], good, "not a valid tool URL"),
        (["t", "http://127.0.0.1/x"], {**good, "parameters": "{oops"}, "--parameters is not valid JSON"),
        (["t", "http://127.0.0.1/x"], {**good, "parameters": '{"type": "string"}'}, '"type" must be "object"'),
        (["t", "http://127.0.0.1/x"], {**good, "model": ["nope"]}, "No model with alias 'nope'"),
        (["t", "http://127.0.0.1/x"], {**good, "timeout": 0}, "positive number of seconds"),
    ]
    for args, options, message in cases:
        with pytest.raises(CommandError, match=message):
            call_command("add_tool", *args, **options)
    from gateway.models import Tool

    assert not Tool.objects.exists()  # nothing half-written


def test_add_tool_stores_the_credential_encrypted_and_attaches_models_and_groups(world, capsys):
    from django.core.management import call_command

    from gateway.models import Tool

    call_command(
        "add_tool", "lookup", "http://tools.example/lookup", description="Look up.",
        parameters=orjson.dumps(LOOKUP_PARAMETERS).decode(), api_key="s3cret", timeout=5,
        model=["gpt-test"], group=["research"],
    )  # fmt: skip

    tool = Tool.objects.get(name="lookup")
    assert "s3cret" not in tool.api_key_encrypted and tool.decrypt_credential() == "s3cret"
    assert (tool.timeout_seconds, list(tool.models.values_list("alias", flat=True))) == (5, ["gpt-test"])
    assert list(tool.groups.values_list("name", flat=True)) == ["research"]
    assert "Created tool 'lookup'" in capsys.readouterr().out


def test_the_tool_admin_never_shows_the_credential_and_keeps_it_when_left_blank(staff_client, world):
    from django.urls import reverse

    tool, _ = add_tool("lookup", "http://tools.example/lookup", description="d", parameters=LOOKUP_PARAMETERS,
                       api_key="s3cret")  # fmt: skip
    page = staff_client.get(reverse("admin:gateway_tool_change", args=[tool.pk]))
    assert page.status_code == 200
    assert b"s3cret" not in page.content and tool.api_key_encrypted.encode() not in page.content
    form = {
        "name": "lookup", "description": "d2", "parameters": orjson.dumps(LOOKUP_PARAMETERS).decode(),
        "url": "http://tools.example/lookup", "api_key": "", "timeout_seconds": 30,
    }  # fmt: skip
    assert staff_client.post(reverse("admin:gateway_tool_change", args=[tool.pk]), form).status_code == 302
    tool.refresh_from_db()
    assert (tool.description, tool.decrypt_credential()) == ("d2", "s3cret")
    bad = staff_client.post(reverse("admin:gateway_tool_change", args=[tool.pk]), {**form, "parameters": "[1]"})
    assert b"must be a JSON schema object" in bad.content


def test_the_snapshot_holds_each_models_tools_for_its_groups(world, user_with_credits, outsider):
    from gateway.snapshot import build_snapshot

    add_tool("lookup", "http://tools.example/lookup", description="d", parameters=LOOKUP_PARAMETERS,
             api_key="s3cret", models=["gpt-test"], groups=["research"])  # fmt: skip
    snapshot = build_snapshot()
    model = snapshot.models["gpt-test"]

    (tool,) = snapshot.tools_for(user_with_credits.id, model)
    assert (tool.name, tool.headers) == ("lookup", {"Authorization": "Bearer s3cret"})
    assert snapshot.tools_for(outsider.id, model) == ()
    assert snapshot.tools_for(user_with_credits.id, snapshot.models["free-model"]) == ()


def test_a_models_cap_of_model_calls_is_set_in_its_admin(staff_client, world):
    from django.urls import reverse

    from gateway.models import DeployedModel
    from tests.test_admin import form_data

    url = reverse("admin:gateway_deployedmodel_change", args=[world.paid.pk])
    data = {**form_data(staff_client.get(url)), "max_model_calls": "4"}

    assert staff_client.post(url, data).status_code == 302
    assert DeployedModel.objects.get(pk=world.paid.pk).max_model_calls == 4
