"""Writing the same finished calls twice charges them once: the real-time writer and the flex settle path."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.models import Balance, CreditTransaction
from billing.services import set_tariff
from gateway.accounting import CallRecord, write_records
from gateway.jobs import create_job
from gateway.models import InferenceRequest, JobState, RequestLog
from gateway.queue import Outcome, settle_jobs
from gateway.services import add_endpoint, add_model

pytestmark = pytest.mark.django_db

COST = (Decimal("0.50") * 12 + Decimal("1.50") * 30) / Decimal(1_000_000)


@pytest.fixture
def paid_model(db):  # type: ignore[no-untyped-def]
    endpoint, _ = add_endpoint("replay", "http://127.0.0.1:9/v1")
    model = add_model("replayed", endpoint=endpoint)
    set_tariff(model, input_price="0.50", output_price="1.50")
    set_tariff(model, tier="flex", input_price="0.50", output_price="1.50")
    return model


def record(user, model, request_id: str) -> CallRecord:  # type: ignore[no-untyped-def]
    return CallRecord(
        request_id=request_id,
        user_id=user.id,
        api_key_id=None,
        model_id=model.id,
        model_alias=model.alias,
        path="chat/completions",
        tier="realtime",
        status_code=200,
        started_at=datetime.now(tz=UTC),
        latency_ms=1.0,
        input_tokens=12,
        output_tokens=30,
    )


def test_a_batch_of_call_records_written_twice_is_charged_once(user_with_credits, paid_model):
    batch = [record(user_with_credits, paid_model, uuid.uuid4().hex) for _ in range(3)]

    write_records(batch)
    write_records(batch)

    charges = CreditTransaction.objects.filter(kind="usage")
    assert sorted(charges.values_list("source_id", flat=True)) == sorted(r.request_id for r in batch)
    assert set(charges.values_list("amount", flat=True)) == {COST}
    assert RequestLog.objects.count() == 3


def test_a_segment_written_again_with_more_calls_adds_and_charges_only_the_new_ones(
    user_with_credits, paid_model, caplog
):
    # A crash after the commit and before the segment was marked done, and more calls journaled since.
    written = [record(user_with_credits, paid_model, uuid.uuid4().hex) for _ in range(4)]
    write_records(written)
    new = [record(user_with_credits, paid_model, uuid.uuid4().hex) for _ in range(3)]

    write_records([*new[:1], *written, *new[1:], new[0]])  # new[0] twice in one batch: still once

    calls = [*written, *new]
    assert sorted(RequestLog.objects.values_list("request_id", flat=True)) == sorted(
        f"req_{r.request_id}" for r in calls
    )
    charges = CreditTransaction.objects.filter(kind="usage")
    assert sorted(charges.values_list("source_id", flat=True)) == sorted(r.request_id for r in calls)
    assert Balance.objects.amount_of(user_with_credits) == Decimal(100) - len(calls) * COST
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # no record refused


def test_a_flex_outcome_settled_twice_is_charged_once(user_with_credits, paid_model):
    job_id = uuid.uuid4()
    create_job(
        job_id=job_id,
        owner_id=user_with_credits.id,
        api_key_id=None,
        model_alias=paid_model.alias,
        path="chat/completions",
        request_body={"model": paid_model.alias},
        service_tier="flex",
        state=JobState.PROCESSING,
        claimed_by="worker-a",
    )
    outcome = Outcome(
        job_id=job_id, status=200, body={"ok": True}, model_id=paid_model.id, input_tokens=12, output_tokens=30
    )

    first = settle_jobs("worker-a", [outcome])
    again = settle_jobs("worker-a", [outcome])

    assert (first, again) == ({job_id: "completed"}, {job_id: None})
    assert list(CreditTransaction.objects.filter(kind="usage").values_list("source_id", "amount")) == [
        (str(job_id), COST)
    ]
    assert InferenceRequest.objects.get(pk=job_id).cost == COST
