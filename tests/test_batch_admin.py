"""Batches in the admin: progress, cost so far, status filter, the cancel action, the lines of a batch;
batch prices per completion window on the model page and from add_model."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.models import Tariff
from billing.services import tariff_for
from gateway.batch_models import Batch
from gateway.models import DeployedModel, InferenceRequest, JobState
from gateway.services import add_endpoint, add_model
from tests.test_admin import form_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def batch(user_with_credits) -> Batch:  # type: ignore[no-untyped-def]
    now = timezone.now()
    batch = Batch.objects.create(
        owner=user_with_credits,
        input_file_public_id="file-0",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        status="in_progress",
        total=3,
        expires_at=now + timedelta(hours=24),
    )
    for number, (state, cost) in enumerate(
        [(JobState.COMPLETED, Decimal("0.25")), (JobState.COMPLETED, Decimal("0.5")), (JobState.PENDING, None)],
        start=1,
    ):
        InferenceRequest.objects.create(
            id=uuid.uuid4(),
            owner=user_with_credits,
            model_alias="gpt-test",
            path="chat/completions",
            service_tier="batch",
            state=state,
            cost=cost,
            request_body={"model": "gpt-test"},
            batch=batch,
            line_number=number,
            custom_id=f"line-{number}",
        )
    InferenceRequest.objects.create(  # a flex job: not a line of the batch
        owner=user_with_credits, model_alias="gpt-test", path="chat/completions", request_body={}
    )
    return batch


def test_the_batch_list_shows_progress_and_cost_so_far_and_links_to_its_lines(staff_client: Client, batch: Batch):
    listing = staff_client.get(reverse("admin:gateway_batch_changelist"), {"status__exact": "in_progress"})
    page = listing.content.decode()
    assert batch.public_id in page
    assert "2 / 3" in page
    assert '<td class="field-cost_so_far">0.75</td>' in page
    lines = staff_client.get(reverse("admin:gateway_inferencerequest_changelist"), {"batch__id__exact": str(batch.pk)})
    assert lines.status_code == 200
    assert lines.context["cl"].result_count == 3
    assert (
        staff_client.get(reverse("admin:gateway_batch_changelist"), {"status__exact": "completed"})
        .context["cl"]
        .result_count
        == 0
    )


def test_the_cancel_action_cancels_a_running_batch_and_its_pending_lines(staff_client: Client, batch: Batch):
    staff_client.post(reverse("admin:gateway_batch_changelist"), {"action": "cancel", "_selected_action": [batch.pk]})
    batch.refresh_from_db()
    assert batch.status == "cancelled"  # nothing was in flight: it ends at once
    assert InferenceRequest.objects.filter(batch=batch, state=JobState.CANCELED).count() == 1
    assert batch.error_file is not None


def test_a_batch_price_per_window_is_set_in_the_model_admin(staff_client: Client, admin_user):  # type: ignore[no-untyped-def]
    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1")
    model = add_model("gpt-test", endpoint=endpoint, input_price="1", output_price="2")
    url = reverse("admin:gateway_deployedmodel_change", args=[model.pk])
    data = form_data(staff_client.get(url))
    data["batch_1h_input_price"] = "0.4"
    data["batch_1h_output_price"] = "0.8"
    response = staff_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    [tariff] = Tariff.objects.filter(model=model, tier="batch")
    assert (tariff.completion_window, tariff.input_price, tariff.output_price) == ("1h", Decimal("0.4"), Decimal("0.8"))
    assert tariff_for(model.pk, "batch", window="24h").tier == "realtime"  # no 24h price: real-time's


def test_add_model_sets_a_batch_price_for_every_window_or_the_ones_named(db):  # type: ignore[no-untyped-def]
    add_endpoint("local", "http://127.0.0.1:9/v1")
    call_command("add_model", "a", "--endpoint", "local", "--batch-input-price", "1", "--batch-output-price", "2")
    call_command(
        "add_model",
        "b",
        "--endpoint",
        "local",
        "--batch-input-price",
        "3",
        "--batch-window",
        "1h",
        "--flex-input-price",
        "5",
    )
    a, b = DeployedModel.objects.get(alias="a"), DeployedModel.objects.get(alias="b")
    assert sorted(Tariff.objects.filter(model=a).values_list("completion_window", "input_price")) == [
        ("1h", Decimal(1)),
        ("24h", Decimal(1)),
    ]
    assert tariff_for(b.pk, "batch", window="1h").input_price == 3
    assert tariff_for(b.pk, "batch", window="24h").tier == "flex"  # the fallback


def test_add_model_names_an_unknown_window(db):  # type: ignore[no-untyped-def]
    from django.core.management.base import CommandError

    add_endpoint("local", "http://127.0.0.1:9/v1")
    with pytest.raises(CommandError, match=r"Unknown completion window '2h': use one of 24h, 1h\."):
        call_command("add_model", "a", "--endpoint", "local", "--batch-input-price", "1", "--batch-window", "2h")
    assert not DeployedModel.objects.exists()
