"""Endpoints (credential write-only), models with their tariffs and limits, traffic rules."""

# No `from __future__ import annotations`: django-ninja reads the views' annotations at run time.
from datetime import datetime

from django.db import transaction
from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest
from ninja import Router, Schema, Status
from ninja.pagination import LimitOffsetPagination, paginate
from pydantic import Field

from accounts.models import AccessGroup, Purpose
from billing.models import Tariff, Tier
from billing.services import set_tariff
from gateway import services as catalog
from gateway.models import DeployedModel, Endpoint, ModelKind, ResponsesApi
from management_api.auth import permits
from management_api.errors import ApiError
from management_api.schemas import Positive, Price, get_or_404
from routing_rules import services as rules
from routing_rules.models import RuleAction, TrafficRule

endpoints = Router(tags=["endpoints"])
models = Router(tags=["models and tariffs"])
traffic_rules = Router(tags=["traffic rules"])


# --- endpoints ------------------------------------------------------------------------------


class EndpointOut(Schema):
    id: int
    name: str
    base_url: str
    has_credential: bool = Field(description="Whether a credential is stored. The credential itself is never shown.")
    auth_header: str
    auth_prefix: str
    timeout_seconds: int
    connect_timeout_seconds: int
    responses_api: ResponsesApi
    created_at: datetime
    updated_at: datetime


class EndpointPatch(Schema):
    name: str | None = Field(None, min_length=1, max_length=100)
    base_url: str | None = Field(None, max_length=500, description="Up to and including /v1.")
    api_key: str | None = Field(
        None, description='The upstream credential, write-only: stored encrypted, never shown again. "" removes it.'
    )
    auth_header: str | None = Field(None, min_length=1, max_length=100)
    auth_prefix: str | None = Field(None, max_length=50)
    timeout_seconds: Positive | None = None
    connect_timeout_seconds: Positive | None = None
    responses_api: ResponsesApi | None = None


class EndpointIn(EndpointPatch):
    name: str = Field(min_length=1, max_length=100)  # type: ignore[assignment]
    base_url: str = Field(  # type: ignore[assignment]
        max_length=500, description="Up to and including /v1, e.g. https://api.openai.com/v1"
    )


def endpoint_fields(payload: EndpointPatch) -> dict[str, object]:
    """The fields a call gives, the credential aside (null: left as it is)."""
    return {name: value for name, value in payload.dict(exclude={"api_key"}).items() if value is not None}


@endpoints.get("/endpoints", response=list[EndpointOut], summary="List upstream endpoints")
@paginate(LimitOffsetPagination)
@permits("gateway.view_endpoint")
def list_endpoints(request: HttpRequest) -> QuerySet[Endpoint]:
    return Endpoint.objects.order_by("name")


@endpoints.post("/endpoints", response={201: EndpointOut}, summary="Add an upstream endpoint")
@permits("gateway.add_endpoint")
def create_endpoint(request: HttpRequest, payload: EndpointIn) -> Status[Endpoint]:
    if Endpoint.objects.filter(name=payload.name).exists():
        raise ApiError(409, f"An endpoint named '{payload.name}' already exists.", param="name", code="conflict")
    return Status(201, catalog.update_endpoint(Endpoint(), api_key=payload.api_key, **endpoint_fields(payload)))


@endpoints.get("/endpoints/{endpoint_id}", response=EndpointOut, summary="Get an endpoint")
@permits("gateway.view_endpoint")
def get_endpoint(request: HttpRequest, endpoint_id: int) -> Endpoint:
    return get_or_404(Endpoint.objects.all(), endpoint_id, "endpoint")


@endpoints.patch("/endpoints/{endpoint_id}", response=EndpointOut, summary="Change an endpoint")
@permits("gateway.change_endpoint")
def update_endpoint(request: HttpRequest, endpoint_id: int, payload: EndpointPatch) -> Endpoint:
    endpoint = get_or_404(Endpoint.objects.all(), endpoint_id, "endpoint")
    return catalog.update_endpoint(endpoint, api_key=payload.api_key, **endpoint_fields(payload))


@endpoints.delete("/endpoints/{endpoint_id}", response={204: None}, summary="Delete an endpoint that serves no model")
@permits("gateway.delete_endpoint")
def delete_endpoint(request: HttpRequest, endpoint_id: int) -> Status[None]:
    catalog.delete_endpoint(get_or_404(Endpoint.objects.all(), endpoint_id, "endpoint"))
    return Status(204, None)


# --- models and tariffs ---------------------------------------------------------------------


class TariffOut(Schema):
    id: int
    tier: Tier
    input_price: Price = Field(description="Credits per 1M input tokens.")
    output_price: Price = Field(description="Credits per 1M output tokens.")
    valid_from: datetime
    valid_until: datetime | None = Field(description="None: in force now.")


class TariffIn(Schema):
    tier: Tier = Tier.REALTIME
    input_price: Price
    output_price: Price


