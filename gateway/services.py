"""Catalog writes: the upstream endpoints (and their encrypted credentials), the models deployed on
them, and the models' limits."""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, TypedDict, Unpack

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.utils import timezone

from accounts.models import AccessGroup, ApiKey, User
from accounts.services import create_api_key, ensure_groups, revoke_api_key
from billing.models import Tier
from billing.services import create_user, set_tariff
from common.limits import save_validated
from gateway.demo import demo_credential
from gateway.models import (
    MODEL_LIMITS,
    DeployedModel,
    Endpoint,
    ModelKind,
    ResponsesApi,
    Tool,
    decrypt_credentials,
)

# What `update_endpoint` may change besides the credential.
ENDPOINT_FIELDS = (
    "name",
    "base_url",
    "auth_header",
    "auth_prefix",
    "timeout_seconds",
    "connect_timeout_seconds",
    "responses_api",
)


@transaction.atomic
def add_endpoint(
    name: str,
    base_url: str,
    *,
    api_key: str | None = None,
    timeout_seconds: int | None = None,
    responses_api: str | None = None,
) -> tuple[Endpoint, bool]:
    """Create an endpoint, or update the one with this name. Returns it and whether it was created."""
    if not name.strip():
        raise ValidationError("The endpoint name cannot be empty.")
    endpoint = Endpoint.objects.filter(name=name).first()
    created = endpoint is None
    fields: dict[str, object] = {"base_url": base_url}
    if timeout_seconds is not None:
        fields["timeout_seconds"] = timeout_seconds
    if responses_api is not None:
        fields["responses_api"] = responses_api
    endpoint = update_endpoint(endpoint or Endpoint(name=name), api_key=api_key, **fields)
    return endpoint, created


def check_endpoint_fields(fields: dict[str, object]) -> dict[str, object]:
    """The endpoint fields given, checked and normalized (a base URL loses its trailing slash); a
    ValidationError names every field that breaks a rule. The admin form checks with it too."""
    unknown = set(fields) - set(ENDPOINT_FIELDS)
    if unknown:
        raise TypeError(f"Not an endpoint field: {', '.join(sorted(unknown))}.")
    checked, errors = dict(fields), {}
    if "base_url" in fields:
        base_url = str(fields["base_url"])
        try:
            URLValidator(schemes=["http", "https"])(base_url)
        except ValidationError:
            errors["base_url"] = f"'{base_url}' is not a valid base URL: use http(s)://host[:port]/v1."
        checked["base_url"] = base_url.rstrip("/")
    for field, label in (("timeout_seconds", "timeout"), ("connect_timeout_seconds", "connect timeout")):
        value = fields.get(field)
        if value is not None and int(value) <= 0:  # type: ignore[call-overload]
            errors[field] = f"The {label} must be a positive number of seconds, not {value}."
    responses_api = fields.get("responses_api")
    if responses_api is not None and responses_api not in ResponsesApi.values:
        errors["responses_api"] = (
            f"Unknown Responses API '{responses_api}': use one of {', '.join(ResponsesApi.values)}."
        )
    if errors:
        raise ValidationError(errors)
    return checked


@transaction.atomic
def update_endpoint(endpoint: Endpoint, *, api_key: str | None = None, **fields: object) -> Endpoint:
    """Change an endpoint (or save a new one): `api_key` replaces the credential ("" removes it; None keeps it).

    Raises ValidationError, naming the field, and writes nothing if a value breaks a rule.
    """
    for name, value in check_endpoint_fields(fields).items():
        setattr(endpoint, name, value)
    if api_key is not None:
        endpoint.set_credential(api_key)
    endpoint.full_clean(exclude=["api_key_encrypted"])
    endpoint.save()
    return endpoint


def delete_endpoint(endpoint: Endpoint) -> None:
    """Delete an endpoint that serves no model (retired ones included: they keep their history)."""
    aliases = list(endpoint.models.values_list("alias", flat=True))
    if aliases:
        raise ValidationError(
            f"Endpoint '{endpoint.name}' serves {', '.join(repr(a) for a in aliases)}: move or delete them first."
        )
    endpoint.delete()


