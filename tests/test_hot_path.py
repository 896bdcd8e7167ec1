"""At steady state a real-time request runs no SQL before its upstream call, in any thread."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from django.db.backends import utils as db_utils
from django.test import override_settings

from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def all_queries(monkeypatch) -> list[str]:
    """Every SQL statement run by any thread (django_assert_num_queries sees only the test's own thread)."""
    seen: list[str] = []
    lock = threading.Lock()
    original = db_utils.CursorWrapper._execute_with_wrappers

    def counting(self, sql, *args, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            seen.append(sql)
        return original(self, sql, *args, **kwargs)

    monkeypatch.setattr(db_utils.CursorWrapper, "_execute_with_wrappers", counting)
    return seen


# The snapshot watchers and usage flushers (of this event loop, and of the live server other tests
# started) query the database on their own schedule; long intervals keep those legitimate,
# off-path queries out of the measured window.
@override_settings(GATEWAY_SNAPSHOT_POLL_SECONDS=600, GATEWAY_ACCOUNTING_FLUSH_SECONDS=600)
def test_steady_state_request_runs_no_sql(world, user_with_credits, make_key, all_queries, django_assert_num_queries):
    from dwctl_site.asgi import application
    from gateway import clients
    from gateway.accounting import accountant

    headers = {"Authorization": f"Bearer {make_key(user_with_credits)}"}
    request = {"model": "gpt-test", "messages": HELLO}

    async def one_request() -> int:
        # In this thread's own event loop, so django_assert_num_queries sees the request path.
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            reply = await client.post("/ai/v1/chat/completions", json=request, headers=headers)
        await clients.aclose()  # this loop's upstream client
        return reply.status_code

    assert asyncio.run(one_request()) == 200  # builds the snapshot
    time.sleep(0.5)  # lets a watcher or flusher that was mid-interval start its long sleep
    all_queries.clear()
    with django_assert_num_queries(0):
        assert asyncio.run(one_request()) == 200
    assert all_queries == []

    # The work did happen: it is written later, off the request path.
    assert len(accountant.pending) >= 1
    accountant.flush()
    wait_for(lambda: all_queries)
