"""Who may call the management API: a staff user, through one of their platform keys or their admin session,
and for each operation only with the Django permission the admin asks for the same thing (superusers have all).

A platform key is looked up in the database on every call (this is not the hot path), so a revoked
key is refused at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings
from django.http import HttpRequest
from django.utils import timezone
from ninja.errors import AuthenticationError, AuthorizationError
from ninja.security import APIKeyCookie, HttpBearer

from accounts.models import ApiKey, Purpose, User
from accounts.services import hash_secret


class ApiRequest(HttpRequest):
    """A request the API let in: `auth` is the staff user it acts for."""

    auth: User


NOT_STAFF_MESSAGE = "The management API is for staff users only."


class PlatformKey(HttpBearer):
    """`Authorization: Bearer sk-…`: an active platform-purpose key of an active staff user."""

    def authenticate(self, request: HttpRequest, token: str) -> User:
        api_key = ApiKey.objects.active().select_related("owner").filter(secret_hash=hash_secret(token.strip())).first()
        if api_key is None:
            raise AuthenticationError(message="The API key is unknown, revoked or expired.")
        if api_key.purpose != Purpose.PLATFORM:
            raise AuthorizationError(
                message=f"This is a {api_key.purpose} key: the management API takes platform keys only."
            )
        if not (api_key.owner.is_active and api_key.owner.is_staff):
            raise AuthorizationError(message=NOT_STAFF_MESSAGE)
        # An update(), not a save(): a key's last use is no change the auth snapshot must be rebuilt for.
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=timezone.now())
        return api_key.owner


class StaffSession(APIKeyCookie):
    """The admin's session cookie of a staff user; writes carry the CSRF token too (`X-CSRFToken`)."""

    param_name = settings.SESSION_COOKIE_NAME

    def __call__(self, request: HttpRequest) -> Any:
        # No session, no CSRF check: a call without any credential is a 401, not a CSRF failure.
        if not request.user.is_authenticated:
            return None
        return super().__call__(request)

    def authenticate(self, request: HttpRequest, key: str | None) -> User:
        user: User = request.user  # type: ignore[assignment]
        if not (user.is_active and user.is_staff):
            raise AuthorizationError(message=NOT_STAFF_MESSAGE)
        return user


View = TypeVar("View", bound=Callable[..., Any])


def permits(permission: str) -> Callable[[View], View]:
    """Let the view run only for a user holding `permission` (`app_label.codename`), as the admin would."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def checked(request: ApiRequest, *args: Any, **kwargs: Any) -> Any:
            if not request.auth.has_perm(permission):
                raise AuthorizationError(message=f"This needs the permission '{permission}', which you do not have.")
            return view(request, *args, **kwargs)

        # In the OpenAPI description too (ninja takes a view's docstring for it).
        checked.__doc__ = f"{(view.__doc__ or '').strip()}\n\nNeeds the permission `{permission}`.".strip()
        return checked  # type: ignore[return-value]

    return decorate
