"""Management commands: thin wrappers over services, clear errors, nothing half-written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import authenticate
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import ApiKey, User
from billing.models import Balance, CreditTransaction, Tariff
from gateway.models import DeployedModel, Endpoint
from gateway.services import add_endpoint, add_model
from routing_rules.models import TrafficRule
from tests.conftest import live_process_env

MANAGE = Path(settings.BASE_DIR) / "manage.py"


def run(*args: str, **options: object) -> list[str]:
    """Run a command in-process and return its stdout lines."""
    out = StringIO()
    call_command(*args, stdout=out, **options)
    return out.getvalue().splitlines()


def fails(*args: str) -> str:
    with pytest.raises(CommandError) as excinfo:
        run(*args)
    return str(excinfo.value)


@pytest.fixture
def endpoint(db) -> Endpoint:
    return add_endpoint("local", "http://127.0.0.1:9/v1")[0]


@pytest.fixture
def model(endpoint: Endpoint) -> DeployedModel:
    return add_model("gpt-test", endpoint=endpoint, input_price="1", output_price="2")


# --- add_endpoint ---------------------------------------------------------------------------


def test_add_endpoint_creates_then_updates_by_name(db) -> None:
    lines = run("add_endpoint", "local", "http://127.0.0.1:9/v1/", "--api-key", "upstream-secret", "--timeout", "30")
    assert lines == ["Created endpoint 'local' → http://127.0.0.1:9/v1"]
    lines = run("add_endpoint", "local", "https://example.com/v1", "--timeout", "60")
    assert lines[-1].startswith("Updated endpoint 'local'")
    endpoint = Endpoint.objects.get()
    assert (endpoint.base_url, endpoint.timeout_seconds, endpoint.decrypt_credential()) == (
        "https://example.com/v1",
        60,
        "upstream-secret",
    )


def test_add_endpoint_sets_how_responses_are_served_and_keeps_it_when_not_given(db) -> None:
    lines = run("add_endpoint", "local", "http://127.0.0.1:9/v1")
    assert Endpoint.objects.get().responses_api == "native"  # the default
    lines = run("add_endpoint", "local", "http://127.0.0.1:9/v1", "--responses", "translate")
    assert lines[-1].endswith("(/responses translated to /chat/completions)")
    run("add_endpoint", "local", "http://127.0.0.1:9/v1", "--timeout", "60")
    assert Endpoint.objects.get().responses_api == "translate"


def test_add_endpoint_never_prints_the_upstream_credential(db) -> None:
    lines = run("add_endpoint", "local", "http://127.0.0.1:9/v1", "--api-key", "upstream-secret")
    assert "upstream-secret" not in "\n".join(lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("not a url",), "'not a url' is not a valid base URL"),
        (("ftp://example.com/v1",), "is not a valid base URL"),
        (("http://127.0.0.1:9/v1", "--timeout", "0"), "The timeout must be a positive number of seconds"),
        (("http://127.0.0.1:9/v1", "--timeout", "soon"), "invalid int value: 'soon'"),
        (("http://127.0.0.1:9/v1", "--responses", "both"), "invalid choice: 'both'"),
    ],
)
def test_add_endpoint_refuses_bad_input_and_writes_nothing(db, args: tuple[str, ...], message: str) -> None:
    assert message in fails("add_endpoint", "local", *args)
    assert not Endpoint.objects.exists()


# --- add_model ------------------------------------------------------------------------------


def test_add_model_deploys_a_model_with_prices_and_groups(endpoint: Endpoint) -> None:
    lines = run(
        "add_model", "gpt-test", "--endpoint", "local", "--upstream-model", "gpt-4o-mini",
        "--input-price", "0.15", "--output-price", "0.6", "--flex-input-price", "0.075", "--flex-output-price", "0.3",
        "--group", "research", "--group", "staff", "--public",
    )  # fmt: skip
    assert lines == ["Created model 'gpt-test' (chat) → gpt-4o-mini on 'local'"]
    model = DeployedModel.objects.get(alias="gpt-test")
    prices = {t.tier: (t.input_price, t.output_price) for t in Tariff.objects.current().filter(model=model)}
    assert prices == {"realtime": (Decimal("0.15"), Decimal("0.6")), "flex": (Decimal("0.075"), Decimal("0.3"))}
    assert set(model.access_groups.values_list("name", flat=True)) == {"Everyone", "research", "staff"}


def test_add_model_without_prices_deploys_a_free_private_embeddings_model(endpoint: Endpoint) -> None:
    run("add_model", "embed", "--endpoint", "local", "--kind", "embeddings")
    model = DeployedModel.objects.get(alias="embed")
    assert (model.kind, model.upstream_model) == ("embeddings", "embed")
    assert not model.tariffs.exists()
    assert not model.access_groups.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--endpoint", "nowhere"), "Endpoint 'nowhere' does not exist (known endpoints: local)."),
        (("--endpoint", "local", "--kind", "images"), "Unknown kind 'images'"),
        (("--endpoint", "local", "--input-price", "-1"), "The input price must be zero or more, not '-1'."),
        (("--endpoint", "local", "--output-price", "cheap"), "The output price 'cheap' is not a number."),
        (("--endpoint", "local", "--input-price", "1", "--flex-input-price", "NaN"), "must be zero or more"),
        (("--endpoint", "local", "--input-price", "1", "--group", " "), "A group name cannot be empty."),
    ],
)
def test_add_model_refuses_bad_input_and_writes_nothing(
    endpoint: Endpoint, args: tuple[str, ...], message: str
) -> None:
    assert message in fails("add_model", "gpt-new", *args)
    assert not DeployedModel.objects.filter(alias="gpt-new").exists()
    assert not Tariff.objects.exists()


def test_add_model_refuses_a_duplicate_alias(model: DeployedModel) -> None:
    assert "A model with alias 'gpt-test' already exists." in fails("add_model", "gpt-test", "--endpoint", "local")
    assert DeployedModel.objects.count() == 1


# --- users, keys, credits -------------------------------------------------------------------


def test_create_user_creates_a_user_with_credits_groups_and_flags(db) -> None:
    lines = run(
        "create_user", "carol", "--credits", "50", "--group", "research", "--staff",
        "--email", "carol@example.com", "--password", "a-long-password-42",
    )  # fmt: skip
    assert lines == ["Created user 'carol' (50 credits; groups: research)"]
    carol = User.objects.get(username="carol")
    assert (carol.email, carol.is_staff, carol.is_superuser) == ("carol@example.com", True, False)
    assert authenticate(username="carol", password="a-long-password-42") == carol
    assert Balance.objects.get(user=carol).amount == 50
    assert list(carol.access_groups.values_list("name", flat=True)) == ["research"]


def test_create_user_with_superuser_is_staff_too_and_without_password_cannot_log_in(db) -> None:
    run("create_user", "root", "--superuser")
    root = User.objects.get(username="root")
    assert root.is_superuser and root.is_staff
    assert not root.has_usable_password()


@pytest.mark.parametrize("credits", ["0", "-5", "plenty", "0.0000000001"])
def test_create_user_with_bad_credits_creates_nobody(db, credits: str) -> None:
    fails("create_user", "carol", "--credits", credits)
    assert not User.objects.filter(username="carol").exists()
    assert not CreditTransaction.objects.exists()


def test_create_user_refuses_an_existing_username(user_with_credits: User) -> None:
    assert fails("create_user", "alice") == "User 'alice' already exists."


def test_create_api_key_prints_the_secret_as_the_last_line(user_with_credits: User) -> None:
    lines = run("create_api_key", "alice", "--purpose", "batch", "--name", "nightly")
    secret = lines[-1]
    assert secret.startswith("sk-") and len(secret) == 46
    api_key = ApiKey.objects.get(name="nightly")
    assert (api_key.owner, api_key.purpose) == (user_with_credits, "batch")
    assert api_key.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in "\n".join(lines[:-1])


def test_create_api_key_refuses_unknown_users_and_purposes(user_with_credits: User) -> None:
    assert fails("create_api_key", "nobody") == "User 'nobody' does not exist."
    assert "Unknown purpose 'admin'" in fails("create_api_key", "alice", "--purpose", "admin")
    assert not ApiKey.objects.exists()


def test_grant_and_remove_credits_move_the_balance_and_print_it_last(user_with_credits: User) -> None:
    lines = run("grant_credits", "alice", "0.000035", "--description", "goodwill")
    assert lines[-1] == "100.000035"
    assert CreditTransaction.objects.filter(description="goodwill", kind="admin_grant").count() == 1
    assert run("remove_credits", "alice", "0.00007")[-1] == "99.999965"
    assert run("remove_credits", "alice", "200")[-1] == "-100.000035"
    balance = Balance.objects.get(user=user_with_credits).amount
    assert balance == CreditTransaction.objects.filter(user=user_with_credits).signed_total()


@pytest.mark.parametrize("command", ["grant_credits", "remove_credits"])
@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("-5", "The amount must be a positive number, not '-5'."),
        ("0", "The amount must be a positive number, not '0'."),
        ("ten", "'ten' is not a number."),
        ("1e20", "'1e20' is too large"),
        ("0.0000000001", "more than 9 decimal places"),
    ],
)
def test_credit_commands_refuse_bad_amounts_and_write_nothing(
    user_with_credits: User, command: str, amount: str, message: str
) -> None:
    before = CreditTransaction.objects.count()
    assert message in fails(command, "alice", amount)
    assert CreditTransaction.objects.count() == before
    assert Balance.objects.get(user=user_with_credits).amount == 100


@pytest.mark.parametrize("command", ["grant_credits", "remove_credits", "balance"])
def test_credit_commands_name_an_unknown_user(db, command: str) -> None:
    args = ("nobody",) if command == "balance" else ("nobody", "5")
    assert fails(command, *args) == "User 'nobody' does not exist."


def test_balance_prints_a_plain_decimal(user_with_credits: User, user_without_credits: User) -> None:
    assert run("balance", "alice") == ["100"]
    assert run("balance", "bob") == ["0"]  # no ledger row yet
    run("remove_credits", "alice", "0.000035")
    assert run("balance", "alice")[-1] == "99.999965"


# --- add_rule -------------------------------------------------------------------------------


def test_add_rule_adds_deny_and_redirect_rules(model: DeployedModel, endpoint: Endpoint) -> None:
    add_model("gpt-small", endpoint=endpoint)
    assert run("add_rule", "gpt-test", "batch", "deny") == ["Added rule: gpt-test [batch] denied"]
    assert run("add_rule", "gpt-test", "playground", "redirect", "--target", "gpt-small")[-1].endswith("→ gpt-small")
    rules = {r.purpose: (r.action, r.target and r.target.alias) for r in TrafficRule.objects.all()}
    assert rules == {"batch": ("deny", None), "playground": ("redirect", "gpt-small")}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("gpt-test", "batch", "redirect", "--target", "gpt-test"), "A model cannot redirect to itself."),
        (("gpt-test", "batch", "redirect"), "A redirect rule needs a target model."),
        (("gpt-test", "batch", "deny", "--target", "gpt-test"), "A deny rule has no target"),
        (("gpt-test", "batch", "redirect", "--target", "nope"), "Model 'nope' does not exist."),
        (("nope", "batch", "deny"), "Model 'nope' does not exist."),
        (("gpt-test", "robots", "deny"), "Unknown purpose 'robots'"),
        (("gpt-test", "batch", "throttle"), "Unknown action 'throttle'"),
    ],
)
def test_add_rule_refuses_bad_rules_and_writes_nothing(
    model: DeployedModel, args: tuple[str, ...], message: str
) -> None:
    assert message in fails("add_rule", *args)
    assert not TrafficRule.objects.exists()


def test_add_rule_refuses_a_second_rule_for_the_same_model_and_purpose(model: DeployedModel) -> None:
    run("add_rule", "gpt-test", "batch", "deny")
    assert fails("add_rule", "gpt-test", "batch", "deny") == "'gpt-test' already has a rule for batch keys."
    assert TrafficRule.objects.count() == 1


def test_add_rule_refuses_a_redirect_to_a_retired_model(model: DeployedModel, endpoint: Endpoint) -> None:
    add_model("gpt-old", endpoint=endpoint)
    DeployedModel.objects.filter(alias="gpt-old").update(deleted_at=timezone.now())
    assert "'gpt-old' is deleted." in fails("add_rule", "gpt-test", "batch", "redirect", "--target", "gpt-old")


# --- ensure_admin ---------------------------------------------------------------------------


def test_ensure_admin_creates_a_superuser_once_with_a_generated_password(db, monkeypatch) -> None:
    monkeypatch.delenv("ADMIN_PASSWORD", raising=False)
    lines = run("ensure_admin")
    prefix = "Created admin user 'admin' with password: "
    assert lines[-1].startswith(prefix)
    password = lines[-1].removeprefix(prefix)
    assert len(password) >= 16
    admin = authenticate(username="admin", password=password)
    assert admin is not None and admin.is_superuser and admin.is_staff

    assert run("ensure_admin") == ["Superuser 'admin' already exists; nothing to do."]
    assert User.objects.filter(is_superuser=True).count() == 1


def test_ensure_admin_takes_the_password_from_the_environment(db, monkeypatch) -> None:
    monkeypatch.setenv("ADMIN_PASSWORD", "from-the-environment-9")
    lines = run("ensure_admin", "--username", "root")
    assert "from-the-environment-9" not in "\n".join(lines)
    assert authenticate(username="root", password="from-the-environment-9") is not None


def test_ensure_admin_does_nothing_when_a_superuser_exists(admin_user: User) -> None:
    assert run("ensure_admin", "--username", "someone") == ["Superuser 'admin' already exists; nothing to do."]
    assert not User.objects.filter(username="someone").exists()


# --- as a real process ----------------------------------------------------------------------


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    env = live_process_env()
    return subprocess.run(
        [sys.executable, str(MANAGE), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.mark.django_db(transaction=True)
def test_a_command_run_as_a_process_exits_non_zero_with_the_error_on_stderr() -> None:
    result = manage("create_api_key", "nobody")
    assert result.returncode != 0
    assert "User 'nobody' does not exist." in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.django_db(transaction=True)
def test_a_key_created_by_a_process_is_usable_and_its_secret_is_the_last_line() -> None:
    User.objects.create(username="dave")
    result = manage("create_api_key", "dave", "--purpose", "playground")
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip().splitlines()[-1]
    api_key = ApiKey.objects.get(secret_hash=hashlib.sha256(secret.encode()).hexdigest())
    assert (api_key.owner.username, api_key.purpose) == ("dave", "playground")
