"""Limits and revocation, scripted and in the admin: one set of rules, only the given limits change."""

from __future__ import annotations

from decimal import Decimal
from io import StringIO
from typing import Any

import httpx
import openai
import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db.models import Model
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import KEY_LIMITS, ApiKey, User
from accounts.services import create_api_key, revoke_api_key, set_key_limits
from gateway.models import MODEL_LIMITS, DeployedModel
from gateway.services import add_endpoint, add_model, set_model_limits
from tests.conftest import HELLO, wait_for
from tests.test_admin import form_data

KEY_PRESET: dict[str, Any] = {
    "requests_per_second": 5,
    "burst_size": 10,
    "tokens_per_minute": 600,
    "spend_limit": Decimal(1),
    "spend_window": "day",
}
MODEL_PRESET: dict[str, Any] = {
    "requests_per_second": 5,
    "burst_size": 10,
    "tokens_per_minute": 600,
    "capacity": 4,
    "flex_concurrency": 3,
    "max_output_tokens": 256,
}
NO_KEY_LIMITS = {name: None for name in KEY_LIMITS} | {"spend_window": ""}


def run(*args: str) -> list[str]:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().splitlines()


def fails(*args: str) -> str:
    with pytest.raises(CommandError) as excinfo:
        run(*args)
    return str(excinfo.value)


def limits_of(row: Model, fields: tuple[str, ...]) -> dict[str, Any]:
    """The limits as stored, not as the instance in memory has them."""
    return type(row)._default_manager.filter(pk=row.pk).values(*fields).get()


@pytest.fixture
def key(user_with_credits: User) -> ApiKey:
    return create_api_key(user_with_credits, name="ci", **KEY_PRESET)[0]


@pytest.fixture
def model(db) -> DeployedModel:
    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1")
    model = add_model("gpt-test", endpoint=endpoint, input_price="1", output_price="2")
    return set_model_limits(model, **MODEL_PRESET)


@pytest.fixture
def staff_client(client: Client, admin_user: User) -> Client:
    client.force_login(admin_user)
    return client


# --- set_limits key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "changed"),
    [
        (("--requests-per-second", "7"), {"requests_per_second": 7}),
        (("--burst-size", "20"), {"burst_size": 20}),
        (("--tokens-per-minute", "1000"), {"tokens_per_minute": 1000}),
        (("--spend-limit", "2.5", "--spend-window", "week"), {"spend_limit": Decimal("2.5"), "spend_window": "week"}),
        (("--spend-limit", "0.000000001"), {"spend_limit": Decimal("0.000000001")}),  # the window already set stays
        (("--spend-window", "month"), {"spend_window": "month"}),
    ],
)
def test_each_key_option_sets_its_limit_and_leaves_the_others(
    key: ApiKey, args: tuple[str, ...], changed: dict
) -> None:
    run("set_limits", "key", "alice", "ci", *args)
    assert limits_of(key, KEY_LIMITS) == KEY_PRESET | changed


def test_clear_removes_every_key_limit_then_sets_the_given_ones(key: ApiKey) -> None:
    lines = run("set_limits", "key", "alice", "ci", "--clear", "--tokens-per-minute", "50")
    assert limits_of(key, KEY_LIMITS) == NO_KEY_LIMITS | {"tokens_per_minute": 50}
    assert lines == [
        f"Set the limits of key 'ci' ({key.prefix}…) of 'alice':",
        "requests per second none, burst size none, tokens per minute 50, spend limit none",
    ]
    run("set_limits", "key", "alice", "ci", "--clear")
    assert limits_of(key, KEY_LIMITS) == NO_KEY_LIMITS