class ModelLimits(Schema):
    requests_per_second: Positive | None = None
    burst_size: Positive | None = None
    tokens_per_minute: Positive | None = None
    capacity: Positive | None = Field(None, description="Concurrent real-time calls.")
    flex_concurrency: Positive | None = Field(None, description="Concurrent flex calls (never unlimited).")
    max_output_tokens: Positive | None = None


class ModelOut(Schema):
    id: int
    alias: str
    upstream_model: str
    endpoint_id: int
    endpoint: str = Field(description="The endpoint's name.")
    kind: ModelKind
    requests_per_second: int | None
    burst_size: int | None
    tokens_per_minute: int | None
    capacity: int | None
    flex_concurrency: int
    max_output_tokens: int | None
    groups: list[str] = Field(description="Access groups whose members may call it (Everyone: public).")
    tariffs: list[TariffOut] = Field(description="The prices in force now, one per tier that has one.")
    created_at: datetime
    retired_at: datetime | None = Field(description="Set once retired: clients can no longer call it.")

    @staticmethod
    def resolve_endpoint(model: DeployedModel) -> str:
        return model.endpoint.name

    @staticmethod
    def resolve_groups(model: DeployedModel) -> list[str]:
        return [group.name for group in model.access_groups.all()]

    @staticmethod
    def resolve_tariffs(model: DeployedModel) -> list[Tariff]:
        return list(model.current_tariffs)  # type: ignore[attr-defined]

    @staticmethod
    def resolve_retired_at(model: DeployedModel) -> datetime | None:
        return model.deleted_at


class ModelIn(Schema):
    alias: str = Field(min_length=1, max_length=200)
    endpoint_id: int
    upstream_model: str | None = Field(None, max_length=200, description="Default: the alias.")
    kind: ModelKind = ModelKind.CHAT
    input_price: Price | None = None
    output_price: Price | None = None
    flex_input_price: Price | None = Field(None, description="Default: the real-time price.")
    flex_output_price: Price | None = None
    public: bool = Field(False, description="Attach it to Everyone.")
    groups: list[str] = Field(default_factory=list, description="Access groups by name, created if new.")


class ModelPatch(ModelLimits):
    upstream_model: str | None = Field(None, min_length=1, max_length=200)
    endpoint_id: int | None = None
    kind: ModelKind | None = None


def model_rows() -> QuerySet[DeployedModel]:
    return (
        DeployedModel.objects.select_related("endpoint")
        .prefetch_related(
            Prefetch("tariffs", queryset=Tariff.objects.current().order_by("tier"), to_attr="current_tariffs"),
            Prefetch("access_groups", queryset=AccessGroup.objects.order_by("name")),
        )
        .order_by("alias")
    )


def find_model(model_id: int) -> DeployedModel:
    return get_or_404(model_rows(), model_id, "model")


@models.get("/models", response=list[ModelOut], summary="List models")
@paginate(LimitOffsetPagination)
@permits("gateway.view_deployedmodel")
def list_models(request: HttpRequest, retired: bool | None = None) -> QuerySet[DeployedModel]:
    rows = model_rows()
    return rows if retired is None else rows.filter(deleted_at__isnull=not retired)


@models.post("/models", response={201: ModelOut}, summary="Deploy a model, with its prices and access")
@permits("gateway.add_deployedmodel")
def create_model(request: HttpRequest, payload: ModelIn) -> Status[DeployedModel]:
    endpoint = get_or_404(Endpoint.objects.all(), payload.endpoint_id, "endpoint")
    model = catalog.add_model(
        payload.alias,
        endpoint=endpoint,
        **payload.dict(exclude={"alias", "endpoint_id"}),
    )
    return Status(201, find_model(model.pk))


@models.get("/models/{model_id}", response=ModelOut, summary="Get a model")
@permits("gateway.view_deployedmodel")
def get_model(request: HttpRequest, model_id: int) -> DeployedModel:
    return find_model(model_id)


@models.patch("/models/{model_id}", response=ModelOut, summary="Change a model: what serves it, its limits")
@transaction.atomic
@permits("gateway.change_deployedmodel")
def update_model(request: HttpRequest, model_id: int, payload: ModelPatch) -> DeployedModel:
    """Limits: null removes one (flex concurrency goes back to its default). Prices: POST a tariff."""
    model = find_model(model_id)
    given = payload.dict(exclude_unset=True)
    # What serves the model (null: left as it is); the rest are limits.
    fields = {name: value for name in ("upstream_model", "kind") if (value := given.pop(name, None)) is not None}
    if (endpoint_id := given.pop("endpoint_id", None)) is not None:
        fields["endpoint"] = get_or_404(Endpoint.objects.all(), endpoint_id, "endpoint")
    if fields:
        catalog.update_model(model, **fields)
    if given:
        if given.get("flex_concurrency", 0) is None:
            given["flex_concurrency"] = DeployedModel._meta.get_field("flex_concurrency").get_default()
        catalog.set_model_limits(model, **given)
    return find_model(model_id)


