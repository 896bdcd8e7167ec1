"""At steady state a real-time request runs no SQL before its upstream call, in any thread."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import httpx
import pytest
from django.db.backends import utils as db_utils
from django.test import override_settings

from gateway.models import RequestLog

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hi"}]


MEASURED = contextvars.ContextVar("measured", default=False)


@pytest.fixture
def request_queries(monkeypatch) -> list[str]:
    """Every SQL statement run on behalf of a measured request, in any thread.

    The request's context (a contextvar) travels with its work into the worker threads that run
    database calls, so queries it causes are seen wherever they run, and the queries of other
    event loops' watchers and flushers (the live server's, on their own schedule) never are.
    """
    seen: list[str] = []
    lock = threading.Lock()
    original = db_utils.CursorWrapper._execute_with_wrappers

    def counting(self, sql, *args, **kwargs):  # type: ignore[no-untyped-def]
        if MEASURED.get():
            with lock:
                seen.append(sql)
        return original(self, sql, *args, **kwargs)

    monkeypatch.setattr(db_utils.CursorWrapper, "_execute_with_wrappers", counting)
    return seen


# A watcher or flusher this event loop starts during the request sleeps its interval first: long
# intervals keep its legitimate, off-path queries out of the measurement.
@override_settings(GATEWAY_SNAPSHOT_POLL_SECONDS=600, GATEWAY_ACCOUNTING_FLUSH_SECONDS=600)
def test_steady_state_request_runs_no_sql(world, user_with_credits, make_key, request_queries):
    from dwctl_site.asgi import application
    from gateway import clients
    from gateway.accounting import accountant

    headers = {"Authorization": f"Bearer {make_key(user_with_credits)}"}
    request = {"model": "gpt-test", "messages": HELLO}

    async def one_request() -> int:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            reply = await client.post("/ai/v1/chat/completions", json=request, headers=headers)
        await clients.aclose()  # this loop's upstream client
        return reply.status_code

    async def measured_request() -> int:
        MEASURED.set(True)
        return await one_request()

    assert asyncio.run(one_request()) == 200  # builds the snapshot
    assert asyncio.run(measured_request()) == 200
    assert request_queries == []

    # The work did happen: it is written later, off the request path (by this flush, or by the live
    # gateway's flusher, which shares the process's journal) — and the counter sees a query.
    assert accountant.pending >= 1
    accountant.flush()
    assert RequestLog.objects.filter(model_alias="gpt-test", status_code=200).count() == 2
    contextvars.copy_context().run(lambda: (MEASURED.set(True), RequestLog.objects.count()))
    assert request_queries
