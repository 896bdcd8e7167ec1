"""The management API's door: who gets in (platform keys of staff users, staff sessions with CSRF), how every
failure reads (the OpenAI envelope, naming the bad field), and its OpenAPI document and docs page."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import httpx
import orjson
import pytest
from django.test import Client
from django.utils import timezone
from jsonschema import Draft202012Validator

from accounts.models import ApiKey, Purpose
from accounts.services import create_api_key, revoke_api_key
from billing.services import create_user
from tests.management_client import BASE, ManagementClient, error_of

pytestmark = pytest.mark.django_db


# --- who gets in ----------------------------------------------------------------------------


def test_a_call_without_any_credential_is_a_401():
    response = ManagementClient().get("/users")
    assert response.status_code == 401
    assert error_of(response)["code"] == "missing_credential"
    assert error_of(response)["type"] == "authentication_error"


def test_a_platform_key_of_a_staff_user_is_let_in(api, admin_user):
    response = api.get("/users")
    assert response.status_code == 200
    assert [user["username"] for user in response.json()["items"]] == ["admin"]


def test_a_platform_keys_use_is_on_record(api, admin_user):
    api_key = ApiKey.objects.get(owner=admin_user, purpose=Purpose.PLATFORM)
    assert api_key.last_used_at is None
    api.get("/users")
    api_key.refresh_from_db()
    assert api_key.last_used_at is not None


def test_an_unknown_key_is_a_401(db):
    response = ManagementClient("sk-" + "x" * 43).get("/users")
    assert response.status_code == 401
    assert "unknown, revoked or expired" in error_of(response)["message"]


def test_a_revoked_key_is_a_401_at_once(admin_user):
    api_key, secret = create_api_key(admin_user, purpose=Purpose.PLATFORM)
    assert ManagementClient(secret).get("/users").status_code == 200
    revoke_api_key(api_key)
    assert ManagementClient(secret).get("/users").status_code == 401


def test_an_expired_key_is_a_401(admin_user):
    secret = create_api_key(admin_user, purpose=Purpose.PLATFORM, expires_at=timezone.now() - timedelta(seconds=1))[1]
    assert ManagementClient(secret).get("/users").status_code == 401


def test_a_key_revoked_through_the_api_itself_no_longer_opens_it(api):
    own = api.get("/keys").json()["items"][0]
    assert api.post(f"/keys/{own['id']}/revoke").status_code == 200
    assert api.get("/users").status_code == 401


@pytest.mark.parametrize("purpose", [Purpose.REALTIME, Purpose.BATCH, Purpose.PLAYGROUND])
def test_a_staff_users_key_of_another_purpose_is_a_403(admin_user, purpose):
    secret = create_api_key(admin_user, purpose=purpose)[1]
    response = ManagementClient(secret).get("/users")
    assert response.status_code == 403
    assert error_of(response)["type"] == "permission_denied"
    assert f"This is a {purpose} key" in error_of(response)["message"]


def test_a_platform_key_of_a_user_who_is_not_staff_is_a_403(user_with_credits):
    secret = create_api_key(user_with_credits, purpose=Purpose.PLATFORM)[1]
    response = ManagementClient(secret).get("/users")
    assert response.status_code == 403
    assert error_of(response)["message"] == "The management API is for staff users only."


def test_a_platform_key_of_a_staff_user_since_deactivated_is_a_403(admin_user, api):
    admin_user.is_active = False
    admin_user.save()
    assert api.get("/users").status_code == 403


def test_a_staff_user_may_do_what_their_permissions_allow_as_in_the_admin(db):
    from django.contrib.auth.models import Permission

    operator = create_user("operator", is_staff=True)
    api = ManagementClient(create_api_key(operator, purpose=Purpose.PLATFORM)[1])
    refused = api.get("/users")
    assert refused.status_code == 403
    assert "accounts.view_user" in error_of(refused)["message"]

    operator.user_permissions.add(Permission.objects.get(codename="view_user"))
    operator = type(operator).objects.get(pk=operator.pk)  # permissions are cached per user object
    assert api.get("/users").status_code == 200
    assert api.post("/users", {"username": "eve"}).status_code == 403
    assert not type(operator).objects.filter(username="eve").exists()

    operator.user_permissions.add(Permission.objects.get(codename="add_user"))
    assert api.post("/users", {"username": "eve"}).status_code == 201


def test_each_operation_says_which_permission_it_needs(db):
    document = Client().get(f"{BASE}/openapi.json").json()
    operation = document["paths"][f"{BASE}/users/{{user_id}}/credit-grants"]["post"]
    assert "Needs the permission `billing.add_credittransaction`." in operation["description"]
    for item in document["paths"].values():
        for operation in item.values():
            assert "Needs the permission" in operation["description"]


def session_client(user) -> tuple[Client, str]:  # type: ignore[no-untyped-def]
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/admin/login/", follow=True)  # the admin hands out the CSRF cookie, as a browser gets it
    return client, client.cookies["csrftoken"].value


def test_a_staff_session_reads_and_writes_with_its_csrf_token(admin_user):
    client, token = session_client(admin_user)
    api = ManagementClient(client=client)
    assert api.get("/users").status_code == 200

    refused = api.post("/groups", {"name": "ops"})
    assert refused.status_code == 403
    assert "CSRF" in error_of(refused)["message"]

    api.headers = {"X-CSRFToken": token}
    assert api.post("/groups", {"name": "ops"}).status_code == 201


def test_a_session_of_a_user_who_is_not_staff_is_a_403(user_with_credits):
    client, _ = session_client(user_with_credits)
    assert ManagementClient(client=client).get("/users").status_code == 403


# --- how failures read ----------------------------------------------------------------------


def test_a_missing_field_is_a_400_naming_it(api):
    response = api.post("/users", {"email": "x@example.com"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "username"
    assert error_of(response)["type"] == "invalid_request_error"


def test_a_malformed_amount_is_a_400_naming_it(api, user_with_credits):
    response = api.post(f"/users/{user_with_credits.pk}/credit-grants", {"amount": "1.0000000001"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "amount"
    assert "more than 9 decimal places" in error_of(response)["message"]


def test_a_rule_broken_in_a_service_is_a_400_naming_its_field(api, user_with_credits):
    # A burst needs a rate: the same rule the admin form and `set_limits` apply.
    response = api.post("/keys", {"owner_id": user_with_credits.pk, "burst_size": 5})
    assert response.status_code == 400
    assert error_of(response)["param"] == "burst_size"
    assert "A burst needs a rate" in error_of(response)["message"]


def test_a_bad_query_parameter_is_a_400_naming_it(api):
    response = api.get("/requests", status="fourhundred")
    assert response.status_code == 400
    assert error_of(response)["param"] == "status"


def test_a_body_that_is_not_json_is_a_400(api):
    response = api.client.post(f"{BASE}/groups", b"{nope", content_type="application/json", headers=api.headers)
    assert response.status_code == 400
    assert orjson.loads(response.content)["error"]["message"]


def test_an_unknown_object_is_a_404_naming_it(api):
    response = api.get("/users/999999")
    assert response.status_code == 404
    assert error_of(response) == {
        "message": "No user 999999.",
        "type": "not_found_error",
        "param": None,
        "code": "not_found",
    }


def test_a_method_a_path_lacks_is_a_405_in_the_envelope(api):
    response = api.patch("/users", {"email": "x@example.com"})
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"
    assert set(response["Allow"].split(", ")) == {"GET", "POST"}


def test_an_unknown_path_is_a_404_in_the_envelope(api):
    response = api.get("/no-such-thing")
    assert response.status_code == 404
    assert error_of(response)["code"] == "unknown_url"


# --- the OpenAPI document and the docs ------------------------------------------------------

RESOURCES = {
    "/users",
    "/users/{user_id}",
    "/users/{user_id}/credit-grants",
    "/users/{user_id}/credit-removals",
    "/users/{user_id}/transactions",
    "/users/{user_id}/balance",
    "/balances",
    "/groups",
    "/groups/{group_id}",
    "/groups/{group_id}/members",
    "/groups/{group_id}/members/{user_id}",
    "/groups/{group_id}/models/{model_id}",
    "/keys",
    "/keys/{key_id}",
    "/keys/{key_id}/revoke",
    "/endpoints",
    "/endpoints/{endpoint_id}",
    "/models",
    "/models/{model_id}",
    "/models/{model_id}/restore",
    "/models/{model_id}/tariffs",
    "/rules",
    "/rules/{rule_id}",
    "/usage",
    "/requests",
}


def refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(value) for value in node))
    return set()


def test_the_openapi_document_lists_every_resource_and_holds_together(db):
    response = Client().get(f"{BASE}/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert {path.removeprefix(BASE) for path in document["paths"]} == RESOURCES
    schemas = document["components"]["schemas"]
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    assert {ref.removeprefix("#/components/schemas/") for ref in refs(document)} <= set(schemas)
    operation_ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))
    # Both ways in: a bearer platform key and the admin's session.
    assert {scheme["type"] for scheme in document["components"]["securitySchemes"].values()} == {"http", "apiKey"}
    # Every operation names the error envelope, and it is the one the API answers (and OpenAI's).
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }
    unauthenticated = Client().get(f"{BASE}/users").json()
    Draft202012Validator(schemas["Error"]).validate(unauthenticated)
    # The credential is write-only: it is in no answer's schema.
    assert "api_key" not in schemas["EndpointOut"]["properties"]
    assert "api_key" in schemas["EndpointIn"]["properties"]


@pytest.mark.django_db(transaction=True)  # as every test of the live gateway: its threads see committed rows only
def test_the_docs_page_needs_nothing_from_another_host(gateway_server):
    page = httpx.get(f"{gateway_server.url}{BASE}/docs", timeout=10)
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets
    assert not [asset for asset in assets if "//" in asset], "the docs page loads something from another host"
    for asset in assets:
        served = httpx.get(f"{gateway_server.url}{asset}", timeout=10)
        assert served.status_code == 200, asset
        assert served.content


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package")
@pytest.mark.django_db(transaction=True)
def test_the_docs_render_in_a_browser_cut_off_from_every_other_host(gateway_server):
    from playwright.sync_api import Route, sync_playwright

    elsewhere: list[str] = []

    def only_the_gateway(route: Route) -> None:
        if route.request.url.startswith(gateway_server.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route("**/*", only_the_gateway)
            page.goto(f"{gateway_server.url}{BASE}/docs")
            # Swagger UI draws one block per operation once it has read openapi.json.
            page.wait_for_selector(".opblock", timeout=20_000)
            operations = page.locator(".opblock").count()
            title = page.locator(".title").first.inner_text()
        finally:
            browser.close()
    assert not elsewhere
    assert operations == sum(len(methods) for methods in Client().get(f"{BASE}/openapi.json").json()["paths"].values())
    assert "dwctl management API" in title
