"""What the request log adds up to: the usage dashboard's figures, a user's and a key's spend, retention."""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule

from accounts.models import ApiKey, User
from accounts.services import create_api_key
from billing.models import CreditTransaction, TransactionKind
from gateway import tasks
from gateway.models import RequestLog, UsageRollup
from gateway.usage import LATENCY_BIN, dashboard, percentiles_from_bins, prune_request_log, roll_up_usage, spend_of

_serial = iter(range(10**9))


def log(when: datetime, **fields: Any) -> RequestLog:
    values: dict[str, Any] = {
        "request_id": f"req_{next(_serial)}",
        "model_alias": "gpt-test",
        "path": "/chat/completions",
        "service_tier": "realtime",
        "status_code": 200,
        "latency_ms": 10.0,
        "created_at": when,
        **fields,
    }
    return RequestLog(**values)


@pytest.fixture
def seeded(user_with_credits: User, user_without_credits: User) -> dict[str, Any]:
    """110 calls in the last hour: 100 answered with latencies 1..100 ms (alice 95 at 0.001 credits,
    bob 5 at 0.1), 10 refused with a 401; and one call two days ago, outside 24 h."""
    now = timezone.now()
    alice_key, _ = create_api_key(user_with_credits, name="alice-ci")
    bob_key, _ = create_api_key(user_without_credits, name="bob-ci")
    rows = []
    for latency in range(1, 101):
        bob = latency > 95
        rows.append(
            log(
                now - timedelta(seconds=latency),
                user=user_without_credits if bob else user_with_credits,
                api_key=bob_key if bob else alice_key,
                model_alias="gpt-small" if bob else "gpt-test",
                latency_ms=float(latency),
                input_tokens=10,
                output_tokens=20,
                cost=Decimal("0.1") if bob else Decimal("0.001"),
            )
        )
    rows += [
        log(now - timedelta(seconds=5), status_code=401, error_code="invalid_api_key", latency_ms=0.1)
        for _ in range(10)
    ]
    rows.append(
        log(now - timedelta(days=2), user=user_with_credits, api_key=alice_key, cost=Decimal("7"), latency_ms=5000.0)
    )
    RequestLog.objects.bulk_create(rows)
    roll_up_usage()
    return {"now": now, "alice_key": alice_key, "bob_key": bob_key}


def test_the_dashboard_adds_up_the_calls_of_the_period(seeded: dict[str, Any]) -> None:
    board = dashboard("24h")
    totals = board.totals
    assert (totals.requests, totals.errors) == (110, 10)
    assert board.error_rate == pytest.approx(10 / 110)
    assert (totals.input_tokens, totals.output_tokens) == (1000, 2000)
    assert totals.spend == Decimal("0.595")
    # percentile_cont over 1..100 (the 401s are left out) is 50.5 and 99.01; the histogram is within 1 %.
    assert totals.latency[50] == pytest.approx(50.5, rel=0.01)
    assert totals.latency[99] == pytest.approx(99.01, rel=0.01)
    assert [(s.label, s.requests, s.spend) for s in board.top_users] == [
        ("bob", 5, Decimal("0.5")),
        ("alice", 95, Decimal("0.095")),
    ]
    assert [(s.label, s.spend) for s in board.top_models] == [
        ("gpt-small", Decimal("0.5")),
        ("gpt-test", Decimal("0.095")),
    ]
    assert [s.object_id for s in board.top_keys] == [seeded["bob_key"].pk, seeded["alice_key"].pk]
    assert len(board.points) in (24, 25)  # every hour of the period, the quiet ones as zeros
    assert sum(p.requests for p in board.points) == 110


def test_a_longer_period_takes_in_older_calls(seeded: dict[str, Any]) -> None:
    week = dashboard("7d")
    assert week.totals.requests == 111
    assert week.totals.spend == Decimal("7.595")
    # 101 answered calls: (n-1)·0.99 = 99 lands exactly on the 100th, the 5 s call is above it.
    assert week.totals.latency[99] == pytest.approx(100.0, rel=0.01)
    month = dashboard("30d")
    assert len(month.points) in (30, 31)
    assert month.totals.requests == 111


