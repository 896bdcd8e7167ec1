"""The Batch API (`/ai/v1/batches`): create, list, retrieve, cancel — each caller sees only their own.

Creating a batch reads its input file twice and inserts a job per line (gateway/batch_store.py),
off the event loop.
"""

from __future__ import annotations

import orjson
from django.http.response import HttpResponseBase

from gateway import errors
from gateway.batch_models import Batch
from gateway.batch_store import Refused, cancel_batch, create_batch, find_batch, list_batches, request_counts
from gateway.call import GatewayRequest
from gateway.db import in_thread
from gateway.render import batch_object, json_response
from gateway.snapshot import aget_snapshot
from gateway.stored import stored

MAX_LIST_LIMIT = 100  # OpenAI's bounds
DEFAULT_LIST_LIMIT = 20


def batch_body(batch: Batch) -> dict[str, object]:
    return batch_object(batch, request_counts(batch))


@stored("GET", "POST")
async def batches(request: GatewayRequest) -> HttpResponseBase:
    key = request.gateway.key
    if request.method == "POST":
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return errors.invalid_json()
        snapshot = await aget_snapshot()
        try:
            batch = await in_thread(create_batch, snapshot, key, body)
        except Refused as refused:
            return refused.response
        return json_response(await in_thread(batch_body, batch))
    limit = request.GET.get("limit", str(DEFAULT_LIST_LIMIT))
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        return errors.invalid_request(f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}.", "limit")
    after_id = request.GET.get("after")
    after = None
    if after_id:
        after = await in_thread(find_batch, after_id, key.user_id)
        if after is None:
            return errors.invalid_request(f"No batch with id '{after_id}' to list after.", "after")
    page = await in_thread(list_batches, key.user_id, after=after, limit=int(limit))
    data = await in_thread(lambda: [batch_body(batch) for batch in page.batches])
    return json_response(
        {
            "object": "list",
            "data": data,
            "has_more": page.has_more,
            "first_id": data[0]["id"] if data else "",
            "last_id": data[-1]["id"] if data else "",
        }
    )


@stored("GET")
async def batch_detail(request: GatewayRequest, batch_id: str) -> HttpResponseBase:
    batch = await in_thread(find_batch, batch_id, request.gateway.key.user_id)
    if batch is None:
        return errors.batch_not_found(batch_id)
    return json_response(await in_thread(batch_body, batch))


@stored("POST")
async def batch_cancel(request: GatewayRequest, batch_id: str) -> HttpResponseBase:
    batch = await in_thread(find_batch, batch_id, request.gateway.key.user_id)
    if batch is None:
        return errors.batch_not_found(batch_id)
    batch = await in_thread(cancel_batch, batch)
    return json_response(await in_thread(batch_body, batch))