@models.delete("/models/{model_id}", response=ModelOut, summary="Retire a model (soft delete)")
@permits("gateway.change_deployedmodel")
def retire_model(request: HttpRequest, model_id: int) -> DeployedModel:
    """Clients can no longer call it; its price history and past calls keep it. Restore brings it back."""
    catalog.retire_model(find_model(model_id))
    return find_model(model_id)


@models.post("/models/{model_id}/restore", response=ModelOut, summary="Bring a retired model back")
@permits("gateway.change_deployedmodel")
def restore_model(request: HttpRequest, model_id: int) -> DeployedModel:
    catalog.restore_model(find_model(model_id))
    return find_model(model_id)


@models.get("/models/{model_id}/tariffs", response=list[TariffOut], summary="A model's price history")
@paginate(LimitOffsetPagination)
@permits("billing.view_tariff")
def list_tariffs(request: HttpRequest, model_id: int, tier: Tier | None = None) -> QuerySet[Tariff]:
    rows = find_model(model_id).tariffs.order_by("tier", "-valid_from")
    return rows if tier is None else rows.filter(tier=tier)


@models.post("/models/{model_id}/tariffs", response={201: TariffOut}, summary="Set a model's price at a tier")
@permits("gateway.change_deployedmodel")
def create_tariff(request: HttpRequest, model_id: int, payload: TariffIn) -> Status[Tariff]:
    """Opens a new tariff version and closes the one in force: past calls keep the price they had."""
    model = find_model(model_id)
    return Status(
        201, set_tariff(model, tier=payload.tier, input_price=payload.input_price, output_price=payload.output_price)
    )


# --- traffic rules --------------------------------------------------------------------------


class RuleOut(Schema):
    id: int
    model_id: int
    model: str = Field(description="The alias of the model it applies to.")
    purpose: Purpose
    action: RuleAction
    target_id: int | None
    target: str | None = Field(description="The alias served instead (redirect only).")
    created_at: datetime

    @staticmethod
    def resolve_model(rule: TrafficRule) -> str:
        return rule.model.alias

    @staticmethod
    def resolve_target(rule: TrafficRule) -> str | None:
        return rule.target.alias if rule.target is not None else None


class RulePatch(Schema):
    action: RuleAction
    target_id: int | None = Field(None, description="The model to serve instead: redirect only.")


class RuleIn(RulePatch):
    model_id: int
    purpose: Purpose


def find_rule(rule_id: int) -> TrafficRule:
    return get_or_404(TrafficRule.objects.select_related("model", "target"), rule_id, "traffic rule")


def rule_target(target_id: int | None) -> DeployedModel | None:
    return None if target_id is None else get_or_404(DeployedModel.objects.all(), target_id, "target model")


@traffic_rules.get("/rules", response=list[RuleOut], summary="List traffic rules")
@paginate(LimitOffsetPagination)
@permits("routing_rules.view_trafficrule")
def list_rules(request: HttpRequest, model_id: int | None = None) -> QuerySet[TrafficRule]:
    rows = TrafficRule.objects.select_related("model", "target").order_by("model__alias", "purpose")
    return rows if model_id is None else rows.filter(model_id=model_id)


@traffic_rules.post("/rules", response={201: RuleOut}, summary="Deny or redirect a model for keys of one purpose")
@permits("routing_rules.add_trafficrule")
def create_rule(request: HttpRequest, payload: RuleIn) -> Status[TrafficRule]:
    model = get_or_404(DeployedModel.objects.all(), payload.model_id, "model")
    rule = rules.add_traffic_rule(
        model, purpose=payload.purpose, action=payload.action, target=rule_target(payload.target_id)
    )
    return Status(201, find_rule(rule.pk))


@traffic_rules.get("/rules/{rule_id}", response=RuleOut, summary="Get a traffic rule")
@permits("routing_rules.view_trafficrule")
def get_rule(request: HttpRequest, rule_id: int) -> TrafficRule:
    return find_rule(rule_id)


@traffic_rules.patch("/rules/{rule_id}", response=RuleOut, summary="Change what a traffic rule does")
@permits("routing_rules.change_trafficrule")
def update_rule(request: HttpRequest, rule_id: int, payload: RulePatch) -> TrafficRule:
    rules.update_traffic_rule(find_rule(rule_id), action=payload.action, target=rule_target(payload.target_id))
    return find_rule(rule_id)


@traffic_rules.delete("/rules/{rule_id}", response={204: None}, summary="Remove a traffic rule")
@permits("routing_rules.delete_trafficrule")
def delete_rule(request: HttpRequest, rule_id: int) -> Status[None]:
    rules.delete_traffic_rule(find_rule(rule_id))
    return Status(204, None)
