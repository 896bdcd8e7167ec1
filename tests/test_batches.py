"""The Batch API through the official client: a file of requests in, output and error files out,
each line a job of the flex queue, charged once at the batch price of its window."""

from __future__ import annotations

from decimal import Decimal

import openai
import orjson
import pytest
from django.utils import timezone

from billing.models import CreditTransaction
from billing.services import create_user, set_tariff
from gateway.batch_models import Batch
from gateway.models import DeployedModel, InferenceRequest
from routing_rules.models import TrafficRule
from tests.conftest import WorkerThread, balance_of, upstream_calls, wait_for
from tests.test_flex_queue import kill_cluster, start_cluster
from tests.upstream import COMPLETION_TOKENS, PROMPT_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)

BATCH_IN = Decimal("0.10")
BATCH_OUT = Decimal("0.20")
BATCH_COST = (BATCH_IN * PROMPT_TOKENS + BATCH_OUT * COMPLETION_TOKENS) / Decimal(1_000_000)
ENDED = {"completed", "expired", "cancelled", "failed"}


def line(custom_id: str, model: str = "gpt-test", content: str = "hi") -> dict:  # type: ignore[type-arg]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}]},
    }


def upload(client: openai.OpenAI, *lines: dict) -> str:  # type: ignore[type-arg]
    content = b"".join(orjson.dumps(item) + b"\n" for item in lines)
    return client.files.create(file=("batch.jsonl", content), purpose="batch").id


def create(client: openai.OpenAI, *lines: dict, window: str = "24h") -> openai.types.Batch:  # type: ignore[type-arg]
    return client.batches.create(
        input_file_id=upload(client, *lines),
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
        metadata={"purpose": "test"},
    )


def finished(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> openai.types.Batch:
    return wait_for(  # type: ignore[return-value]
        lambda: (batch := client.batches.retrieve(batch_id)).status in ENDED and batch, timeout=timeout, interval=0.2
    )


def results(client: openai.OpenAI, file_id: str | None) -> list[dict]:  # type: ignore[type-arg]
    if file_id is None:
        return []
    return [orjson.loads(raw) for raw in client.files.content(file_id).read().splitlines()]


def batch_prices(*aliases: str) -> None:
    for alias in aliases:
        set_tariff(
            DeployedModel.objects.get(alias=alias),
            tier="batch",
            window="24h",
            input_price=BATCH_IN,
            output_price=BATCH_OUT,
        )


def batch_charges() -> list[CreditTransaction]:
    return list(CreditTransaction.objects.filter(kind="usage"))


def test_a_mixed_batch_completes_with_output_and_error_files_and_one_charge_per_good_line(
    world, make_key, user_with_credits
):
    batch_prices("gpt-test", "fail-400", "flaky")
    client = world.client(make_key(user_with_credits))
    before = balance_of(user_with_credits)
    with WorkerThread():
        batch = create(
            client,
            line("good-1"),
            line("bad", model="fail-400"),
            line("good-2", content="second"),
            line("flaky", model="flaky"),  # 503 twice, then an answer: retried like a flex job
        )
        assert (batch.status, batch.endpoint, batch.completion_window) == ("in_progress", "/v1/chat/completions", "24h")
        assert batch.request_counts.total == 4
        assert batch.metadata == {"purpose": "test"}
        done = finished(client, batch.id)

    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)
    assert done.completed_at and done.finalizing_at and done.in_progress_at
    output = results(client, done.output_file_id)
    assert [item["custom_id"] for item in output] == ["good-1", "good-2", "flaky"]  # input order
    for item in output:
        assert item["error"] is None
        assert item["response"]["status_code"] == 200
        assert item["response"]["request_id"].startswith("req_")
        assert item["response"]["body"]["object"] == "chat.completion"
        assert item["id"].startswith("batch_req_")
    [error] = results(client, done.error_file_id)
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["message"] == "upstream says 400"
    assert upstream_calls(world, "flaky") == 3

    charges = batch_charges()
    assert len(charges) == 3
    assert {charge.tier for charge in charges} == {"batch"}
    assert all(charge.amount == BATCH_COST for charge in charges)
    assert len({charge.source_id for charge in charges}) == 3
    assert balance_of(user_with_credits) == before - 3 * BATCH_COST
    assert [b.id for b in client.batches.list().data] == [done.id]


def test_a_batch_window_without_its_own_price_is_charged_at_the_flex_price(world, make_key, user_with_credits):
    from tests.conftest import FLEX_COST

    client = world.client(make_key(user_with_credits))
    with WorkerThread():
        done = finished(client, create(client, line("one"), window="1h").id)
    assert done.status == "completed"
    [charge] = batch_charges()
    assert (charge.tier, charge.amount) == ("batch", FLEX_COST)


