"""A client of the management API (/admin/api/v1/) on Django's test client: every error it gets back is
checked to be the OpenAI error envelope, as every failure of the API must be."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from django.test import Client

from accounts.models import Purpose, User
from accounts.services import create_api_key
from tests.conformance import assert_conforms

BASE = "/admin/api/v1"


class ManagementClient:
    def __init__(self, secret: str | None = None, client: Client | None = None) -> None:
        self.client = client or Client()
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        send = getattr(self.client, method)
        if method in ("get", "delete") and body is None:
            response = send(f"{BASE}{path}", params, headers=self.headers)
        else:
            response = send(f"{BASE}{path}", orjson.dumps(body), content_type="application/json", headers=self.headers)
        if response.status_code >= 400:
            assert response["Content-Type"] == "application/json", response.content
            assert_conforms(orjson.loads(response.content), "ErrorResponse")
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.call("get", path, **params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("post", path, body if body is not None else {})

    def patch(self, path: str, body: Any) -> Any:
        return self.call("patch", path, body)

    def put(self, path: str) -> Any:
        return self.call("put", path, {})

    def delete(self, path: str) -> Any:
        return self.call("delete", path)


def error_of(response: Any) -> dict[str, Any]:
    return orjson.loads(response.content)["error"]  # type: ignore[no-any-return]


@pytest.fixture
def platform_key(admin_user: User) -> str:
    return create_api_key(admin_user, name="automation", purpose=Purpose.PLATFORM)[1]


@pytest.fixture
def api(platform_key: str) -> ManagementClient:
    """The API as a staff user's platform key sees it."""
    return ManagementClient(platform_key)
