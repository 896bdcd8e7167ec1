"""The management API at /admin/api/v1/: for staff users, with a platform key or the admin session.

OpenAPI at /admin/api/v1/openapi.json, interactive docs at /admin/api/v1/docs (Swagger UI from the
package's own static files: no CDN, so the docs work offline).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.urls import URLPattern, URLResolver
from ninja import NinjaAPI
from ninja.openapi.schema import OpenAPISchema

from management_api import access, catalog, errors, money, usage
from management_api.auth import PlatformKey, StaffSession

# The envelope every failure is answered in, as the OpenAPI description names it.
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "examples": ["invalid_request_error", "permission_denied"]},
                "param": {"type": ["string", "null"], "description": "The field at fault, when one is."},
                "code": {"type": ["string", "null"], "examples": ["not_found", "missing_credential"]},
            },
        }
    },
}
FAILURES = {
    "400": "Bad input: `param` names the field.",
    "401": "No credential, or an unknown, revoked or expired key.",
    "403": "Not a platform key, not a staff user, without the permission it needs, or a write without its CSRF token.",
    "404": "No such object.",
}


class ManagementApi(NinjaAPI):
    def get_openapi_schema(self, *, path_prefix: str | None = None, path_params: Any = None) -> OpenAPISchema:
        """ninja's description, with the error envelope named on every operation."""
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        schema["components"]["schemas"]["Error"] = ERROR_SCHEMA
        failure = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for item in schema["paths"].values():
            for operation in item.values():
                for status, description in FAILURES.items():
                    operation["responses"].setdefault(status, {"description": description, **failure})
        return schema


api = ManagementApi(
    title="dwctl management API",
    version="1",
    description=(
        "Users, access groups, API keys, endpoints, models and tariffs, traffic rules, credits and usage. "
        "Authenticate with a platform-purpose key of a staff user (`Authorization: Bearer sk-…`) or a staff "
        "session of the admin (writes then need its CSRF token, `X-CSRFToken`). Every error is "
        '`{"error": {"message", "type", "param", "code"}}`.'
    ),
    auth=[PlatformKey(), StaffSession()],
    urls_namespace="management_api",
)
errors.install(api)

for router in (
    access.users,
    money.credits,
    access.groups,
    access.keys,
    catalog.endpoints,
    catalog.models,
    catalog.traffic_rules,
    usage.usage,
):
    api.add_router("", router)


def _method_not_allowed_enveloped(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """ninja answers a method a path lacks in plain text; the API answers every failure in the envelope."""

    @functools.wraps(view)
    def answer(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = view(request, *args, **kwargs)
        if not isinstance(response, HttpResponseNotAllowed):
            return response
        allowed = response["Allow"]
        refused = errors.error(
            405, f"{request.method} is not allowed on {request.path}: use {allowed}.", code="method_not_allowed"
        )
        refused["Allow"] = allowed
        return refused

    return answer


def urls() -> tuple[list[URLPattern | URLResolver], str, str]:
    """The API's URL patterns, for `include`."""
    patterns, app_name, namespace = api.urls
    wrapped: list[URLPattern | URLResolver] = [
        URLPattern(p.pattern, _method_not_allowed_enveloped(p.callback), p.default_args, p.name)
        if isinstance(p, URLPattern)
        else p
        for p in patterns
    ]
    return wrapped, app_name, namespace


def unknown_path(request: HttpRequest, rest: str) -> HttpResponse:
    """A path under the API that names nothing: a 404 in the envelope, not the admin's redirect to its login."""
    return errors.error(404, f"Unknown management API path '{request.path}'.", code="unknown_url")
