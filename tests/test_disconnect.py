"""A client that leaves a stream early is still billed for what the upstream produced."""

from __future__ import annotations

import httpx
import pytest
from django.test import override_settings

from billing.models import CreditTransaction
from gateway.models import RequestLog
from tests.conftest import HELLO, wait_for
from tests.upstream import COMPLETION_TOKENS, PROMPT_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)


def leave_after(world, secret: str, model: str, events: int) -> None:  # type: ignore[no-untyped-def]
    """Read `events` SSE events of a streamed chat call, then hang up."""
    request = {"model": model, "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST", f"{world.url}/ai/v1/chat/completions", json=request, headers={"Authorization": f"Bearer {secret}"}
    ) as reply:
        seen = b""
        for chunk in reply.iter_raw():
            seen += chunk
            if seen.count(b"\n\n") >= events:
                break


def test_a_client_that_leaves_mid_stream_is_billed_the_upstreams_usage(world, user_with_credits, make_key):
    endpoint = world.paid.endpoint
    endpoint.timeout_seconds = 30  # the long stream takes 6 s
    endpoint.save()
    leave_after(world, make_key(user_with_credits), "long-stream", 1)
    log = wait_for(lambda: RequestLog.objects.filter(model_alias="long-stream").first(), timeout=20)
    # The gateway read the stream on (6 s more) to its usage chunk instead of hanging up on the upstream.
    assert (log.input_tokens, log.output_tokens, log.usage_estimated) == (PROMPT_TOKENS, COMPLETION_TOKENS, False)
    assert CreditTransaction.objects.get(source_id=log.request_id.removeprefix("req_")).amount == log.cost > 0


def test_a_client_that_reads_everything_but_the_usage_chunk_is_billed(world, user_with_credits, make_key):
    # The content (3 words) and the finish chunk, then away before the usage chunk and [DONE].
    leave_after(world, make_key(user_with_credits), "gpt-test", 4)
    log = wait_for(lambda: RequestLog.objects.filter(model_alias="gpt-test").first(), timeout=20)
    assert (log.input_tokens, log.output_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)
    assert log.cost > 0


@override_settings(GATEWAY_STREAM_DRAIN_SECONDS=0)
def test_a_stream_cut_without_usage_is_billed_the_gateways_own_count(world, user_with_credits, make_key):
    world.upstream.stream_closed.clear()
    leave_after(world, make_key(user_with_credits), "long-stream", 2)
    # Not waited for: the gateway hangs up on the upstream, which would have streamed for 6 s more.
    wait_for(world.upstream.stream_closed.is_set, timeout=5)
    log = wait_for(lambda: RequestLog.objects.filter(model_alias="long-stream").first())
    assert log.usage_estimated
    assert log.input_tokens > 0 and log.output_tokens >= 2
    assert CreditTransaction.objects.get(source_id=log.request_id.removeprefix("req_")).amount == log.cost > 0
