"""GET /metrics: off by default, guarded by a token (or loopback), and exposing what calls caused."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from accounts.services import create_api_key
from tests.conftest import HELLO, REALTIME_COST, GatewayProcess, settle, wait_for
from tests.upstream import COMPLETION_TOKENS, PROMPT_TOKENS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str, token: str = "") -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metrics_on(settings, transactional_db):  # type: ignore[no-untyped-def]
    # A scrape counts the flex queue in the database.
    settings.GATEWAY_METRICS = True
    settings.GATEWAY_METRICS_TOKEN = ""
    return settings


def test_metrics_are_not_served_when_off(settings, gateway_server):
    settings.GATEWAY_METRICS = False
    assert httpx.get(f"{gateway_server.url}/metrics", timeout=10).status_code == 404


def test_metrics_are_refused_without_their_token(metrics_on, gateway_server):
    metrics_on.GATEWAY_METRICS_TOKEN = "scrape-secret"
    url = f"{gateway_server.url}/metrics"
    missing = httpx.get(url, timeout=10)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert (
        "gen_ai_server_request_duration_seconds"
        in httpx.get(url, headers={"Authorization": "Bearer scrape-secret"}, timeout=10).text
    )


def test_without_a_token_only_loopback_clients_read_metrics(metrics_on, gateway_server, client):
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert httpx.get(f"{gateway_server.url}/metrics", timeout=10).status_code == 200


def test_a_call_moves_its_request_count_duration_and_tokens_by_one_call(metrics_on, world, user_with_credits, make_key):
    key = make_key(user_with_credits)
    labels = {"model": "gpt-test", "tier": "realtime"}
    before = scrape(world.url)
    world.client(key).chat.completions.create(model="gpt-test", messages=HELLO)
    settle()  # the usage writer has charged it
    after = scrape(world.url)

    def moved(name: str, **more: str) -> float:
        return value(after, name, **labels, **more) - value(before, name, **labels, **more)

    assert moved("gen_ai_server_request_duration_seconds_count", status="200") == 1
    assert moved("gen_ai_server_request_duration_seconds_bucket", status="200", le="+Inf") == 1
    assert moved("dwctl_upstream_time_to_first_byte_seconds_count") == 1
    assert moved("gen_ai_client_token_usage_sum", token_type="input") == PROMPT_TOKENS
    assert moved("gen_ai_client_token_usage_sum", token_type="output") == COMPLETION_TOKENS
    assert moved("gen_ai_client_token_usage_count", token_type="input") == 1
    assert Decimal(str(moved("dwctl_credits_charged_total"))).quantize(REALTIME_COST) == REALTIME_COST


def test_refusals_are_counted_with_their_status_and_no_alias_the_client_made_up(
    metrics_on, world, user_with_credits, make_key
):
    key = make_key(user_with_credits)
    before = scrape(world.url)
    with pytest.raises(openai.AuthenticationError):
        world.client("sk-not-a-key").chat.completions.create(model="gpt-test", messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        world.client(key).chat.completions.create(model="made-up-model-name", messages=HELLO)
    after = scrape(world.url)
    name = "gen_ai_server_request_duration_seconds_count"
    for status in ("401", "404"):
        refused = {"model": "", "tier": "realtime", "status": status}
        assert value(after, name, **refused) - value(before, name, **refused) == 1
    assert not any(("model", "made-up-model-name") in labels for _, labels in after)


def test_an_upstream_error_is_counted_by_its_endpoint(metrics_on, world, user_with_credits, make_key):
    key = make_key(user_with_credits)
    before = scrape(world.url)
    with pytest.raises(openai.InternalServerError):
        world.client(key).chat.completions.create(model="fail-500", messages=HELLO)
    after = scrape(world.url)
    name = "dwctl_upstream_errors_total"
    assert value(after, name, endpoint="fake", status="500") - value(before, name, endpoint="fake", status="500") == 1


def test_queued_flex_jobs_are_counted_per_model(metrics_on, world, user_with_credits, make_key):
    key = make_key(user_with_credits)
    world.client(key).responses.create(model="gpt-test", input="hi", service_tier="flex", background=True)
    samples = scrape(world.url)  # no worker runs: the job waits
    assert value(samples, "dwctl_flex_queue_depth", model="gpt-test") == 1
    assert value(samples, "dwctl_flex_in_flight", model="gpt-test") == 0


def test_a_snapshot_rebuild_and_its_check_are_exposed(metrics_on, world, user_with_credits):
    rebuilds = scrape(world.url).get(("dwctl_auth_snapshot_rebuild_seconds_count", frozenset()), 0.0)
    create_api_key(user_with_credits, name="moves-the-snapshot")
    wait_for(lambda: value(scrape(world.url), "dwctl_auth_snapshot_rebuild_seconds_count") > rebuilds)
    checked = "dwctl_auth_snapshot_checked_timestamp_seconds"
    checks = [v for (name, _), v in scrape(world.url).items() if name == checked]
    assert checks and min(checks) > 0


def test_several_processes_add_up_in_multiprocess_mode(world, user_with_credits, make_key, tmp_path):
    key = make_key(user_with_credits)
    env = {"GATEWAY_METRICS": "on", "GATEWAY_METRICS_TOKEN": "t0k", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with GatewayProcess(**env) as first, GatewayProcess(**env) as second:
        for gateway in (first, second):
            client = openai.OpenAI(base_url=f"{gateway.url}/ai/v1", api_key=key, max_retries=0, timeout=20)
            client.chat.completions.create(model="gpt-test", messages=HELLO)
        labels = {"model": "gpt-test", "tier": "realtime", "status": "200"}
        samples = scrape(first.url, "t0k")
        assert value(samples, "gen_ai_server_request_duration_seconds_count", **labels) == 2

        def snapshot_checks() -> list[float]:
            checked = "dwctl_auth_snapshot_checked_timestamp_seconds"
            return [v for (name, _), v in scrape(first.url, "t0k").items() if name == checked]

        # One per process that watches a snapshot, none left at 0 by a process that does not.
        wait_for(lambda: len(snapshot_checks()) == 2)
        assert min(snapshot_checks()) > 0
        # Each process's usage writer charges its own call and counts it.
        wait_for(
            lambda: (
                value(scrape(second.url, "t0k"), "dwctl_credits_charged_total", model="gpt-test", tier="realtime")
                > float(REALTIME_COST) * 1.5
            )
        )


def test_a_flex_call_is_counted_where_the_worker_records_it(
    metrics_on, world, flex_worker, user_with_credits, make_key
):
    key = make_key(user_with_credits)
    labels = {"model": "gpt-test", "tier": "flex", "status": "200"}
    name = "gen_ai_server_request_duration_seconds_count"
    before = value(scrape(world.url), name, **labels)
    world.client(key).chat.completions.create(model="gpt-test", messages=HELLO, service_tier="flex")
    after = scrape(world.url)
    assert value(after, name, **labels) - before == 1
    assert value(after, "gen_ai_client_token_usage_count", model="gpt-test", tier="flex", token_type="input") >= 1
