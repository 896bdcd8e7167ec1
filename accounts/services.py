from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, TypedDict, Unpack

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.models import EVERYONE, KEY_LIMITS, AccessGroup, ApiKey, Purpose, User
from common.limits import save_validated
from common.numbers import parse_amount

if TYPE_CHECKING:
    from gateway.models import DeployedModel

SECRET_PREFIX = "sk-"  # noqa: S105  (a format marker, not a secret)
DISPLAY_PREFIX_LENGTH = 10


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """Return `sk-` + base64url of 32 random bytes (43 characters, no padding)."""
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def create_api_key(
    owner: User,
    *,
    name: str = "",
    purpose: str = Purpose.REALTIME,
    expires_at: datetime | None = None,
    requests_per_second: int | None = None,
    burst_size: int | None = None,
    tokens_per_minute: int | None = None,
    spend_limit: Decimal | None = None,
    spend_window: str = "",
) -> tuple[ApiKey, str]:
    """Create a key and return it with its secret. The secret is never stored and never shown again."""
    if purpose not in Purpose.values:
        raise ValueError(f"Unknown purpose {purpose!r}: use one of {', '.join(Purpose.values)}.")
    secret = new_secret()
    api_key = ApiKey(
        owner=owner,
        name=name,
        purpose=purpose,
        secret_hash=hash_secret(secret),
        prefix=secret[:DISPLAY_PREFIX_LENGTH],
        expires_at=expires_at,
        requests_per_second=requests_per_second,
        burst_size=burst_size,
        tokens_per_minute=tokens_per_minute,
        spend_limit=spend_limit,
        spend_window=spend_window,
    )
    api_key.full_clean()  # the limits' rules, as the admin form checks them, before the constraints would
    api_key.save()
    return api_key, secret


class KeyLimits(TypedDict, total=False):
    requests_per_second: int | None
    burst_size: int | None
    tokens_per_minute: int | None
    spend_limit: Decimal | str | None
    spend_window: str


def set_key_limits(api_key: ApiKey, *, clear: bool = False, **limits: Unpack[KeyLimits]) -> ApiKey:
    """Change the given limits of a key (with `clear`, after removing all of them), validated as in the admin.

    Raises ValidationError and writes nothing if the result breaks a rule or the key is revoked.
    """
    if api_key.is_revoked:
        raise ValidationError(f"Key {api_key.prefix}… is revoked: a revoked key's limits no longer change.")
    values: dict[str, object] = dict(limits)
    if limits.get("spend_limit") is not None:
        try:
            # Exact to the nano-credit, like every amount; normalized so `1.5000000000` fits 9 decimals.
            values["spend_limit"] = parse_amount(limits["spend_limit"], what="spend limit").normalize()
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
    save_validated(api_key, KEY_LIMITS, values, reset=clear)
    return api_key


def revoke_api_key(api_key: ApiKey) -> ApiKey:
    """Revoke a key (soft delete). Revoking twice keeps the first revocation time."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def ensure_groups(names: Iterable[str]) -> list[AccessGroup]:
    """Return the named groups, creating the missing ones."""
    groups = []
    for name in names:
        if not name.strip():
            raise ValueError("A group name cannot be empty.")
        group, _ = AccessGroup.objects.get_or_create(name=name.strip())
        groups.append(group)
    return groups


@transaction.atomic
def create_user(
    username: str,
    *,
    email: str = "",
    password: str | None = None,
    groups: Iterable[str] = (),
    is_staff: bool = False,
    is_superuser: bool = False,
) -> User:
    """Create a user with group memberships, all or nothing (`billing.services.create_user` adds credits)."""
    if not username.strip():
        raise ValueError("The username cannot be empty.")
    if User.objects.filter(username=username).exists():
        raise ValueError(f"User '{username}' already exists.")
    user = User(username=username, email=email, is_staff=is_staff or is_superuser, is_superuser=is_superuser)
    if password:
        user.set_password(password)
    else:
        user.set_unusable_password()
    user.save()
    for group in ensure_groups(groups):
        group.members.add(user)
    return user


# What `update_user` may change; the username is the user's handle for commands and keys, so it stays.
USER_FIELDS = ("email", "first_name", "last_name", "is_active", "is_staff", "is_superuser")


@transaction.atomic
def update_user(user: User, *, password: str | None = None, **fields: object) -> User:
    """Change a user's profile and flags (and password, if given), validated as the admin form validates.

    Raises ValidationError and writes nothing if a value breaks a rule.
    """
    unknown = set(fields) - set(USER_FIELDS)
    if unknown:
        raise TypeError(f"Not a user field: {', '.join(sorted(unknown))}.")
    for name, value in fields.items():
        setattr(user, name, value)
    if user.is_superuser:
        user.is_staff = True  # as `create_user`: a superuser always reaches the admin
    user.full_clean(exclude=["password"])
    if password is not None:
        if not password:
            raise ValidationError({"password": "The password cannot be empty."})
        user.set_password(password)
    user.save()
    return user


def set_user_groups(user: User, groups: Iterable[AccessGroup]) -> None:
    """Make `groups` the user's memberships; Everyone's, which is implicit, is left as it is."""
    builtin = list(user.access_groups.filter(is_builtin=True))
    # .set() sends m2m_changed, which the auth snapshot listens to.
    user.access_groups.set([*(group for group in groups if not group.is_builtin), *builtin])


def _check_group_name(name: str) -> str:
    if not name.strip():
        raise ValidationError({"name": "A group name cannot be empty."})
    return name.strip()


def create_access_group(name: str, *, description: str = "") -> AccessGroup:
    """Create an access group; its name must be new."""
    name = _check_group_name(name)
    if AccessGroup.objects.filter(name=name).exists():
        raise ValidationError({"name": f"A group named '{name}' already exists."})
    return AccessGroup.objects.create(name=name, description=description)


@transaction.atomic
def update_access_group(group: AccessGroup, *, name: str | None = None, description: str | None = None) -> AccessGroup:
    """Rename a group or change its description. The built-in Everyone keeps its name."""
    if name is not None and name.strip() != group.name:
        if group.is_builtin:
            raise ValidationError({"name": f"The built-in '{EVERYONE}' group cannot be renamed."})
        name = _check_group_name(name)
        if AccessGroup.objects.filter(name=name).exclude(pk=group.pk).exists():
            raise ValidationError({"name": f"A group named '{name}' already exists."})
        group.name = name
    if description is not None:
        group.description = description
    group.save()
    return group


def delete_access_group(group: AccessGroup) -> None:
    """Delete a group (its members and models lose the access it gave). Everyone cannot be deleted."""
    if group.is_builtin:
        raise ValidationError(f"The built-in '{EVERYONE}' group cannot be deleted.")
    group.delete()


def _check_not_everyone(group: AccessGroup) -> None:
    if group.is_builtin:
        raise ValidationError(f"Every user is in '{EVERYONE}': its membership cannot change.")


def add_group_member(group: AccessGroup, user: User) -> None:
    """Give a user the access of a group (nothing changes if they are a member already)."""
    _check_not_everyone(group)
    group.members.add(user)


def remove_group_member(group: AccessGroup, user: User) -> None:
    """Take a user out of a group (nothing changes if they were not in it)."""
    _check_not_everyone(group)
    group.members.remove(user)


def add_group_model(group: AccessGroup, model: DeployedModel) -> None:
    """Let the group's members call a model (attached to Everyone, the model is public)."""
    group.models.add(model)


def remove_group_model(group: AccessGroup, model: DeployedModel) -> None:
    """Take a model out of a group's access."""
    group.models.remove(model)
