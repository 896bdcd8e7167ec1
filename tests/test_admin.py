"""The admin is the operators' main tool: every page renders, secrets never leak, actions go through services."""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.messages import get_messages
from django.forms import SplitDateTimeWidget
from django.test import Client, RequestFactory
from django.urls import reverse

from accounts.models import AccessGroup, ApiKey, User
from accounts.services import create_api_key
from billing.models import Balance, CreditTransaction, Tariff, TransactionKind
from billing.services import Usage, charge_usage
from gateway.models import DeployedModel, Endpoint, InferenceRequest, JobState, RequestLog, StoredFile
from gateway.services import add_endpoint, add_model
from routing_rules.services import add_traffic_rule

UPSTREAM_CREDENTIAL = "upstream-credential-do-not-show"
SECRET_PATTERN = re.compile(r"sk-[A-Za-z0-9_-]{43}")


@pytest.fixture
def populated(admin_user: User, user_with_credits: User, user_without_credits: User) -> dict[str, Any]:
    """One row of everything, so changelists render their columns, not an empty table."""
    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1", api_key=UPSTREAM_CREDENTIAL)
    model = add_model(
        "gpt-test", endpoint=endpoint, input_price="1", output_price="2", public=True, groups=["research"]
    )
    other = add_model("gpt-small", endpoint=endpoint, flex_input_price="0.5", flex_output_price="1")
    add_traffic_rule(model, purpose="batch", action="redirect", target=other)
    api_key, _ = create_api_key(user_with_credits, name="ci")
    charge_usage(
        Usage(
            user_id=user_with_credits.pk,
            source_id="req-1",
            model_alias="gpt-test",
            tier="realtime",
            input_tokens=1000,
            output_tokens=500,
            cost=Decimal("0.002"),
        )
    )
    job = InferenceRequest.objects.create(
        owner=user_with_credits,
        api_key=api_key,
        model_alias="gpt-test",
        path="/chat/completions",
        service_tier="flex",
        request_body={"model": "gpt-test", "messages": []},
    )
    RequestLog.objects.create(
        request_id="req-1",
        user=user_with_credits,
        api_key=api_key,
        model_alias="gpt-test",
        path="/chat/completions",
        service_tier="realtime",
        status_code=200,
        latency_ms=12.5,
        ttfb_ms=3.0,
        input_tokens=1000,
        output_tokens=500,
        cost=Decimal("0.002"),
    )
    stored_file = StoredFile.objects.create(
        owner=user_with_credits, filename="notes.txt", purpose="user_data", bytes=120, storage_name="1/file-admin"
    )
    return {"endpoint": endpoint, "model": model, "other": other, "api_key": api_key, "job": job, "file": stored_file}


def form_data(response: Any) -> dict[str, Any]:
    """The POST a browser would send for an admin change page as rendered (main form and inlines)."""
    data: dict[str, Any] = {}
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        data.update({f"{formset.prefix}-{k}": v for k, v in formset.management_form.initial.items()})
        forms.extend(formset.forms)
    for form in forms:
        for name, field in form.fields.items():
            value, key = form[name].value(), form.add_prefix(name)
            if value is None or value is False:
                continue
            if value is True:
                data[key] = "on"
            elif isinstance(value, list | tuple):
                data[key] = [str(getattr(v, "pk", v)) for v in value]
            elif isinstance(field.widget, SplitDateTimeWidget):
                data[f"{key}_0"], data[f"{key}_1"] = value.date().isoformat(), value.time().isoformat()
            else:
                data[key] = str(getattr(value, "pk", value))
    return data


def test_every_admin_page_renders_for_a_superuser(staff_client: Client, admin_user: User, populated: dict) -> None:
    request = RequestFactory().get("/admin/")
    request.user = admin_user
    for model, model_admin in admin.site._registry.items():
        opts = model._meta
        changelist = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        assert staff_client.get(changelist).status_code == 200, changelist
        assert staff_client.get(changelist, {"q": "gpt"}).status_code == 200, changelist
        if model_admin.has_add_permission(request):
            add = reverse(f"admin:{opts.app_label}_{opts.model_name}_add")
            assert staff_client.get(add).status_code == 200, add
        obj = model_admin.get_queryset(request).first()
        if obj is not None:
            change = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
            assert staff_client.get(change).status_code == 200, change


def test_the_ledger_link_from_a_users_balance_filters_the_ledger(
    staff_client: Client, user_with_credits: User, user_without_credits: User
) -> None:
    response = staff_client.get(reverse("admin:accounts_user_changelist"))
    link = re.search(rf'href="([^"]*user__id__exact={user_with_credits.pk})"', response.content.decode())
    assert link is not None
    ledger = staff_client.get(link.group(1).replace("&amp;", "&"))
    assert ledger.status_code == 200
    assert [row.user for row in ledger.context["cl"].result_list] == [user_with_credits]