def test_set_limits_prints_every_limit_the_key_now_has(key: ApiKey) -> None:
    lines = run("set_limits", "key", "alice", "ci", "--spend-limit", "12.50", "--spend-window", "week")
    assert lines[-1] == "requests per second 5, burst size 10, tokens per minute 600, spend limit 12.5 credits per week"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nobody", "ci", "--burst-size", "1"), "User 'nobody' does not exist."),
        (("alice", "nope", "--burst-size", "1"), "User 'alice' has no key named 'nope'."),
        (("alice", "ci"), "Nothing to change: give a limit, or --clear."),
        (("alice", "ci", "--requests-per-second", "0"), "Requests per second: Must be a positive whole number"),
        (("alice", "ci", "--tokens-per-minute", "-1"), "Tokens per minute: Ensure this value is greater than or equal"),
        (("alice", "ci", "--burst-size", "many"), "argument --burst-size: invalid int value: 'many'"),
        (("alice", "ci", "--requests-per-second", "1.5"), "invalid int value: '1.5'"),
        (("alice", "ci", "--clear", "--burst-size", "3"), "Burst size: A burst needs a rate"),
        (("alice", "ci", "--clear", "--spend-limit", "5"), "Spend window: A spend limit needs a window"),
        (("alice", "ci", "--clear", "--spend-window", "week"), "Spend limit: A spend window needs a spend limit."),
        (("alice", "ci", "--spend-window", "year"), "Spend window: Value 'year' is not a valid choice."),
        (("alice", "ci", "--spend-limit", "0"), "The spend limit must be a positive number, not '0'."),
        (("alice", "ci", "--spend-limit", "-3"), "The spend limit must be a positive number, not '-3'."),
        (("alice", "ci", "--spend-limit", "NaN"), "The spend limit must be a positive number, not 'NaN'."),
        (("alice", "ci", "--spend-limit", "lots"), "The spend limit 'lots' is not a number."),
        (("alice", "ci", "--spend-limit", "0.0000000001"), "The spend limit '0.0000000001' has more than 9 decimal"),
        (("alice", "ci", "--spend-limit", "1e15"), "The spend limit '1e15' is too large"),
        # A good limit next to a bad one is not written either.
        (("alice", "ci", "--tokens-per-minute", "99", "--requests-per-second", "0"), "Requests per second:"),
        (("alice", "ci", "--tokens-per-minute", "99", "--spend-limit", "free"), "'free' is not a number."),
    ],
)
def test_bad_key_limits_are_refused_and_nothing_is_written(key: ApiKey, args: tuple[str, ...], message: str) -> None:
    assert message in fails("set_limits", "key", *args)
    assert limits_of(key, KEY_LIMITS) == KEY_PRESET


def test_a_name_two_unrevoked_keys_share_is_refused(key: ApiKey, user_with_credits: User) -> None:
    twin, _ = create_api_key(user_with_credits, name="ci")
    expected = f"User 'alice' has 2 keys named 'ci' ({twin.prefix}…, {key.prefix}…): rename all but one"
    assert expected in fails("set_limits", "key", "alice", "ci", "--clear")
    assert expected in fails("revoke_api_key", "alice", "ci")
    assert limits_of(key, KEY_LIMITS) == KEY_PRESET
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_a_revoked_keys_limits_do_not_change(key: ApiKey) -> None:
    revoke_api_key(key)
    assert "is revoked: a revoked key's limits no longer change." in fails(
        "set_limits", "key", "alice", "ci", "--clear"
    )
    assert limits_of(key, KEY_LIMITS) == KEY_PRESET


@pytest.mark.parametrize("revoked_is_newer", [False, True])
def test_a_revoked_key_leaves_its_name_to_the_unrevoked_one(
    key: ApiKey, user_with_credits: User, revoked_is_newer: bool
) -> None:
    other, _ = create_api_key(user_with_credits, name="ci", **KEY_PRESET)
    revoked, unrevoked = (other, key) if revoked_is_newer else (key, other)
    revoke_api_key(revoked)
    run("set_limits", "key", "alice", "ci", "--tokens-per-minute", "70")
    assert limits_of(unrevoked, ("tokens_per_minute",)) == {"tokens_per_minute": 70}
    assert limits_of(revoked, ("tokens_per_minute",)) == {"tokens_per_minute": KEY_PRESET["tokens_per_minute"]}
    assert run("revoke_api_key", "alice", "ci") == [f"Revoked the key 'ci' ({unrevoked.prefix}…) of 'alice'."]
    unrevoked.refresh_from_db()
    assert unrevoked.is_revoked


def test_a_limit_change_from_a_stale_row_keeps_a_revocation_made_meanwhile(key: ApiKey) -> None:
    revoke_api_key(ApiKey.objects.get(pk=key.pk))  # another process revokes it; `key` does not know
    set_key_limits(key, tokens_per_minute=5)
    key.refresh_from_db()
    assert key.is_revoked
    assert key.tokens_per_minute == 5


def test_a_refused_change_leaves_the_key_in_memory_as_it_was(key: ApiKey) -> None:
    with pytest.raises(ValidationError):
        set_key_limits(key, clear=True, burst_size=3)
    assert {name: getattr(key, name) for name in KEY_LIMITS} == KEY_PRESET
    key.save()  # a caller saving the same instance later writes no half-applied change
    assert limits_of(key, KEY_LIMITS) == KEY_PRESET


