"""What the admin writes goes through the services the commands and the management API call: the service's
rules show on the form's fields, and its writes are the ones made."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from gateway.models import DeployedModel
from gateway.services import add_endpoint, add_model
from routing_rules.services import add_traffic_rule
from tests.test_admin import UPSTREAM_CREDENTIAL, form_data

pytestmark = pytest.mark.django_db


def test_the_endpoint_form_shows_the_services_rules_on_their_fields(staff_client: Client) -> None:
    # The admin saves through `update_endpoint`: what it refuses is a form error, never a failed save.
    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1", api_key=UPSTREAM_CREDENTIAL)
    url = reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    data = form_data(staff_client.get(url))
    data.update(base_url="ftp://127.0.0.1/v1", timeout_seconds="0")
    page = staff_client.post(url, data)
    assert page.status_code == 200
    errors = page.context["adminform"].form.errors
    assert "is not a valid base URL" in errors["base_url"][0]
    assert "The timeout must be a positive number of seconds" in errors["timeout_seconds"][0]
    endpoint.refresh_from_db()
    assert (endpoint.base_url, endpoint.timeout_seconds) == ("http://127.0.0.1:9/v1", 600)


def test_a_rule_is_changed_and_deleted_from_its_models_page(staff_client: Client) -> None:
    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1")
    model, other = add_model("gpt-test", endpoint=endpoint), add_model("gpt-small", endpoint=endpoint)
    add_traffic_rule(model, purpose="batch", action="redirect", target=other)
    rule = model.traffic_rules.get()  # batch → redirect to gpt-small
    url = reverse("admin:gateway_deployedmodel_change", args=[model.pk])
    data = form_data(staff_client.get(url))
    data.update({"traffic_rules-0-action": "deny", "traffic_rules-0-target": ""})
    assert staff_client.post(url, data).status_code == 302
    rule.refresh_from_db()
    assert (rule.action, rule.target_id) == ("deny", None)

    data = form_data(staff_client.get(url))
    data["traffic_rules-0-DELETE"] = "on"
    assert staff_client.post(url, data).status_code == 302
    assert not model.traffic_rules.exists()
    assert DeployedModel.objects.filter(pk=other.pk).exists()  # a deleted rule takes no model with it