def test_an_api_key_made_in_the_admin_shows_its_secret_once_and_never_again(
    staff_client: Client, user_with_credits: User
) -> None:
    response = staff_client.post(
        reverse("admin:accounts_apikey_add"),
        {"owner": user_with_credits.pk, "name": "laptop", "purpose": "batch", "requests_per_second": "5"},
        follow=True,
    )
    assert response.status_code == 200
    shown = SECRET_PATTERN.findall(response.content.decode())
    assert len(set(shown)) == 1
    secret = shown[0]
    api_key = ApiKey.objects.get(name="laptop")
    assert (api_key.owner, api_key.purpose, api_key.requests_per_second) == (user_with_credits, "batch", 5)
    assert api_key.secret_hash == hashlib.sha256(secret.encode()).hexdigest()

    for url in (
        reverse("admin:accounts_apikey_change", args=[api_key.pk]),
        reverse("admin:accounts_apikey_changelist"),
        reverse("admin:accounts_user_change", args=[user_with_credits.pk]),
    ):
        html = staff_client.get(url).content.decode()
        assert secret not in html, url
        assert api_key.secret_hash not in html, url
        assert api_key.prefix in html, url


def test_an_invalid_api_key_form_creates_no_key(staff_client: Client, user_with_credits: User) -> None:
    response = staff_client.post(
        reverse("admin:accounts_apikey_add"),
        {"owner": user_with_credits.pk, "name": "bad", "purpose": "realtime", "burst_size": "10"},
    )
    assert response.status_code == 200  # the form again, with the constraint's message
    assert response.context["adminform"].form.errors
    assert not ApiKey.objects.filter(name="bad").exists()


def test_the_revoke_action_revokes_keys_and_keys_cannot_be_deleted(
    staff_client: Client, user_with_credits: User
) -> None:
    api_key, _ = create_api_key(user_with_credits, name="old")
    response = staff_client.post(
        reverse("admin:accounts_apikey_changelist"), {"action": "revoke", "_selected_action": [api_key.pk]}
    )
    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
    assert staff_client.get(reverse("admin:accounts_apikey_delete", args=[api_key.pk])).status_code == 403


def test_the_grant_credits_action_asks_for_an_amount_then_grants_it(
    staff_client: Client, admin_user: User, user_with_credits: User, user_without_credits: User
) -> None:
    url = reverse("admin:accounts_user_changelist")
    selected = [user_with_credits.pk, user_without_credits.pk]
    form = staff_client.post(url, {"action": "grant_credits_action", "_selected_action": selected})
    assert form.status_code == 200
    assert 'name="amount"' in form.content.decode()
    assert Balance.objects.get(user=user_with_credits).amount == Decimal(100)  # nothing yet

    done = staff_client.post(
        url,
        {
            "action": "grant_credits_action",
            "_selected_action": selected,
            "apply": "1",
            "amount": "25.5",
            "description": "bonus",
        },
    )
    assert done.status_code == 302
    assert Balance.objects.get(user=user_with_credits).amount == Decimal("125.5")
    assert Balance.objects.get(user=user_without_credits).amount == Decimal("25.5")
    grant = CreditTransaction.objects.filter(user=user_without_credits).get()
    assert (grant.kind, grant.description, grant.created_by) == (TransactionKind.ADMIN_GRANT, "bonus", admin_user)


def test_a_bad_amount_in_the_grant_form_shows_the_error_and_grants_nothing(
    staff_client: Client, user_with_credits: User
) -> None:
    url = reverse("admin:accounts_user_changelist")
    for amount in ("-5", "0", "lots", "1e20"):
        response = staff_client.post(
            url,
            {
                "action": "grant_credits_action",
                "_selected_action": [user_with_credits.pk],
                "apply": "1",
                "amount": amount,
            },
        )
        assert response.status_code == 200, amount
        assert response.context["form"].errors["amount"], amount
    assert CreditTransaction.objects.filter(user=user_with_credits).count() == 1  # the initial credits only


def test_the_remove_credits_action_may_take_a_balance_below_zero(
    staff_client: Client, user_without_credits: User
) -> None:
    staff_client.post(
        reverse("admin:accounts_user_changelist"),
        {"action": "remove_credits_action", "_selected_action": [user_without_credits.pk], "apply": "1", "amount": "3"},
    )
    assert Balance.objects.get(user=user_without_credits).amount == Decimal(-3)