# --- set_limits model -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("requests_per_second", 9),
        ("burst_size", 30),
        ("tokens_per_minute", 5000),
        ("capacity", 2),
        ("flex_concurrency", 7),
        ("max_output_tokens", 1024),
    ],
)
def test_each_model_option_sets_its_limit_and_leaves_the_others(model: DeployedModel, option: str, value: int) -> None:
    run("set_limits", "model", "gpt-test", f"--{option.replace('_', '-')}", str(value))
    assert limits_of(model, MODEL_LIMITS) == MODEL_PRESET | {option: value}


def test_clear_resets_a_models_limits_and_its_flex_concurrency_to_the_default(model: DeployedModel) -> None:
    lines = run("set_limits", "model", "gpt-test", "--clear", "--capacity", "2")
    expected = {name: None for name in MODEL_LIMITS} | {"capacity": 2, "flex_concurrency": 10}
    assert limits_of(model, MODEL_LIMITS) == expected
    assert lines == [
        "Set the limits of model 'gpt-test':",
        "requests per second none, burst size none, tokens per minute none, capacity 2, flex concurrency 10, "
        "max output tokens none",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope", "--capacity", "1"), "Model 'nope' does not exist."),
        (("gpt-test",), "Nothing to change: give a limit, or --clear."),
        (("gpt-test", "--capacity", "0"), "Capacity: Must be a positive whole number, or empty for no limit."),
        (("gpt-test", "--max-output-tokens", "0"), "Max output tokens: Must be a positive whole number"),
        (("gpt-test", "--flex-concurrency", "0"), "Flex concurrency: Must be a positive whole number."),
        (("gpt-test", "--flex-concurrency", "-2"), "Flex concurrency: Ensure this value is greater than or equal"),
        (("gpt-test", "--clear", "--burst-size", "3"), "Burst size: A burst needs a rate"),
        (("gpt-test", "--tokens-per-minute", "lots"), "argument --tokens-per-minute: invalid int value: 'lots'"),
        (("gpt-test", "--capacity", "8", "--requests-per-second", "0"), "Requests per second:"),
    ],
)
def test_bad_model_limits_are_refused_and_nothing_is_written(
    model: DeployedModel, args: tuple[str, ...], message: str
) -> None:
    assert message in fails("set_limits", "model", *args)
    assert limits_of(model, MODEL_LIMITS) == MODEL_PRESET


def test_a_retired_models_limits_are_refused(model: DeployedModel) -> None:
    DeployedModel.objects.filter(pk=model.pk).update(deleted_at=timezone.now())
    assert fails("set_limits", "model", "gpt-test", "--clear") == (
        "Model 'gpt-test' is retired: bring it back in the admin first."
    )
    assert limits_of(model, MODEL_LIMITS) == MODEL_PRESET


def test_limits_set_by_the_command_reach_the_auth_snapshot(
    key: ApiKey, model: DeployedModel, django_capture_on_commit_callbacks: Any
) -> None:
    from gateway.snapshot import get_snapshot

    assert get_snapshot().keys[key.secret_hash].tokens_per_minute == 600
    with django_capture_on_commit_callbacks(execute=True):
        run("set_limits", "key", "alice", "ci", "--tokens-per-minute", "77", "--spend-limit", "3")
        run("set_limits", "model", "gpt-test", "--max-output-tokens", "512")
    snapshot = get_snapshot()
    assert (snapshot.keys[key.secret_hash].tokens_per_minute, snapshot.keys[key.secret_hash].spend_limit) == (
        77,
        Decimal(3),
    )
    assert snapshot.models["gpt-test"].max_output_tokens == 512


# --- revoke_api_key -------------------------------------------------------------------------


def test_revoke_api_key_revokes_the_key_and_says_so(key: ApiKey) -> None:
    assert run("revoke_api_key", "alice", "ci") == [f"Revoked the key 'ci' ({key.prefix}…) of 'alice'."]
    key.refresh_from_db()
    assert key.is_revoked


def test_revoke_api_key_names_an_unknown_user_or_key(key: ApiKey) -> None:
    assert fails("revoke_api_key", "nobody", "ci") == "User 'nobody' does not exist."
    assert fails("revoke_api_key", "alice", "laptop") == "User 'alice' has no key named 'laptop'."
    key.refresh_from_db()
    assert not key.is_revoked


def test_revoking_a_revoked_key_fails_and_keeps_the_first_revocation(key: ApiKey) -> None:
    run("revoke_api_key", "alice", "ci")
    first = ApiKey.objects.get(pk=key.pk).revoked_at
    assert first is not None
    message = fails("revoke_api_key", "alice", "ci")
    assert (
        message == f"The key 'ci' ({key.prefix}…) of 'alice' was already revoked at {first.isoformat(' ', 'seconds')}."
    )
    assert ApiKey.objects.get(pk=key.pk).revoked_at == first


