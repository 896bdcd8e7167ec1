"""Users, access groups and their memberships, API keys: every write through accounts/billing services."""

# No `from __future__ import annotations`: django-ninja reads the views' annotations at run time.
from datetime import datetime
from decimal import Decimal

from django.db.models import Count, F, Prefetch, Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from ninja import Router, Schema, Status
from ninja.pagination import LimitOffsetPagination, paginate
from pydantic import Field

from accounts import services as accounts
from accounts.models import AccessGroup, ApiKey, Purpose, SpendWindow, User
from billing import services as billing
from gateway.models import DeployedModel
from management_api.auth import permits
from management_api.schemas import Amount, Credits, Positive, get_or_404

users = Router(tags=["users"])
groups = Router(tags=["access groups"])
keys = Router(tags=["API keys"])


# --- users ----------------------------------------------------------------------------------


class UserOut(Schema):
    id: int
    username: str
    email: str
    first_name: str
    last_name: str
    is_active: bool
    is_staff: bool
    is_superuser: bool
    date_joined: datetime
    last_login: datetime | None
    balance: Credits = Field(description="Credits, exact; may be negative.")
    groups: list[str] = Field(description="Access groups by name; every user is also in Everyone.")

    @staticmethod
    def resolve_balance(user: User) -> Decimal:
        return getattr(user, "balance_amount", None) or Decimal(0)

    @staticmethod
    def resolve_groups(user: User) -> list[str]:
        return [group.name for group in user.access_groups.all() if not group.is_builtin]


class UserIn(Schema):
    username: str = Field(min_length=1, max_length=150)
    email: str = ""
    password: str | None = Field(None, description="Without one the user cannot sign into the admin.")
    is_staff: bool = False
    is_superuser: bool = False
    groups: list[str] = Field(default_factory=list, description="Access groups by name, created if new.")
    credits: Amount | None = Field(None, description="An opening balance (an admin grant in the ledger).")


class UserPatch(Schema):
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    is_active: bool | None = None
    is_staff: bool | None = None
    is_superuser: bool | None = None
    password: str | None = None


def user_rows() -> QuerySet[User]:
    return (
        User.objects.annotate(balance_amount=F("balance__amount"))
        .prefetch_related(Prefetch("access_groups", queryset=AccessGroup.objects.order_by("name")))
        .order_by("id")
    )


def find_user(user_id: int) -> User:
    return get_or_404(user_rows(), user_id, "user")


@users.get("/users", response=list[UserOut], summary="List users")
@paginate(LimitOffsetPagination)
@permits("accounts.view_user")
def list_users(request: HttpRequest, search: str | None = None, is_staff: bool | None = None) -> QuerySet[User]:
    rows = user_rows()
    if search:
        rows = rows.filter(Q(username__icontains=search) | Q(email__icontains=search))
    if is_staff is not None:
        rows = rows.filter(is_staff=is_staff)
    return rows


@users.post("/users", response={201: UserOut}, summary="Create a user")
@permits("accounts.add_user")
def create_user(request: HttpRequest, payload: UserIn) -> Status[User]:
    user = billing.create_user(
        payload.username,
        email=payload.email,
        password=payload.password,
        groups=payload.groups,
        is_staff=payload.is_staff,
        is_superuser=payload.is_superuser,
        credits=payload.credits,
    )
    return Status(201, find_user(user.pk))


@users.get("/users/{user_id}", response=UserOut, summary="Get a user")
@permits("accounts.view_user")
def get_user(request: HttpRequest, user_id: int) -> User:
    return find_user(user_id)


@users.patch("/users/{user_id}", response=UserOut, summary="Change a user")
@permits("accounts.change_user")
def update_user(request: HttpRequest, user_id: int, payload: UserPatch) -> User:
    """Deactivate a user with `is_active: false`: users are never deleted, their ledger stays."""
    changes = payload.dict(exclude_unset=True)
    accounts.update_user(find_user(user_id), **changes)
    return find_user(user_id)


# --- access groups --------------------------------------------------------------------------