def test_editing_a_users_access_groups_in_the_admin_changes_membership(
    staff_client: Client, user_with_credits: User
) -> None:
    staff = AccessGroup.objects.create(name="staff")
    url = reverse("admin:accounts_user_change", args=[user_with_credits.pk])
    data = form_data(staff_client.get(url))
    data["access_groups"] = [str(staff.pk)]
    assert staff_client.post(url, data).status_code == 302
    assert list(user_with_credits.access_groups.values_list("name", flat=True)) == ["staff"]


def test_the_endpoint_change_page_never_renders_the_stored_credential(staff_client: Client) -> None:
    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1", api_key=UPSTREAM_CREDENTIAL)
    url = reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    page = staff_client.get(url)
    listing = staff_client.get(reverse("admin:gateway_endpoint_changelist")).content.decode()
    for shown in (page.content.decode(), listing):
        assert UPSTREAM_CREDENTIAL not in shown
        assert endpoint.api_key_encrypted not in shown  # nor the encrypted value

    data = form_data(page)
    assert not data.get("api_key")
    data["timeout_seconds"] = "30"
    assert staff_client.post(url, data).status_code == 302
    endpoint.refresh_from_db()
    assert (endpoint.decrypt_credential(), endpoint.timeout_seconds) == (UPSTREAM_CREDENTIAL, 30)  # blank kept it

    data["api_key"] = "a-new-credential"
    staff_client.post(url, data)
    endpoint.refresh_from_db()
    assert endpoint.decrypt_credential() == "a-new-credential"

    data["api_key"], data["clear_api_key"] = "", "on"
    staff_client.post(url, data)
    endpoint.refresh_from_db()
    assert endpoint.api_key_encrypted == ""


def test_everyones_delete_page_is_refused(staff_client: Client) -> None:
    everyone = AccessGroup.objects.everyone()
    response = staff_client.get(reverse("admin:accounts_accessgroup_delete", args=[everyone.pk]))
    assert response.status_code == 403
    staff_client.post(reverse("admin:accounts_accessgroup_delete", args=[everyone.pk]), {"post": "yes"})
    assert AccessGroup.objects.filter(pk=everyone.pk).exists()


def test_bulk_delete_of_access_groups_leaves_everyone_in_place(staff_client: Client) -> None:
    everyone = AccessGroup.objects.everyone()
    doomed = AccessGroup.objects.create(name="doomed")
    url = reverse("admin:accounts_accessgroup_changelist")
    confirm = staff_client.post(url, {"action": "delete_selected", "_selected_action": [everyone.pk, doomed.pk]})
    assert confirm.status_code == 200
    staff_client.post(url, {"action": "delete_selected", "_selected_action": [everyone.pk, doomed.pk], "post": "yes"})
    assert list(AccessGroup.objects.values_list("name", flat=True)) == ["Everyone"]


def test_everyone_cannot_be_renamed_in_the_admin(staff_client: Client) -> None:
    everyone = AccessGroup.objects.everyone()
    url = reverse("admin:accounts_accessgroup_change", args=[everyone.pk])
    page = staff_client.get(url)
    assert "name" not in page.context["adminform"].form.fields
    data = form_data(page)
    data["name"] = "Nobody"
    assert staff_client.post(url, data).status_code == 302
    everyone.refresh_from_db()
    assert everyone.name == "Everyone"


def test_changing_a_price_in_the_admin_opens_a_new_tariff_version(staff_client: Client, populated: dict) -> None:
    model: DeployedModel = populated["model"]
    url = reverse("admin:gateway_deployedmodel_change", args=[model.pk])
    data = form_data(staff_client.get(url))
    assert Decimal(data["realtime_input_price"]) == 1
    data["realtime_input_price"] = "3"
    response = staff_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    rows = Tariff.objects.filter(model=model, tier="realtime").order_by("valid_from")
    assert [(r.input_price, r.output_price, r.valid_until is None) for r in rows] == [
        (Decimal(1), Decimal(2), False),
        (Decimal(3), Decimal(2), True),
    ]
    # Saving again without a change opens no version.
    staff_client.post(url, form_data(staff_client.get(url)))
    assert Tariff.objects.filter(model=model).count() == 2


