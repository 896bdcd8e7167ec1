"""The endpoints over what the gateway keeps: a response (read, streamed again, cancelled, deleted),
its input items, and the models a key can call. None of them calls a model."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from functools import wraps
from typing import Any

from django.http.response import HttpResponseBase

from gateway import errors, flex, jobs, views, warm_path
from gateway.call import GatewayRequest
from gateway.db import DATABASE_ERRORS, in_thread
from gateway.models import InferenceRequest, JobState
from gateway.render import input_items, json_response, response_object
from gateway.snapshot import ModelEntry, aget_snapshot

logger = logging.getLogger(__name__)
StoredView = Callable[..., Awaitable[HttpResponseBase]]


def stored(*methods: str) -> Callable[[StoredView], Callable[..., Coroutine[Any, Any, HttpResponseBase]]]:
    """A view over the stored records, for these methods: any other is answered 405, and a
    database that cannot be reached 503."""

    def decorate(view: StoredView) -> Callable[..., Coroutine[Any, Any, HttpResponseBase]]:
        @wraps(view)
        async def serve(request: GatewayRequest, **kwargs: str) -> HttpResponseBase:
            if request.method not in methods:
                return errors.method_not_allowed(request.method or "")
            try:
                return await view(request, **kwargs)
            except DATABASE_ERRORS:
                logger.warning("The database is unavailable: answered 503", exc_info=True)
                return errors.database_unavailable()

        return serve

    return decorate


def owned_response(*methods: str) -> Callable[[StoredView], Callable[..., Coroutine[Any, Any, HttpResponseBase]]]:
    """A view of one of the caller's responses, found by its `resp_` id: anyone else's is a 404."""

    def decorate(view: StoredView) -> Callable[..., Coroutine[Any, Any, HttpResponseBase]]:
        @stored(*methods)
        @wraps(view)
        async def serve(request: GatewayRequest, response_id: str) -> HttpResponseBase:
            job = await in_thread(jobs.find_job, response_id, request.gateway.key.user_id)
            if job is None:
                return errors.response_not_found(response_id)
            return await view(request, job)

        return serve

    return decorate


@owned_response("GET", "DELETE")
async def response_detail(request: GatewayRequest, job: InferenceRequest) -> HttpResponseBase:
    if request.method == "DELETE":
        await in_thread(jobs.delete_job, job)
        views.stop_background(job.id)
        warm_path.stop(job.id)
        return json_response({"id": job.public_id, "object": "response", "deleted": True})
    if request.GET.get("stream") in ("true", "1"):
        after = request.GET.get("starting_after", "-1")
        if not after.lstrip("-").isdigit():
            return errors.invalid_request("'starting_after' must be an integer.", "starting_after")
        return flex.follow(job, int(after))
    return json_response(response_object(job))


@owned_response("POST")
async def response_cancel(request: GatewayRequest, job: InferenceRequest) -> HttpResponseBase:
    job = await in_thread(jobs.cancel_job, job)
    if job.state == JobState.CANCELED:
        views.stop_background(job.id)
        warm_path.stop(job.id)
    return json_response(response_object(job))


@owned_response("GET")
async def response_input_items(request: GatewayRequest, job: InferenceRequest) -> HttpResponseBase:
    limit = request.GET.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        return errors.invalid_request("'limit' must be an integer from 1 to 100.", "limit")
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        return errors.invalid_request("'order' must be 'asc' or 'desc'.", "order")
    items = input_items(job)
    if order == "desc":
        items.reverse()
    after = request.GET.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            return errors.invalid_request(f"No input item with id '{after}' in this response.", "after")
        items = items[ids.index(after) + 1 :]
    page = items[: int(limit)]
    return json_response(
        {
            "object": "list",
            "data": page,
            "has_more": len(items) > len(page),
            "first_id": page[0]["id"] if page else "",
            "last_id": page[-1]["id"] if page else "",
        }
    )


def model_object(model: ModelEntry) -> dict[str, Any]:
    return {"id": model.alias, "object": "model", "created": model.created, "owned_by": "dwctl"}


@stored("GET")
async def models(request: GatewayRequest) -> HttpResponseBase:
    snapshot = await aget_snapshot()
    user_id = request.gateway.key.user_id
    reachable = sorted(snapshot.models.values(), key=lambda m: m.alias)
    data = [model_object(model) for model in reachable if snapshot.can_access(user_id, model)]
    return json_response({"object": "list", "data": data})


@stored("GET")
async def model_detail(request: GatewayRequest, alias: str) -> HttpResponseBase:
    snapshot = await aget_snapshot()
    model = snapshot.models.get(alias)
    if model is None or not snapshot.can_access(request.gateway.key.user_id, model):
        return errors.model_not_found(alias)
    return json_response(model_object(model))