class GroupOut(Schema):
    id: int
    name: str
    description: str
    is_builtin: bool = Field(description="Everyone: it contains every user, and models attached to it are public.")
    created_at: datetime
    member_count: int | None = Field(description="None for Everyone, whose membership is implicit.")
    models: list[str] = Field(description="The aliases of the models its members may call.")

    @staticmethod
    def resolve_member_count(group: AccessGroup) -> int | None:
        return None if group.is_builtin else group.member_total  # type: ignore[attr-defined]

    @staticmethod
    def resolve_models(group: AccessGroup) -> list[str]:
        return [model.alias for model in group.models.all()]


class GroupIn(Schema):
    name: str = Field(min_length=1, max_length=100)
    description: str = ""


class GroupPatch(Schema):
    name: str | None = Field(None, min_length=1, max_length=100)
    description: str | None = None


def find_group(group_id: int) -> AccessGroup:
    rows = AccessGroup.objects.annotate(member_total=Count("members", distinct=True)).prefetch_related(
        Prefetch("models", queryset=DeployedModel.objects.order_by("alias"))
    )
    return get_or_404(rows, group_id, "access group")


@groups.get("/groups", response=list[GroupOut], summary="List access groups")
@paginate(LimitOffsetPagination)
@permits("accounts.view_accessgroup")
def list_groups(request: HttpRequest) -> QuerySet[AccessGroup]:
    return (
        AccessGroup.objects.annotate(member_total=Count("members", distinct=True))
        .prefetch_related(Prefetch("models", queryset=DeployedModel.objects.order_by("alias")))
        .order_by("name")
    )


@groups.post("/groups", response={201: GroupOut}, summary="Create an access group")
@permits("accounts.add_accessgroup")
def create_group(request: HttpRequest, payload: GroupIn) -> Status[AccessGroup]:
    group = accounts.create_access_group(payload.name, description=payload.description)
    return Status(201, find_group(group.pk))


@groups.get("/groups/{group_id}", response=GroupOut, summary="Get an access group")
@permits("accounts.view_accessgroup")
def get_group(request: HttpRequest, group_id: int) -> AccessGroup:
    return find_group(group_id)


@groups.patch("/groups/{group_id}", response=GroupOut, summary="Rename an access group or change its description")
@permits("accounts.change_accessgroup")
def update_group(request: HttpRequest, group_id: int, payload: GroupPatch) -> AccessGroup:
    accounts.update_access_group(find_group(group_id), name=payload.name, description=payload.description)
    return find_group(group_id)


@groups.delete("/groups/{group_id}", response={204: None}, summary="Delete an access group")
@permits("accounts.delete_accessgroup")
def delete_group(request: HttpRequest, group_id: int) -> Status[None]:
    accounts.delete_access_group(find_group(group_id))
    return Status(204, None)


@groups.get("/groups/{group_id}/members", response=list[UserOut], summary="List a group's members")
@paginate(LimitOffsetPagination)
@permits("accounts.view_accessgroup")
def list_members(request: HttpRequest, group_id: int) -> QuerySet[User]:
    group = find_group(group_id)
    return user_rows() if group.is_builtin else user_rows().filter(access_groups=group)


@groups.put("/groups/{group_id}/members/{user_id}", response={204: None}, summary="Add a user to a group")
@permits("accounts.change_accessgroup")
def add_member(request: HttpRequest, group_id: int, user_id: int) -> Status[None]:
    accounts.add_group_member(find_group(group_id), find_user(user_id))
    return Status(204, None)


@groups.delete("/groups/{group_id}/members/{user_id}", response={204: None}, summary="Take a user out of a group")
@permits("accounts.change_accessgroup")
def remove_member(request: HttpRequest, group_id: int, user_id: int) -> Status[None]:
    accounts.remove_group_member(find_group(group_id), find_user(user_id))
    return Status(204, None)


@groups.put("/groups/{group_id}/models/{model_id}", response={204: None}, summary="Let a group's members call a model")
@permits("accounts.change_accessgroup")
def add_model(request: HttpRequest, group_id: int, model_id: int) -> Status[None]:
    accounts.add_group_model(find_group(group_id), get_or_404(DeployedModel.objects.all(), model_id, "model"))
    return Status(204, None)


@groups.delete("/groups/{group_id}/models/{model_id}", response={204: None}, summary="Take a model out of a group")
@permits("accounts.change_accessgroup")
def remove_model(request: HttpRequest, group_id: int, model_id: int) -> Status[None]:
    accounts.remove_group_model(find_group(group_id), get_or_404(DeployedModel.objects.all(), model_id, "model"))
    return Status(204, None)