def test_a_model_made_in_the_admin_gets_its_prices_and_groups(staff_client: Client, populated: dict) -> None:
    research = AccessGroup.objects.get(name="research")
    response = staff_client.post(
        reverse("admin:gateway_deployedmodel_add"),
        {
            "alias": "new-model",
            "upstream_model": "upstream-name",
            "endpoint": populated["endpoint"].pk,
            "kind": "chat",
            "flex_concurrency": "10",
            "realtime_input_price": "0.5",
            "access_groups": [research.pk],
            "tariffs-TOTAL_FORMS": "0",
            "tariffs-INITIAL_FORMS": "0",
            "traffic_rules-TOTAL_FORMS": "1",
            "traffic_rules-INITIAL_FORMS": "0",
            "traffic_rules-0-purpose": "batch",
            "traffic_rules-0-action": "deny",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    model = DeployedModel.objects.get(alias="new-model")
    tariff = Tariff.objects.current().get(model=model)
    assert (tariff.tier, tariff.input_price, tariff.output_price) == ("realtime", Decimal("0.5"), Decimal(0))
    assert list(model.access_groups.all()) == [research]
    assert model.traffic_rules.get().action == "deny"


def test_a_redirect_rule_to_itself_is_refused_in_the_admin(staff_client: Client, populated: dict) -> None:
    model = populated["other"]
    response = staff_client.post(
        reverse("admin:routing_rules_trafficrule_add"),
        {"model": model.pk, "purpose": "realtime", "action": "redirect", "target": model.pk},
    )
    assert response.status_code == 200
    assert "cannot redirect to itself" in response.content.decode()


def test_models_are_retired_by_the_retire_action_not_deleted(staff_client: Client, populated: dict) -> None:
    model = populated["other"]
    staff_client.post(
        reverse("admin:gateway_deployedmodel_changelist"), {"action": "retire", "_selected_action": [model.pk]}
    )
    model.refresh_from_db()
    assert model.deleted_at is not None
    assert staff_client.get(reverse("admin:gateway_deployedmodel_delete", args=[model.pk])).status_code == 403


def test_history_tables_are_read_only(staff_client: Client, populated: dict) -> None:
    entry = CreditTransaction.objects.first()
    assert entry is not None
    for name, pk in (
        ("billing_credittransaction", entry.pk),
        ("gateway_inferencerequest", populated["job"].pk),
        ("gateway_requestlog", RequestLog.objects.get().pk),
        ("gateway_storedfile", populated["file"].pk),
    ):
        assert staff_client.get(reverse(f"admin:{name}_add")).status_code == 403, name
        assert staff_client.get(reverse(f"admin:{name}_delete", args=[pk])).status_code == 403, name
        page = staff_client.get(reverse(f"admin:{name}_change", args=[pk]))
        assert page.status_code == 200, name
        assert not page.context["has_change_permission"], name


def test_the_cancel_action_cancels_unfinished_jobs(staff_client: Client, populated: dict) -> None:
    job = populated["job"]
    response = staff_client.post(
        reverse("admin:gateway_inferencerequest_changelist"), {"action": "cancel", "_selected_action": [job.pk]}
    )
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.state == JobState.CANCELED
    assert [str(m) for m in get_messages(response.wsgi_request)] == ["Canceled 1 job."]


@pytest.mark.parametrize(
    ("admin_name", "record"), [("gateway_inferencerequest", "job"), ("gateway_storedfile", "file")]
)
def test_a_record_can_be_found_by_the_id_clients_see(staff_client: Client, populated: dict, admin_name, record) -> None:
    response = staff_client.get(reverse(f"admin:{admin_name}_changelist"), {"q": populated[record].public_id})
    assert list(response.context["cl"].result_list) == [populated[record]]


def test_the_endpoint_list_shows_only_whether_a_credential_is_set(staff_client: Client, populated: dict) -> None:
    Endpoint.objects.create(name="keyless", base_url="http://127.0.0.1:8/v1")
    html = staff_client.get(reverse("admin:gateway_endpoint_changelist")).content.decode()
    assert UPSTREAM_CREDENTIAL not in html
    assert 'alt="True"' in html and 'alt="False"' in html


def test_each_admin_edit_reaches_the_auth_snapshot(
    staff_client: Client, populated: dict, user_with_credits: User, django_capture_on_commit_callbacks: Any
) -> None:
    from gateway.snapshot import get_snapshot

    api_key, model = populated["api_key"], populated["other"]
    staff = AccessGroup.objects.create(name="staff")
    user_url = reverse("admin:accounts_user_change", args=[user_with_credits.pk])
    data = form_data(staff_client.get(user_url))
    data["access_groups"] = [str(staff.pk)]
    before = get_snapshot()
    assert api_key.secret_hash in before.keys and model.alias in before.models

    with django_capture_on_commit_callbacks(execute=True):
        staff_client.post(
            reverse("admin:accounts_apikey_changelist"), {"action": "revoke", "_selected_action": [api_key.pk]}
        )
    assert api_key.secret_hash not in get_snapshot().keys

    with django_capture_on_commit_callbacks(execute=True):
        staff_client.post(
            reverse("admin:gateway_deployedmodel_changelist"), {"action": "retire", "_selected_action": [model.pk]}
        )
    assert model.alias not in get_snapshot().models

    with django_capture_on_commit_callbacks(execute=True):
        staff_client.post(user_url, data)
    assert get_snapshot().user_groups[user_with_credits.pk] == frozenset({staff.pk})