def test_percentiles_are_per_bucket(db: None) -> None:
    now = datetime(2026, 12, 2, 15, 30, tzinfo=UTC)
    early, late = now - timedelta(hours=3), now - timedelta(minutes=10)
    RequestLog.objects.bulk_create(
        [log(early, latency_ms=float(v)) for v in (10, 20, 30)] + [log(late, latency_ms=float(v)) for v in (100, 300)]
    )
    roll_up_usage()
    board = dashboard("24h", now=now)
    by_hour = {p.start: p.latency for p in board.points if p.requests}
    close = {"rel": 0.01}
    assert by_hour[early.replace(minute=0)] == {50: pytest.approx(20.0, **close), 99: pytest.approx(29.8, **close)}
    assert by_hour[late.replace(minute=0)] == {50: pytest.approx(200.0, **close), 99: pytest.approx(298.0, **close)}
    assert board.totals.latency[50] == pytest.approx(30.0, **close)


def exact_percentile(values: list[float], p: int) -> float:
    """PostgreSQL's percentile_cont, for checking."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * p / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def test_histogram_percentiles_are_within_one_percent_of_percentile_cont() -> None:
    rng = random.Random(13)
    values = [rng.lognormvariate(5, 1.2) for _ in range(5000)] + [0.05, 90_000.0]
    bins = Counter(math.floor(math.log(v) / math.log(LATENCY_BIN)) for v in values)
    found = percentiles_from_bins(bins)
    for p in (50, 99):
        assert found[p] == pytest.approx(exact_percentile(values, p), rel=0.01)
    assert percentiles_from_bins(Counter()) == {50: None, 99: None}


def test_rows_written_late_for_an_old_hour_are_taken_in_once(user_with_credits: User) -> None:
    now = timezone.now()
    RequestLog.objects.bulk_create([log(now - timedelta(minutes=1), user=user_with_credits, cost=Decimal("1"))])
    assert roll_up_usage() == 1
    # A journal replayed after an outage writes calls of an hour already rolled up.
    RequestLog.objects.bulk_create([log(now - timedelta(days=3), user=user_with_credits, cost=Decimal("2"))])
    roll_up_usage()
    roll_up_usage()  # a run with nothing new rebuilds the same hours: nothing counted twice
    week = dashboard("7d")
    assert (week.totals.requests, week.totals.spend) == (2, Decimal("3"))
    assert [(s.label, s.spend) for s in week.top_users] == [("alice", Decimal("3"))]


def test_spend_sums_are_exact_to_the_nano_credit(user_with_credits: User) -> None:
    now = timezone.now()
    costs = [Decimal("0.1"), Decimal("0.2"), Decimal("0.000000001"), Decimal("123456.123456789")]
    RequestLog.objects.bulk_create([log(now - timedelta(seconds=1), user=user_with_credits, cost=c) for c in costs])
    roll_up_usage()
    assert dashboard("24h").totals.spend == Decimal("123456.423456790")
    assert spend_of(user_id=user_with_credits.pk).spend_today == Decimal("123456.423456790")


def test_spend_today_and_this_month_of_a_user_and_a_key(user_with_credits: User) -> None:
    now = datetime(2026, 12, 15, 12, 0, tzinfo=UTC)
    key, _ = create_api_key(user_with_credits, name="k")
    other, _ = create_api_key(user_with_credits, name="other")
    RequestLog.objects.bulk_create(
        [
            log(now - timedelta(hours=1), user=user_with_credits, api_key=key, cost=Decimal("1.5")),
            log(now - timedelta(days=3), user=user_with_credits, api_key=key, cost=Decimal("2")),
            log(now - timedelta(days=3), user=user_with_credits, api_key=other, cost=Decimal("0.25")),
            log(now - timedelta(days=20), user=user_with_credits, api_key=key, cost=Decimal("100")),  # last month
            log(now - timedelta(minutes=5), user=user_with_credits, api_key=key, status_code=429),  # no cost
        ]
    )
    by_user = spend_of(user_id=user_with_credits.pk, now=now)
    assert (by_user.requests_today, by_user.spend_today) == (2, Decimal("1.5"))
    assert (by_user.requests_month, by_user.spend_month) == (4, Decimal("3.75"))
    by_key = spend_of(api_key_id=key.pk, now=now)
    assert (by_key.requests_month, by_key.spend_month) == (3, Decimal("3.5"))


def test_the_dashboard_page_shows_the_seeded_figures(staff_client: Client, seeded: dict[str, Any]) -> None:
    index = staff_client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:usage") in index
    page = staff_client.get(reverse("admin:usage"), {"period": "24h"})
    assert page.status_code == 200
    figures = dict(page.context["figures"])
    latency = {p: float(figures.pop(f"p{p} latency").removesuffix(" ms")) for p in (50, 99)}
    assert latency == {50: pytest.approx(50.5, rel=0.01), 99: pytest.approx(99.01, rel=0.01)}
    assert figures == {
        "Requests": "110",
        "Error rate": "9.1 %",
        "Tokens in": "1,000",
        "Tokens out": "2,000",
        "Spend (credits)": "0.595",
    }
    html = page.content.decode()
    assert "0.595" in html and "gpt-small" in html
    assert 'src="/static/gateway/vendor/uplot/uPlot.iife.min.js"' in html  # served from here, never a CDN
    # An unknown period is the default one, not an error page.
    assert staff_client.get(reverse("admin:usage"), {"period": "1y"}).context["period"] == "24h"


def test_the_dashboard_is_for_staff_only(client: Client, user_with_credits: User) -> None:
    client.force_login(user_with_credits)
    assert client.get(reverse("admin:usage")).status_code == 302  # to the admin login


def test_the_index_lists_the_gateway_first_and_the_queue_under_one_heading(staff_client: Client) -> None:
    page = staff_client.get(reverse("admin:index"))
    names = [app["name"] for app in page.context["app_list"]]
    assert names[0] == "Gateway"
    assert "Queue" in names and "Django Q" not in names
    assert names[-1] == "Authentication and Authorization"
    html = page.content.decode()
    assert "<title>Gateway administration | dwctl admin</title>" in html
    assert '<a href="/admin/">dwctl admin</a>' in html


def test_the_user_page_puts_money_and_keys_first(staff_client: Client, seeded: dict[str, Any]) -> None:
    bob = User.objects.get(username="bob")
    page = staff_client.get(reverse("admin:accounts_user_change", args=[bob.pk]))
    fieldsets = page.context["adminform"].fieldsets
    assert fieldsets[0][1]["fields"] == ("balance_link", "spend", "access_groups", "keys", "shortcuts")
    html = page.content.decode()
    assert "bob-ci" in html and "Grant credits" in html and "Create key" in html
    assert f"{reverse('admin:accounts_apikey_add')}?owner={bob.pk}" in html
    spend_cell = html[html.index('class="usage-figures"') :]
    assert "<td>5</td><td>0.5</td>" in spend_cell  # bob's 5 calls today, 0.5 credits
    # Django's auth groups and permissions: only on a staff user's page.
    assert "user_permissions" not in html
    staff = User.objects.get(username="admin")
    assert (
        "user_permissions" in staff_client.get(reverse("admin:accounts_user_change", args=[staff.pk])).content.decode()
    )


def test_saving_a_non_staff_user_keeps_their_auth_groups(staff_client: Client, user_with_credits: User) -> None:
    group = Group.objects.create(name="old-staff")
    user_with_credits.groups.add(group)
    url = reverse("admin:accounts_user_change", args=[user_with_credits.pk])
    data = {
        "username": "alice",
        "email": "alice@example.com",
        "is_active": "on",
    }
    response = staff_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    user_with_credits.refresh_from_db()
    assert user_with_credits.email == "alice@example.com"
    assert list(user_with_credits.groups.all()) == [group]


def test_the_grant_credits_button_grants_to_that_user(staff_client: Client, user_without_credits: User) -> None:
    url = reverse("admin:accounts_user_grant_credits", args=[user_without_credits.pk])
    form = staff_client.get(url)
    assert form.status_code == 200 and "bob" in form.content.decode()
    done = staff_client.post(url, {"apply": "1", "amount": "12.5", "description": "welcome"})
    assert done.status_code == 302
    assert done.url == reverse("admin:accounts_user_change", args=[user_without_credits.pk])
    grant = CreditTransaction.objects.get(user=user_without_credits)
    assert (grant.kind, grant.amount) == (TransactionKind.ADMIN_GRANT, Decimal("12.5"))
    # A bad amount shows the form again and grants nothing more.
    again = staff_client.post(url, {"apply": "1", "amount": "-3"})
    assert again.status_code == 200
    assert CreditTransaction.objects.filter(user=user_without_credits).count() == 1


def test_the_key_page_shows_its_spend(staff_client: Client, seeded: dict[str, Any]) -> None:
    key: ApiKey = seeded["alice_key"]
    html = staff_client.get(reverse("admin:accounts_apikey_change", args=[key.pk])).content.decode()
    spend_cell = html[html.index('class="usage-figures"') :]
    assert "<td>95</td><td>0.095</td>" in spend_cell


# --- retention ---------------------------------------------------------------------------------


def test_old_request_logs_are_pruned_in_batches(db: None, settings: Any) -> None:
    settings.GATEWAY_LOG_RETENTION_DAYS = 30
    now = timezone.now()
    RequestLog.objects.bulk_create(
        [log(now - timedelta(days=31, minutes=i)) for i in range(5)] + [log(now - timedelta(days=29))]
    )
    assert prune_request_log(now=now, batch_size=2) == 5
    assert [r.created_at for r in RequestLog.objects.all()] == [now - timedelta(days=29)]


def test_a_run_stops_after_its_batches_and_the_next_goes_on(db: None, settings: Any) -> None:
    settings.GATEWAY_LOG_RETENTION_DAYS = 1
    now = timezone.now()
    RequestLog.objects.bulk_create([log(now - timedelta(days=2, minutes=i)) for i in range(5)])
    assert prune_request_log(now=now, batch_size=2, max_batches=1) == 2
    assert RequestLog.objects.count() == 3
    assert tasks.prune_request_log() == 3
    assert not RequestLog.objects.exists()


def test_retention_zero_keeps_every_log(db: None, settings: Any) -> None:
    settings.GATEWAY_LOG_RETENTION_DAYS = 0
    RequestLog.objects.bulk_create([log(timezone.now() - timedelta(days=3650))])
    assert tasks.prune_request_log() == 0
    assert RequestLog.objects.count() == 1


def test_pruning_and_the_rollup_are_scheduled(db: None) -> None:
    pruning = Schedule.objects.get(func="gateway.tasks.prune_request_log")
    assert pruning.schedule_type == Schedule.HOURLY and pruning.repeats == -1
    rollup = Schedule.objects.get(func="gateway.tasks.roll_up_usage")
    assert (rollup.schedule_type, rollup.minutes, rollup.repeats) == (Schedule.MINUTES, 1, -1)


def test_a_long_log_is_rolled_up_over_several_runs(db: None) -> None:
    now = timezone.now()
    RequestLog.objects.bulk_create([log(now - timedelta(hours=h), cost=Decimal("1")) for h in range(5)])
    assert [roll_up_usage(margin=0, step=2) for _ in range(4)] == [2, 2, 1, 0]
    assert dashboard("24h").totals.spend == Decimal("5")


def test_pruning_takes_the_rollup_of_pruned_hours_with_it(db: None, settings: Any) -> None:
    settings.GATEWAY_LOG_RETENTION_DAYS = 30
    now = timezone.now()
    RequestLog.objects.bulk_create([log(now - timedelta(days=40)), log(now - timedelta(days=1))])
    assert roll_up_usage() == 2
    prune_request_log(now=now)
    assert [r.hour.date() for r in UsageRollup.objects.filter(dimension="all")] == [(now - timedelta(days=1)).date()]


def test_the_rollup_task_takes_in_new_rows(user_with_credits: User) -> None:
    RequestLog.objects.bulk_create([log(timezone.now(), user=user_with_credits, cost=Decimal("0.5"))])
    assert tasks.roll_up_usage() == 1
    assert dashboard("24h").totals.spend == Decimal("0.5")