# --- API keys -------------------------------------------------------------------------------


class KeyOut(Schema):
    id: int
    owner_id: int
    owner: str = Field(description="The owner's username.")
    name: str
    purpose: Purpose
    prefix: str = Field(description="The first characters of the secret, to recognise it; the secret is not kept.")
    status: str = Field(description="active, expired or revoked.")
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    requests_per_second: int | None
    burst_size: int | None
    tokens_per_minute: int | None
    spend_limit: Credits | None
    spend_window: SpendWindow | None

    @staticmethod
    def resolve_owner(api_key: ApiKey) -> str:
        return api_key.owner.username

    @staticmethod
    def resolve_status(api_key: ApiKey) -> str:
        if api_key.revoked_at is not None:
            return "revoked"
        return "expired" if api_key.expires_at is not None and api_key.expires_at <= timezone.now() else "active"

    @staticmethod
    def resolve_spend_window(api_key: ApiKey) -> str | None:
        return api_key.spend_window or None


class KeyCreated(KeyOut):
    secret: str = Field(description="The key itself: shown in this answer only, never again.")


class KeyLimits(Schema):
    requests_per_second: Positive | None = None
    burst_size: Positive | None = Field(None, description="Calls allowed at once; needs a rate.")
    tokens_per_minute: Positive | None = None
    spend_limit: Amount | None = Field(None, description="Credits per spend window; needs a window.")
    spend_window: SpendWindow | None = None


class KeyIn(KeyLimits):
    owner_id: int
    name: str = Field("", max_length=100)
    purpose: Purpose = Purpose.REALTIME
    expires_at: datetime | None = None


def find_key(key_id: int) -> ApiKey:
    return get_or_404(ApiKey.objects.select_related("owner"), key_id, "API key")


@keys.get("/keys", response=list[KeyOut], summary="List API keys")
@paginate(LimitOffsetPagination)
@permits("accounts.view_apikey")
def list_keys(
    request: HttpRequest, owner_id: int | None = None, purpose: Purpose | None = None, revoked: bool | None = None
) -> QuerySet[ApiKey]:
    rows = ApiKey.objects.select_related("owner").order_by("-created_at", "-id")
    if owner_id is not None:
        rows = rows.filter(owner_id=owner_id)
    if purpose is not None:
        rows = rows.filter(purpose=purpose)
    if revoked is not None:
        rows = rows.filter(revoked_at__isnull=not revoked)
    return rows


@keys.post("/keys", response={201: KeyCreated}, summary="Create an API key (its secret is in this answer only)")
@permits("accounts.add_apikey")
def create_key(request: HttpRequest, payload: KeyIn) -> Status[ApiKey]:
    owner = get_or_404(User.objects.all(), payload.owner_id, "user")
    limits = payload.dict(include=set(KeyLimits.model_fields))
    api_key, secret = accounts.create_api_key(
        owner,
        name=payload.name,
        purpose=payload.purpose,
        expires_at=payload.expires_at,
        **{**limits, "spend_window": limits["spend_window"] or ""},
    )
    created = find_key(api_key.pk)
    created.secret = secret  # type: ignore[attr-defined]  # in this answer only: it is not stored
    return Status(201, created)


@keys.get("/keys/{key_id}", response=KeyOut, summary="Get an API key")
@permits("accounts.view_apikey")
def get_key(request: HttpRequest, key_id: int) -> ApiKey:
    return find_key(key_id)


@keys.patch("/keys/{key_id}", response=KeyOut, summary="Change a key's limits (null removes one)")
@permits("accounts.change_apikey")
def update_key(request: HttpRequest, key_id: int, payload: KeyLimits) -> ApiKey:
    limits = payload.dict(exclude_unset=True)
    if "spend_window" in limits:
        limits["spend_window"] = limits["spend_window"] or ""
    accounts.set_key_limits(find_key(key_id), **limits)
    return find_key(key_id)


@keys.post("/keys/{key_id}/revoke", response=KeyOut, summary="Revoke an API key")
@permits("accounts.change_apikey")
def revoke_key(request: HttpRequest, key_id: int) -> ApiKey:
    """Every gateway process refuses the key within a second. Revoking twice keeps the first time."""
    return accounts.revoke_api_key(find_key(key_id))
