"""The management API's catalog: endpoints (their credential write-only), models with their tariffs and
limits, traffic rules — written through gateway/billing/routing_rules services."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.models import Tariff
from gateway.models import DeployedModel, Endpoint
from gateway.services import add_endpoint, add_model
from routing_rules.models import TrafficRule
from tests.management_client import error_of

pytestmark = pytest.mark.django_db

CREDENTIAL = "upstream-credential-never-shown"


@pytest.fixture
def endpoint(db) -> Endpoint:
    return add_endpoint("local", "http://127.0.0.1:9/v1", api_key=CREDENTIAL)[0]


@pytest.fixture
def model(endpoint) -> DeployedModel:
    return add_model("gpt-x", endpoint=endpoint, input_price="1", output_price="2")


# --- endpoints ------------------------------------------------------------------------------


def test_an_endpoint_is_created_with_a_credential_that_is_never_returned(api):
    response = api.post(
        "/endpoints",
        {"name": "vendor", "base_url": "https://api.example.com/v1/", "api_key": CREDENTIAL, "timeout_seconds": 30},
    )
    assert response.status_code == 201
    created = response.json()
    assert (created["base_url"], created["has_credential"], created["timeout_seconds"]) == (
        "https://api.example.com/v1",
        True,
        30,
    )
    stored = Endpoint.objects.get(name="vendor")
    assert stored.decrypt_credential() == CREDENTIAL
    assert CREDENTIAL not in stored.api_key_encrypted  # encrypted at rest, as the admin stores it
    for answer in (response, api.get(f"/endpoints/{stored.pk}"), api.get("/endpoints")):
        assert CREDENTIAL not in answer.content.decode()
        assert stored.api_key_encrypted not in answer.content.decode()


def test_an_endpoint_name_already_taken_is_a_409(api, endpoint):
    response = api.post("/endpoints", {"name": "local", "base_url": "http://127.0.0.1:10/v1"})
    assert response.status_code == 409
    assert error_of(response)["param"] == "name"
    endpoint.refresh_from_db()
    assert endpoint.base_url == "http://127.0.0.1:9/v1"


def test_a_bad_base_url_is_a_400_naming_it(api):
    response = api.post("/endpoints", {"name": "bad", "base_url": "ftp://nowhere"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "base_url"
    assert not Endpoint.objects.filter(name="bad").exists()


def test_an_endpoint_changes_and_keeps_its_credential_unless_told(api, endpoint):
    changed = api.patch(f"/endpoints/{endpoint.pk}", {"responses_api": "translate", "timeout_seconds": 5})
    assert (changed.json()["responses_api"], changed.json()["timeout_seconds"]) == ("translate", 5)
    endpoint.refresh_from_db()
    assert endpoint.decrypt_credential() == CREDENTIAL
    api.patch(f"/endpoints/{endpoint.pk}", {"api_key": "a-new-one"})
    endpoint.refresh_from_db()
    assert endpoint.decrypt_credential() == "a-new-one"
    assert api.patch(f"/endpoints/{endpoint.pk}", {"api_key": ""}).json()["has_credential"] is False


def test_a_zero_timeout_is_a_400_naming_it(api, endpoint):
    response = api.patch(f"/endpoints/{endpoint.pk}", {"timeout_seconds": 0})
    assert response.status_code == 400
    assert error_of(response)["param"] == "timeout_seconds"


def test_an_endpoint_serving_a_model_is_not_deleted(api, model):
    refused = api.delete(f"/endpoints/{model.endpoint_id}")
    assert refused.status_code == 400
    assert "'gpt-x'" in error_of(refused)["message"]
    assert Endpoint.objects.filter(pk=model.endpoint_id).exists()
    spare = add_endpoint("spare", "http://127.0.0.1:11/v1")[0]
    assert api.delete(f"/endpoints/{spare.pk}").status_code == 204
    assert not Endpoint.objects.filter(pk=spare.pk).exists()


# --- models and tariffs ---------------------------------------------------------------------


def test_a_model_is_deployed_with_prices_and_access(api, endpoint, user_with_credits):
    response = api.post(
        "/models",
        {
            "alias": "chat-1",
            "endpoint_id": endpoint.pk,
            "upstream_model": "vendor-chat",
            "input_price": "0.5",
            "output_price": "1.5",
            "flex_input_price": "0.25",
            "flex_output_price": "0.75",
            "groups": ["research"],
        },
    )
    assert response.status_code == 201
    created = response.json()
    assert (created["alias"], created["upstream_model"], created["endpoint"], created["groups"]) == (
        "chat-1",
        "vendor-chat",
        "local",
        ["research"],
    )
    prices = {(t["tier"], t["input_price"], t["output_price"]) for t in created["tariffs"]}
    assert prices == {("realtime", "0.5", "1.5"), ("flex", "0.25", "0.75")}
    assert api.get("/models").json()["count"] == 1


def test_an_alias_already_taken_is_a_400_and_writes_nothing(api, model):
    response = api.post("/models", {"alias": "gpt-x", "endpoint_id": model.endpoint_id, "input_price": "9"})
    assert response.status_code == 400
    assert "already exists" in error_of(response)["message"]
    assert Tariff.objects.filter(model=model).count() == 1


def test_a_negative_price_is_a_400_naming_it(api, endpoint):
    response = api.post("/models", {"alias": "cheap", "endpoint_id": endpoint.pk, "input_price": "-1"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "input_price"
    assert not DeployedModel.objects.filter(alias="cheap").exists()


def test_a_new_tariff_closes_the_one_in_force(api, model):
    response = api.post(f"/models/{model.pk}/tariffs", {"tier": "realtime", "input_price": "3", "output_price": "4"})
    assert response.status_code == 201
    history = api.get(f"/models/{model.pk}/tariffs", tier="realtime").json()["items"]
    assert [(t["input_price"], t["valid_until"] is None) for t in history] == [("3", True), ("1", False)]
    assert history[1]["valid_until"] == history[0]["valid_from"]
    current = api.get(f"/models/{model.pk}").json()["tariffs"]
    assert [(t["tier"], t["input_price"]) for t in current] == [("realtime", "3")]


def test_a_model_changes_endpoint_and_limits_in_one_call(api, model):
    other = add_endpoint("other", "http://127.0.0.1:12/v1")[0]
    changed = api.patch(
        f"/models/{model.pk}",
        {"endpoint_id": other.pk, "requests_per_second": 10, "burst_size": 20, "capacity": 4},
    ).json()
    assert (changed["endpoint"], changed["requests_per_second"], changed["burst_size"], changed["capacity"]) == (
        "other",
        10,
        20,
        4,
    )
    reset = api.patch(
        f"/models/{model.pk}", {"burst_size": None, "flex_concurrency": None, "upstream_model": None}
    ).json()
    assert (reset["burst_size"], reset["flex_concurrency"], reset["requests_per_second"]) == (None, 10, 10)


def test_a_broken_limit_rule_is_a_400_and_changes_nothing(api, model):
    response = api.patch(f"/models/{model.pk}", {"upstream_model": "renamed", "burst_size": 5})
    assert response.status_code == 400
    assert error_of(response)["param"] == "burst_size"
    model.refresh_from_db()
    assert (model.upstream_model, model.burst_size) == ("gpt-x", None)  # one transaction: neither change


def test_a_model_is_retired_and_restored(api, model):
    retired = api.delete(f"/models/{model.pk}")
    assert retired.status_code == 200
    assert retired.json()["retired_at"] is not None
    assert api.get("/models", retired=False).json()["count"] == 0
    assert Tariff.objects.filter(model=model).exists()  # its price history stays
    assert api.post(f"/models/{model.pk}/restore").json()["retired_at"] is None


# --- traffic rules --------------------------------------------------------------------------


def test_a_rule_is_added_changed_and_removed(api, model):
    target = add_model("gpt-small", endpoint=model.endpoint)
    created = api.post("/rules", {"model_id": model.pk, "purpose": "batch", "action": "deny"})
    assert created.status_code == 201
    rule_id = created.json()["id"]
    assert (created.json()["model"], created.json()["target"]) == ("gpt-x", None)
    changed = api.patch(f"/rules/{rule_id}", {"action": "redirect", "target_id": target.pk}).json()
    assert (changed["action"], changed["target"]) == ("redirect", "gpt-small")
    assert [rule["id"] for rule in api.get("/rules", model_id=model.pk).json()["items"]] == [rule_id]
    assert api.delete(f"/rules/{rule_id}").status_code == 204
    assert not TrafficRule.objects.exists()


def test_a_second_rule_for_the_same_purpose_is_a_400(api, model):
    assert api.post("/rules", {"model_id": model.pk, "purpose": "batch", "action": "deny"}).status_code == 201
    again = api.post("/rules", {"model_id": model.pk, "purpose": "batch", "action": "deny"})
    assert again.status_code == 400
    assert "already has a rule" in error_of(again)["message"]


def test_a_redirect_to_itself_is_a_400_naming_the_target(api, model):
    response = api.post(
        "/rules", {"model_id": model.pk, "purpose": "realtime", "action": "redirect", "target_id": model.pk}
    )
    assert response.status_code == 400
    assert error_of(response)["param"] == "target"
    assert not TrafficRule.objects.exists()


def test_prices_are_exact_decimals_in_and_out(api, model):
    api.post(f"/models/{model.pk}/tariffs", {"tier": "flex", "input_price": "0.000001", "output_price": "123456.5"})
    tariff = Tariff.objects.current().get(model=model, tier="flex")
    assert (tariff.input_price, tariff.output_price) == (Decimal("0.000001"), Decimal("123456.5"))
    flex = [t for t in api.get(f"/models/{model.pk}").json()["tariffs"] if t["tier"] == "flex"]
    assert (flex[0]["input_price"], flex[0]["output_price"]) == ("0.000001", "123456.5")
