"""The management API's users, access groups with their members and models, and API keys: each written
through the services the admin and the commands use, and seen by the gateway's own checks."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import AccessGroup, ApiKey, User
from accounts.services import hash_secret
from billing.models import CreditTransaction, TransactionKind
from gateway.services import add_endpoint, add_model
from tests.management_client import error_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def model(db):  # type: ignore[no-untyped-def]
    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1")
    return add_model("gpt-x", endpoint=endpoint, input_price="1", output_price="2")


# --- users ----------------------------------------------------------------------------------


def test_a_user_is_created_with_groups_and_an_opening_balance_in_the_ledger(api):
    response = api.post("/users", {"username": "dana", "groups": ["research"], "credits": "12.5"})
    assert response.status_code == 201
    body = response.json()
    assert (body["username"], body["balance"], body["groups"], body["is_staff"]) == (
        "dana",
        "12.5",
        ["research"],
        False,
    )
    user = User.objects.get(username="dana")
    assert not user.has_usable_password()
    entry = CreditTransaction.objects.get(user=user)
    assert (entry.kind, str(entry.amount.normalize())) == (TransactionKind.ADMIN_GRANT, "12.5")


def test_a_username_already_taken_is_a_400_and_nothing_is_written(api, user_with_credits):
    response = api.post("/users", {"username": "alice", "credits": "5"})
    assert response.status_code == 400
    assert "already exists" in error_of(response)["message"]
    assert CreditTransaction.objects.filter(user=user_with_credits).count() == 1  # only the persona's


def test_users_are_listed_paginated_and_searched(api, user_with_credits, user_without_credits, outsider):
    page = api.get("/users", limit=2, offset=0).json()
    assert page["count"] == 4
    assert [user["username"] for user in page["items"]] == ["admin", "alice"]
    assert [user["username"] for user in api.get("/users", search="mall").json()["items"]] == ["mallory"]


def test_a_page_larger_than_the_limit_is_a_400_naming_it(api):
    response = api.get("/users", limit=1001)
    assert response.status_code == 400
    assert error_of(response)["param"] == "limit"


def test_a_user_is_read_and_changed(api, user_with_credits):
    assert api.get(f"/users/{user_with_credits.pk}").json()["balance"] == "100"
    response = api.patch(
        f"/users/{user_with_credits.pk}", {"email": "alice@example.com", "is_staff": True, "password": "s3cret-pass"}
    )
    assert response.status_code == 200
    assert (response.json()["email"], response.json()["is_staff"]) == ("alice@example.com", True)
    user_with_credits.refresh_from_db()
    assert user_with_credits.check_password("s3cret-pass")


def test_a_bad_email_is_a_400_naming_it_and_nothing_changes(api, user_with_credits):
    response = api.patch(f"/users/{user_with_credits.pk}", {"email": "not an email", "is_staff": True})
    assert response.status_code == 400
    assert error_of(response)["param"] == "email"
    user_with_credits.refresh_from_db()
    assert (user_with_credits.email, user_with_credits.is_staff) == ("", False)


# --- access groups and memberships ----------------------------------------------------------


def test_a_group_is_created_renamed_and_deleted(api):
    created = api.post("/groups", {"name": "ops", "description": "on call"})
    assert created.status_code == 201
    group_id = created.json()["id"]
    assert created.json()["member_count"] == 0
    assert api.patch(f"/groups/{group_id}", {"name": "operations"}).json()["name"] == "operations"
    assert api.delete(f"/groups/{group_id}").status_code == 204
    assert not AccessGroup.objects.filter(pk=group_id).exists()
    assert api.get(f"/groups/{group_id}").status_code == 404


def test_a_group_name_already_taken_is_a_400_naming_it(api, user_with_credits):
    response = api.post("/groups", {"name": "research"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "name"


def test_everyone_cannot_be_renamed_deleted_or_given_members(api, user_with_credits):
    everyone = AccessGroup.objects.everyone()
    assert api.patch(f"/groups/{everyone.pk}", {"name": "All"}).status_code == 400
    assert api.delete(f"/groups/{everyone.pk}").status_code == 400
    assert api.put(f"/groups/{everyone.pk}/members/{user_with_credits.pk}").status_code == 400
    assert AccessGroup.objects.filter(pk=everyone.pk, name="Everyone").exists()
    listed = api.get(f"/groups/{everyone.pk}/members").json()
    assert listed["count"] == User.objects.count()  # every user is in it
    assert api.get(f"/groups/{everyone.pk}").json()["member_count"] is None


def test_members_are_added_listed_and_removed(api, user_with_credits, outsider):
    research = AccessGroup.objects.get(name="research")
    assert api.put(f"/groups/{research.pk}/members/{outsider.pk}").status_code == 204
    assert api.put(f"/groups/{research.pk}/members/{outsider.pk}").status_code == 204  # twice: still one
    names = [user["username"] for user in api.get(f"/groups/{research.pk}/members").json()["items"]]
    assert names == ["alice", "mallory"]
    assert api.get(f"/users/{outsider.pk}").json()["groups"] == ["research"]
    assert api.delete(f"/groups/{research.pk}/members/{outsider.pk}").status_code == 204
    assert not research.members.filter(pk=outsider.pk).exists()


def test_a_member_that_does_not_exist_is_a_404(api, user_with_credits):
    research = AccessGroup.objects.get(name="research")
    response = api.put(f"/groups/{research.pk}/members/424242")
    assert response.status_code == 404
    assert error_of(response)["message"] == "No user 424242."


def test_a_model_is_attached_to_a_group_and_taken_out(api, model, user_with_credits):
    research = AccessGroup.objects.get(name="research")
    assert api.put(f"/groups/{research.pk}/models/{model.pk}").status_code == 204
    assert api.get(f"/groups/{research.pk}").json()["models"] == ["gpt-x"]
    assert api.get(f"/models/{model.pk}").json()["groups"] == ["research"]
    assert api.delete(f"/groups/{research.pk}/models/{model.pk}").status_code == 204
    assert not research.models.exists()


# --- API keys -------------------------------------------------------------------------------


def test_a_key_is_created_with_its_secret_shown_once(api, user_with_credits):
    response = api.post(
        "/keys",
        {
            "owner_id": user_with_credits.pk,
            "name": "ci",
            "purpose": "batch",
            "requests_per_second": 5,
            "burst_size": 10,
            "spend_limit": "2.5",
            "spend_window": "day",
        },
    )
    assert response.status_code == 201
    created = response.json()
    secret = created["secret"]
    assert secret.startswith("sk-") and len(secret) == 46
    assert secret.startswith(created["prefix"])
    stored = ApiKey.objects.get(pk=created["id"])
    assert stored.secret_hash == hash_secret(secret)  # only its hash is kept
    assert (created["purpose"], created["spend_limit"], created["spend_window"], created["status"]) == (
        "batch",
        "2.5",
        "day",
        "active",
    )
    # Never again: not when read, not when listed.
    again = api.get(f"/keys/{created['id']}")
    assert "secret" not in again.json() and secret not in again.content.decode()
    listed = api.get("/keys", owner_id=user_with_credits.pk)
    assert secret not in listed.content.decode()
    assert [key["name"] for key in listed.json()["items"]] == ["ci"]


def test_a_key_for_an_unknown_purpose_is_a_400_naming_it(api, user_with_credits):
    response = api.post("/keys", {"owner_id": user_with_credits.pk, "purpose": "everything"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "purpose"
    assert not ApiKey.objects.filter(owner=user_with_credits).exists()


def test_a_keys_limits_change_and_a_null_removes_one(api, user_with_credits):
    key_id = api.post("/keys", {"owner_id": user_with_credits.pk, "requests_per_second": 5}).json()["id"]
    changed = api.patch(f"/keys/{key_id}", {"tokens_per_minute": 1000, "requests_per_second": None}).json()
    assert (changed["tokens_per_minute"], changed["requests_per_second"]) == (1000, None)
    refused = api.patch(f"/keys/{key_id}", {"spend_limit": "3"})  # no window
    assert refused.status_code == 400
    assert error_of(refused)["param"] == "spend_window"
    assert ApiKey.objects.get(pk=key_id).spend_limit is None


def test_a_key_is_revoked_once_and_then_no_longer_changes(api, user_with_credits):
    key_id = api.post("/keys", {"owner_id": user_with_credits.pk}).json()["id"]
    first = api.post(f"/keys/{key_id}/revoke").json()
    assert first["status"] == "revoked"
    assert api.post(f"/keys/{key_id}/revoke").json()["revoked_at"] == first["revoked_at"]
    assert api.get("/keys", revoked=False, owner_id=user_with_credits.pk).json()["count"] == 0
    refused = api.patch(f"/keys/{key_id}", {"tokens_per_minute": 5})
    assert refused.status_code == 400
    assert "revoked" in error_of(refused)["message"]


def test_an_expired_key_reads_as_expired(api, user_with_credits):
    expires = (timezone.now() - timedelta(minutes=1)).isoformat()
    response = api.post("/keys", {"owner_id": user_with_credits.pk, "expires_at": expires})
    assert response.json()["status"] == "expired"