def test_batches_are_listed_newest_first_a_page_at_a_time(world, make_key, user_with_credits):
    client = world.client(make_key(user_with_credits))
    ids = [create(client, line("one")).id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2]
    assert page.has_more
    rest = client.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in rest.data] == ids[:1]
    assert not rest.has_more


def test_another_users_file_and_batch_are_invisible(world, make_key, user_with_credits, outsider):
    alice = world.client(make_key(user_with_credits))
    mallory = world.client(make_key(outsider))
    file_id = upload(alice, line("one"))
    batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")

    with pytest.raises(openai.NotFoundError) as refused:
        mallory.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.body["message"] == f"No such File object: {file_id}"
    with pytest.raises(openai.NotFoundError):
        mallory.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        mallory.batches.cancel(batch.id)
    assert mallory.batches.list().data == []
    assert Batch.objects.count() == 1


def test_creation_is_refused_without_access_with_a_batch_deny_rule_and_without_credits(
    world, make_key, user_with_credits, user_without_credits, outsider
):
    # No access: the outsider is in no group that has gpt-test (the first line's model is fine).
    mallory = world.client(make_key(outsider))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        create(mallory, line("free", model="free-model"), line("paid"))
    assert refused.value.body["message"] == (
        "You do not have access to 'gpt-test'. Please contact your administrator to request access."
    )

    # A deny rule for purpose batch applies to a batch made with a real-time key.
    TrafficRule.objects.create(model=world.paid, purpose="batch", action="deny")
    alice = world.client(make_key(user_with_credits, purpose="realtime"))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        create(alice, line("paid"))
    assert refused.value.body["message"] == (
        "Batch access to 'gpt-test' is blocked by a routing rule. Please contact your administrator to request access."
    )
    assert alice.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}]).choices

    # No credits: a paid model refuses; a free one does not.
    bob = world.client(make_key(user_without_credits))
    with pytest.raises(openai.APIStatusError) as refused:
        create(bob, line("paid", model="embed-test"))
    assert refused.value.status_code == 402
    assert refused.value.body["message"] == "Account balance too low. Please add credits to continue."
    assert create(bob, line("free", model="free-model")).status == "in_progress"

    assert Batch.objects.count() == 1
    assert InferenceRequest.objects.count() == 1  # a refused batch left no line behind


def test_lines_left_when_the_window_ends_expire_into_the_error_file(world, make_key, user_with_credits, settings):
    settings.GATEWAY_BATCH_WINDOWS = {"24h": 86400, "1h": 1}
    client = world.client(make_key(user_with_credits))
    batch = create(client, line("a"), line("b"), window="1h")
    wait_for(lambda: Batch.objects.get().expires_at < timezone.now(), timeout=10)
    with WorkerThread():  # a worker that starts sweeps at once
        done = finished(client, batch.id)

    assert done.status == "expired"
    assert done.expired_at is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 2)
    assert done.output_file_id is None
    errors = results(client, done.error_file_id)
    assert [item["custom_id"] for item in errors] == ["a", "b"]
    assert {item["error"]["code"] for item in errors} == {"batch_expired"}
    assert errors[0]["response"] is None
    assert upstream_calls(world, "gpt-upstream") == 0
    assert batch_charges() == []


def test_a_batch_cancelled_mid_run_finishes_its_lines_in_flight_and_cancels_the_rest(
    world, make_key, user_with_credits
):
    cap = DeployedModel.objects.get(alias="held").flex_concurrency
    client = world.client(make_key(user_with_credits))
    with WorkerThread():
        batch = create(client, *(line(f"line-{n}", model="held", content=str(n)) for n in range(cap + 5)))
        wait_for(lambda: upstream_calls(world, "held") == cap, timeout=30)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        assert cancelling.cancelling_at is not None
        world.upstream.release.set()
        done = finished(client, batch.id)

    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    output = results(client, done.output_file_id)
    errors = results(client, done.error_file_id)
    assert len(output) == cap  # the lines in flight finished...
    assert len(errors) == 5  # ...and no other line started
    assert {item["error"]["code"] for item in errors} == {"batch_cancelled"}
    assert upstream_calls(world, "held") == cap
    assert len(batch_charges()) == cap
    assert client.batches.cancel(batch.id).status == "cancelled"  # idempotent


