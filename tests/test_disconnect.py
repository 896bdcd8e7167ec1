"""A client that goes away mid-stream closes the upstream stream."""

from __future__ import annotations

import httpx
import pytest

from gateway.models import RequestLog
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_client_disconnect_closes_the_upstream_stream(world, user_with_credits, make_key):
    world.upstream.stream_closed.clear()
    request = {"model": "long-stream", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {make_key(user_with_credits)}"}

    with httpx.stream("POST", f"{world.url}/ai/v1/chat/completions", json=request, headers=headers) as reply:
        first = next(reply.iter_raw())
        assert first.startswith(b"data: ")

    # The upstream would stream for 6 s more; it sees the gateway hang up well before that.
    wait_for(world.upstream.stream_closed.is_set, timeout=5)
    log = wait_for(lambda: RequestLog.objects.filter(model_alias="long-stream").first())
    assert log.input_tokens is None  # no usage arrived, so nothing is charged
