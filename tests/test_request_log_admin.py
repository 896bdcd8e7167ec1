"""The request log in the admin: readable columns, filters, search by the ids clients see, CSV export."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.models import User
from accounts.services import create_api_key
from gateway.models import RequestLog

pytestmark = pytest.mark.django_db
CHANGELIST = reverse("admin:gateway_requestlog_changelist")


@pytest.fixture
def logs(user_with_credits: User) -> list[RequestLog]:
    key, _ = create_api_key(user_with_credits, name="ci")
    common = {"model_alias": "gpt-test", "path": "chat/completions", "service_tier": "realtime"}
    return [
        RequestLog.objects.create(
            request_id="req_" + "a" * 32,
            user=user_with_credits,
            api_key=key,
            status_code=200,
            latency_ms=12.345,
            ttfb_ms=3.0,
            input_tokens=12,
            output_tokens=30,
            cost=Decimal("0.000051000"),
            **common,
        ),
        RequestLog.objects.create(
            request_id="req_" + "b" * 32,
            status_code=401,
            latency_ms=0.4,
            error_code="invalid_api_key",
            key_prefix="sk-unknown",
            client_ip="127.0.0.1",
            **common,
        ),
    ]


def shown(response) -> list[str]:  # type: ignore[no-untyped-def]
    return [log.request_id for log in response.context["cl"].result_list]


def test_the_list_reads_as_an_operator_wants_it(staff_client: Client, logs: list[RequestLog]) -> None:
    html = staff_client.get(CHANGELIST).content.decode()

    assert "12.3 ms" in html and "0.000051" in html and "0.000051000" not in html
    assert f"{logs[0].api_key.prefix}… ci" in html and "sk-unknown… (unknown)" in html
    assert "invalid_api_key" in html


def test_the_list_filters_by_status_class_and_error_code(staff_client: Client, logs: list[RequestLog]) -> None:
    assert shown(staff_client.get(CHANGELIST, {"status_class": "4"})) == [logs[1].request_id]
    assert shown(staff_client.get(CHANGELIST, {"status_class": "2"})) == [logs[0].request_id]
    assert shown(staff_client.get(CHANGELIST, {"error_code": "invalid_api_key"})) == [logs[1].request_id]


def test_a_call_is_found_by_the_id_its_client_saw(staff_client: Client, logs: list[RequestLog]) -> None:
    assert shown(staff_client.get(CHANGELIST, {"q": logs[0].request_id})) == [logs[0].request_id]
    # A /responses call's client saw resp_<the same hex>.
    assert shown(staff_client.get(CHANGELIST, {"q": "resp_" + "a" * 32})) == [logs[0].request_id]


def test_an_id_search_reads_one_row_through_the_index(staff_client: Client, logs: list[RequestLog]) -> None:
    with CaptureQueriesContext(connection) as queries:
        found = shown(staff_client.get(CHANGELIST, {"q": logs[1].request_id}))

    assert found == [logs[1].request_id]
    # A case-insensitive or contains match (UPPER, LIKE) cannot use the index: it reads the whole log.
    assert not [q["sql"] for q in queries.captured_queries if "UPPER(" in q["sql"] or " LIKE " in q["sql"]]


def test_a_username_search_finds_that_users_calls_through_the_index(
    staff_client: Client, logs: list[RequestLog]
) -> None:
    with CaptureQueriesContext(connection) as queries:
        found = shown(staff_client.get(CHANGELIST, {"q": logs[0].user.username}))

    assert found == [logs[0].request_id]
    assert not [q["sql"] for q in queries.captured_queries if "UPPER(" in q["sql"] or " LIKE " in q["sql"]]


def test_the_unfiltered_list_reads_nothing_whole(
    staff_client: Client, logs: list[RequestLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DISTINCT over the log (a date hierarchy, field filters' choices), and on PostgreSQL no COUNT(*)
    once the table is large (here: the threshold lowered, the table analyzed)."""
    monkeypatch.setattr("common.admin.EXACT_COUNT_BELOW", 1, raising=False)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {RequestLog._meta.db_table}")

    with CaptureQueriesContext(connection) as queries:
        response = staff_client.get(CHANGELIST)

    assert response.context["cl"].result_count == 2
    sql = [q["sql"] for q in queries.captured_queries if RequestLog._meta.db_table in q["sql"]]
    assert not [q for q in sql if "DISTINCT" in q]
    counted = [q for q in sql if "COUNT(" in q]
    assert not counted if connection.vendor == "postgresql" else counted
    html = response.content.decode()
    assert "Past 7 days" in html  # the date filter's fixed ranges
    assert "invalid_api_key" in html and "gpt-test" in html  # the newest calls' values as choices


def test_the_selected_calls_export_as_csv(staff_client: Client, logs: list[RequestLog]) -> None:
    response = staff_client.post(CHANGELIST, {"action": "export_csv", "_selected_action": [log.pk for log in logs]})

    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))  # type: ignore[attr-defined]
    assert response["Content-Type"].startswith("text/csv")
    assert [(row["request_id"], row["status_code"], row["error_code"]) for row in rows] == [
        (logs[0].request_id, "200", ""),
        (logs[1].request_id, "401", "invalid_api_key"),
    ]
    assert rows[0]["cost"] == "0.000051000" and rows[0]["user__username"] == "alice"