def test_a_user_who_runs_dry_mid_batch_has_the_remaining_lines_failed_with_the_402_message(world, make_key):
    carol = create_user("carol", credits="1", groups=["research"])
    model = DeployedModel.objects.get(alias="gpt-test")
    model.flex_concurrency = 1  # one line at a time: each sees the balance its predecessor left
    model.save()
    # 0.6 credits a line (12 input tokens at 50,000 per 1M): a credit pays for two lines at most.
    set_tariff(model, tier="batch", window="24h", input_price="50000", output_price="0")
    client = world.client(make_key(carol))
    with WorkerThread():
        done = finished(client, create(client, *(line(f"line-{n}", content=str(n)) for n in range(6))).id)

    output = results(client, done.output_file_id)
    errors = results(client, done.error_file_id)
    assert 1 <= len(output) <= 2
    assert len(output) + len(errors) == 6
    assert {item["error"]["code"] for item in errors} == {"insufficient_credits"}
    assert {item["error"]["message"] for item in errors} == {"Account balance too low. Please add credits to continue."}
    assert len(batch_charges()) == len(output)  # no free calls: every call that ran is charged
    assert upstream_calls(world, "gpt-upstream") == len(output)
    assert balance_of(carol) == Decimal(1) - len(output) * Decimal("0.6")


def test_a_line_whose_upstream_always_fails_is_tried_at_most_the_attempts_cap(
    world, make_key, user_with_credits, settings
):
    settings.GATEWAY_QUEUE_MAX_ATTEMPTS = 2
    client = world.client(make_key(user_with_credits))
    with WorkerThread():
        done = finished(client, create(client, line("doomed", model="fail-500")).id)

    assert done.status == "completed"
    assert upstream_calls(world, "fail-500") == 2
    [error] = results(client, done.error_file_id)
    assert error["response"]["status_code"] == 500
    assert InferenceRequest.objects.get().attempts == 2


def test_a_worker_killed_mid_batch_leaves_every_line_done_exactly_once(world, make_key, user_with_credits):
    batch_prices("held")
    cap = DeployedModel.objects.get(alias="held").flex_concurrency
    client = world.client(make_key(user_with_credits))
    batch = create(client, *(line(f"line-{n}", model="held", content=str(n)) for n in range(3 * cap)))

    cluster = start_cluster()
    try:
        wait_for(lambda: upstream_calls(world, "held") == cap, timeout=60, interval=0.1)  # the cap is full
    finally:
        kill_cluster(cluster)
    world.upstream.release.set()
    cluster = start_cluster()
    try:
        done = finished(client, batch.id, timeout=120)
    finally:
        kill_cluster(cluster)

    assert done.status == "completed"
    output = results(client, done.output_file_id)
    assert sorted(item["custom_id"] for item in output) == sorted(f"line-{n}" for n in range(3 * cap))
    assert [item["custom_id"] for item in output] == [f"line-{n}" for n in range(3 * cap)]
    charges = batch_charges()
    assert len(charges) == 3 * cap
    assert len({charge.source_id for charge in charges}) == 3 * cap
    assert all(charge.amount == BATCH_COST and charge.tier == "batch" for charge in charges)


def test_workers_take_flex_jobs_before_batch_lines_and_both_share_the_models_flex_concurrency(world, user_with_credits):
    import uuid

    from gateway.jobs import create_job
    from gateway.queue import claim_jobs

    def queue(tier: str) -> InferenceRequest:
        return create_job(
            job_id=uuid.uuid4(),
            owner_id=user_with_credits.pk,
            api_key_id=None,
            model_alias="gpt-test",
            path="chat/completions",
            request_body={"model": "gpt-test", "messages": []},
            service_tier=tier,
            deadline_seconds=3600,
        )

    DeployedModel.objects.filter(alias="gpt-test").update(flex_concurrency=2)
    lines = [queue("batch") for _ in range(3)]  # queued first...
    flex = queue("flex")  # ...but the flex job goes first
    assert [job.id for job in claim_jobs("worker-1", limit=1)] == [flex.id]
    assert [job.id for job in claim_jobs("worker-1", limit=10)] == [lines[0].id]  # one more fits the cap of 2
    assert claim_jobs("worker-2", limit=10) == []  # a batch line in flight counts against the cap


def test_the_attempts_cap_applies_to_flex_jobs_too(world, make_key, user_with_credits, settings):
    from tests.conftest import post

    settings.GATEWAY_QUEUE_MAX_ATTEMPTS = 2
    secret = make_key(user_with_credits)
    reply = post(
        world, secret, "responses", {"model": "fail-500", "input": "hi", "service_tier": "flex", "background": True}
    )
    assert reply.status_code == 202
    with WorkerThread():
        job = wait_for(lambda: InferenceRequest.objects.filter(state="failed").first(), timeout=30)
    assert (job.attempts, job.response_status) == (2, 500)
    assert "given up after 2 attempts" in job.error
    assert upstream_calls(world, "fail-500") == 2