def test_a_key_revoked_by_the_command_is_refused_by_the_live_gateway(world, user_with_credits: User, make_key) -> None:
    secret = make_key(user_with_credits, name="laptop")
    client = world.client(secret)
    client.chat.completions.create(model="gpt-test", messages=HELLO)  # served while the key is valid

    run("revoke_api_key", "alice", "laptop")
    headers = {"Authorization": f"Bearer {secret}"}
    wait_for(lambda: httpx.get(f"{world.url}/ai/v1/models", headers=headers).status_code == 401, timeout=15)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-test", messages=HELLO)


# --- the admin ------------------------------------------------------------------------------


def test_the_key_admin_edits_the_new_limits(staff_client: Client, key: ApiKey) -> None:
    url = reverse("admin:accounts_apikey_change", args=[key.pk])
    data = form_data(staff_client.get(url))
    assert (data["tokens_per_minute"], data["spend_window"]) == ("600", "day")
    data |= {"tokens_per_minute": "900", "spend_limit": "3.5", "spend_window": "month"}
    response = staff_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert limits_of(key, KEY_LIMITS) == KEY_PRESET | {
        "tokens_per_minute": 900,
        "spend_limit": Decimal("3.5"),
        "spend_window": "month",
    }


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"spend_window": ""}, "spend_window", "A spend limit needs a window"),
        ({"spend_limit": ""}, "spend_limit", "A spend window needs a spend limit."),
        ({"spend_limit": "0"}, "spend_limit", "Must be a positive number of credits"),
        ({"tokens_per_minute": "0"}, "tokens_per_minute", "Must be a positive whole number"),
        ({"requests_per_second": ""}, "burst_size", "A burst needs a rate"),
    ],
)
def test_the_key_admin_shows_limit_errors_on_the_form_and_saves_nothing(
    staff_client: Client, key: ApiKey, changes: dict, field: str, message: str
) -> None:
    url = reverse("admin:accounts_apikey_change", args=[key.pk])
    response = staff_client.post(url, form_data(staff_client.get(url)) | changes)
    assert response.status_code == 200
    assert message in " ".join(response.context["adminform"].form.errors[field])
    assert limits_of(key, KEY_LIMITS) == KEY_PRESET


def test_a_key_made_in_the_admin_gets_its_spend_limit_or_the_form_error(
    staff_client: Client, user_with_credits: User
) -> None:
    url = reverse("admin:accounts_apikey_add")
    data = {"owner": user_with_credits.pk, "name": "budget", "purpose": "realtime", "spend_limit": "2"}
    response = staff_client.post(url, data)
    assert "A spend limit needs a window" in " ".join(response.context["adminform"].form.errors["spend_window"])
    assert not ApiKey.objects.filter(name="budget").exists()

    assert staff_client.post(url, data | {"spend_window": "week", "tokens_per_minute": "40"}).status_code == 302
    made = ApiKey.objects.get(name="budget")
    assert (made.spend_limit, made.spend_window, made.tokens_per_minute) == (Decimal(2), "week", 40)


def test_the_model_admin_edits_tokens_per_minute_and_max_output_tokens(
    staff_client: Client, model: DeployedModel
) -> None:
    url = reverse("admin:gateway_deployedmodel_change", args=[model.pk])
    data = form_data(staff_client.get(url))
    assert (data["tokens_per_minute"], data["max_output_tokens"]) == ("600", "256")
    response = staff_client.post(url, data | {"tokens_per_minute": "7000", "max_output_tokens": "2048"})
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert limits_of(model, MODEL_LIMITS) == MODEL_PRESET | {"tokens_per_minute": 7000, "max_output_tokens": 2048}


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"max_output_tokens": "0"}, "max_output_tokens", "Must be a positive whole number"),
        ({"tokens_per_minute": "0"}, "tokens_per_minute", "Must be a positive whole number"),
        ({"flex_concurrency": "0"}, "flex_concurrency", "Must be a positive whole number."),
        ({"requests_per_second": ""}, "burst_size", "A burst needs a rate"),
    ],
)
def test_the_model_admin_shows_limit_errors_on_the_form_and_saves_nothing(
    staff_client: Client, model: DeployedModel, changes: dict, field: str, message: str
) -> None:
    url = reverse("admin:gateway_deployedmodel_change", args=[model.pk])
    response = staff_client.post(url, form_data(staff_client.get(url)) | changes)
    assert response.status_code == 200
    assert message in " ".join(response.context["adminform"].form.errors[field])
    assert limits_of(model, MODEL_LIMITS) == MODEL_PRESET
