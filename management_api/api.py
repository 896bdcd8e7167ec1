"""The management API at /admin/api/v1/: for staff users, with a platform key or the admin session.

OpenAPI at /admin/api/v1/openapi.json, interactive docs at /admin/api/v1/docs (Swagger UI from the
package's own static files: no CDN, so the docs work offline).
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI

from management_api import access, catalog, errors, money, usage
from management_api.auth import PlatformKey, StaffSession

api = NinjaAPI(
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


def unknown_path(request: HttpRequest, rest: str) -> HttpResponse:
    """A path under the API that names nothing: a 404 in the envelope, not the admin's redirect to its login."""
    return errors.error(404, f"Unknown management API path '{request.path}'.", code="unknown_url")