@transaction.atomic
def rotate_credentials() -> int:
    """Re-encrypt every stored upstream credential with the first key; returns how many.

    All or nothing: if a credential cannot be decrypted, none is rewritten, and the
    `UnreadableCredentials` raised names every such endpoint.
    """
    # Locked, so an edit made meanwhile is not overwritten with the credential read here.
    endpoints = list(Endpoint.objects.select_for_update().exclude(api_key_encrypted=""))
    credentials = decrypt_credentials(endpoints)
    tools = list(Tool.objects.select_for_update().exclude(api_key_encrypted=""))
    tool_credentials = {tool.pk: tool.decrypt_credential() for tool in tools}
    for endpoint in endpoints:
        endpoint.set_credential(credentials[endpoint.pk])
    for tool in tools:
        tool.set_credential(tool_credentials[tool.pk])
    # No post_save: the clear credentials, all the auth snapshot holds, have not changed.
    Endpoint.objects.bulk_update(endpoints, ["api_key_encrypted"])
    Tool.objects.bulk_update(tools, ["api_key_encrypted"])
    return len(endpoints) + len(tools)


@transaction.atomic
def add_model(
    alias: str,
    *,
    endpoint: Endpoint,
    upstream_model: str | None = None,
    kind: str = ModelKind.CHAT,
    input_price: Decimal | str | None = None,
    output_price: Decimal | str | None = None,
    flex_input_price: Decimal | str | None = None,
    flex_output_price: Decimal | str | None = None,
    batch_input_price: Decimal | str | None = None,
    batch_output_price: Decimal | str | None = None,
    batch_windows: Iterable[str] | None = None,
    public: bool = False,
    groups: Iterable[str] = (),
) -> DeployedModel:
    """Deploy a model with its prices (credits per 1M tokens) and group access, all or nothing.

    A batch price applies to each of `batch_windows` (default: every completion window).
    """
    if not alias.strip():
        raise ValidationError("The model alias cannot be empty.")
    if kind not in ModelKind.values:
        raise ValidationError(f"Unknown kind '{kind}': use one of {', '.join(ModelKind.values)}.")
    if DeployedModel.objects.filter(alias=alias).exists():
        raise ValidationError(f"A model with alias '{alias}' already exists.")
    model = DeployedModel.objects.create(
        alias=alias, upstream_model=upstream_model or alias, endpoint=endpoint, kind=kind
    )
    windows = list(settings.GATEWAY_BATCH_WINDOWS if batch_windows is None else batch_windows)
    for tier, window, prices in (
        (Tier.REALTIME, "", (input_price, output_price)),
        (Tier.FLEX, "", (flex_input_price, flex_output_price)),
        *((Tier.BATCH, window, (batch_input_price, batch_output_price)) for window in windows),
    ):
        if any(price is not None for price in prices):
            try:
                set_tariff(model, tier=tier, window=window, input_price=prices[0] or 0, output_price=prices[1] or 0)
            except ValueError as exc:
                raise ValidationError(str(exc)) from None
    attach = list(ensure_groups(groups))
    if public:
        attach.append(AccessGroup.objects.everyone())
    for group in attach:
        group.models.add(model)
    return model


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI accepts as a function's name


def tool_parameters_error(parameters: Any) -> str | None:
    """Why a tool's parameters are not a JSON schema of an object, if they are not."""
    if not isinstance(parameters, dict):
        return 'The parameters must be a JSON schema object, e.g. {"type": "object", "properties": {}}.'
    if parameters.get("type") != "object":
        return 'The parameters must be the JSON schema of an object: its "type" must be "object".'
    if not isinstance(parameters.get("properties", {}), dict):
        return 'The parameters\' "properties" must be an object.'
    return None


@transaction.atomic
def add_tool(
    name: str,
    url: str,
    *,
    description: str,
    parameters: dict[str, Any],
    api_key: str | None = None,
    timeout_seconds: int | None = None,
    models: Iterable[str] = (),
    groups: Iterable[str] = (),
) -> tuple[Tool, bool]:
    """Register a server tool, or update the one with this name; attach it to models and groups.
    All or nothing: an unknown model alias or a bad field writes nothing."""
    if not TOOL_NAME.match(name):
        raise ValidationError(f"'{name}' is not a valid tool name: use 1 to 64 letters, digits, '_' or '-'.")
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        raise ValidationError(f"'{url}' is not a valid tool URL: use http(s)://host[:port]/path.") from None
    problem = tool_parameters_error(parameters)
    if problem:
        raise ValidationError(problem)
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise ValidationError(f"The timeout must be a positive number of seconds, not {timeout_seconds}.")
    aliases = list(models)
    found = {model.alias: model for model in DeployedModel.objects.live().filter(alias__in=aliases)}
    missing = [alias for alias in aliases if alias not in found]
    if missing:
        raise ValidationError(f"No model with alias {', '.join(repr(alias) for alias in missing)}.")
    tool, created = Tool.objects.get_or_create(name=name, defaults={"url": url})
    tool.url, tool.description, tool.parameters = url, description, parameters
    if api_key is not None:
        tool.set_credential(api_key)
    if timeout_seconds is not None:
        tool.timeout_seconds = timeout_seconds
    tool.save()
    tool.models.add(*found.values())
    tool.groups.add(*ensure_groups(groups))
    return tool, created


class ModelLimits(TypedDict, total=False):
    requests_per_second: int | None
    burst_size: int | None
    tokens_per_minute: int | None
    capacity: int | None
    flex_concurrency: int
    max_output_tokens: int | None


def set_model_limits(model: DeployedModel, *, clear: bool = False, **limits: Unpack[ModelLimits]) -> DeployedModel:
    """Change the given limits of a model (with `clear`, after resetting all of them), validated as in the admin.

    `clear` removes every limit but flex concurrency, which goes back to its default (it has no
    "unlimited"). Raises ValidationError and writes nothing if the result breaks a rule.
    """
    save_validated(model, MODEL_LIMITS, dict(limits), reset=clear)
    return model


# What `update_model` may change; limits go through `set_model_limits`, prices through `set_tariff`.
MODEL_FIELDS = ("upstream_model", "endpoint", "kind")


@transaction.atomic
def update_model(model: DeployedModel, **fields: object) -> DeployedModel:
    """Change what serves a model (its upstream name, endpoint, kind), validated; writes nothing on an error."""
    unknown = set(fields) - set(MODEL_FIELDS)
    if unknown:
        raise TypeError(f"Not a model field: {', '.join(sorted(unknown))}.")
    if "kind" in fields and fields["kind"] not in ModelKind.values:
        raise ValidationError({"kind": f"Unknown kind '{fields['kind']}': use one of {', '.join(ModelKind.values)}."})
    if "upstream_model" in fields and not str(fields["upstream_model"]).strip():
        raise ValidationError({"upstream_model": "The upstream model name cannot be empty."})
    for name, value in fields.items():
        setattr(model, name, value)
    model.full_clean()
    model.save(update_fields=list(fields))
    return model


def retire_model(model: DeployedModel) -> bool:
    """Retire a model (soft delete): clients can no longer call it; its prices and past calls stay.
    Returns whether it was live."""
    if model.deleted_at is not None:
        return False
    model.deleted_at = timezone.now()
    model.save(update_fields=["deleted_at"])  # a save, not update(): the snapshot listens to post_save
    return True


def restore_model(model: DeployedModel) -> bool:
    """Bring a retired model back. Returns whether it was retired."""
    if model.deleted_at is None:
        return False
    model.deleted_at = None
    model.save(update_fields=["deleted_at"])
    return True


def set_model_groups(model: DeployedModel, groups: Iterable[AccessGroup]) -> None:
    """Make `groups` the ones whose members may call the model (Everyone among them: public)."""
    model.access_groups.set(list(groups))  # .set() sends m2m_changed, which the auth snapshot listens to


DEMO_ALIAS = "demo-echo"
DEMO_USER = DEMO_GROUP = DEMO_KEY = "demo"
DEMO_CREDITS = Decimal(10)
# Credits per 1M tokens: dear enough that a call of a few words shows a cost in the request log.
DEMO_PRICES = (Decimal(100), Decimal(200))  # input, output (flex: half)


@transaction.atomic
def set_up_demo(gateway_url: str) -> tuple[User, str]:
    """Point the demo endpoint at this gateway's own echo upstream, deploy its model for the demo
    group, and give the demo user (created with credits the first time) a new key, revoking the
    earlier ones. Returns the user and the key's secret. Running it again duplicates nothing."""
    endpoint, _ = add_endpoint("demo", f"{gateway_url.rstrip('/')}/demo/v1", api_key=demo_credential())
    model = DeployedModel.objects.filter(alias=DEMO_ALIAS).first()
    if model is None:
        input_price, output_price = DEMO_PRICES
        model = add_model(
            DEMO_ALIAS,
            endpoint=endpoint,
            upstream_model="echo",
            input_price=input_price,
            output_price=output_price,
            flex_input_price=input_price / 2,
            flex_output_price=output_price / 2,
        )
    user = User.objects.filter(username=DEMO_USER).first() or create_user(DEMO_USER, credits=DEMO_CREDITS)
    group = ensure_groups([DEMO_GROUP])[0]
    group.models.add(model)
    group.members.add(user)
    for earlier in ApiKey.objects.active().filter(owner=user, name=DEMO_KEY):
        revoke_api_key(earlier)
    return user, create_api_key(user, name=DEMO_KEY)[1]
