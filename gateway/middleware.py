"""The two middlewares of the /ai/ path. Both are async-only: nothing on this path hops to a thread."""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from gateway import flex, limits
from gateway.errors import Denial, denied, openai_error, render_denial
from gateway.routing import (
    INFERENCE_ENDPOINTS,
    Authorized,
    BadRequest,
    Route,
    authenticate,
    authorize,
    refuses_inference,
    route_tier,
    validate_body,
)
from gateway.snapshot import KeyEntry, ModelEntry, aget_snapshot

logger = logging.getLogger(__name__)
API_PREFIX = "/ai/v1/"


@dataclass(slots=True)
class GatewayCall:
    """What the middleware learned about a request, handed to the view as `request.gateway`."""

    key: KeyEntry
    endpoint: str
    body: dict[str, Any] = field(default_factory=dict)
    model: ModelEntry | None = None
    requested_alias: str = ""
    route: Route = Route.REALTIME
    request_id: str = ""
    started_at: float = 0.0
    holds_capacity: bool = False

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def tier(self) -> str:
        return "flex" if self.route == Route.FLEX else "realtime"

    def job_fields(self, model_alias: str) -> dict[str, Any]:
        """What a recorded call stores about its request (see gateway.services.create_job)."""
        return {
            "job_id": uuid.UUID(self.request_id),
            "owner_id": self.key.user_id,
            "api_key_id": self.key.id,
            "model_alias": model_alias,
            "path": self.endpoint,
            "request_body": self.body,
        }


def new_request_id() -> str:
    # A random UUID without a syscall per request (uuid4 reads os.urandom): ids must be unique,
    # not secret — a response id is only ever readable by its owner.
    return uuid.UUID(int=random.getrandbits(128), version=4).hex


class AsyncMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response) -> None:  # type: ignore[no-untyped-def]
        if not iscoroutinefunction(get_response):
            raise TypeError(f"{type(self).__name__} needs an async get_response")
        self.get_response = get_response
        markcoroutinefunction(self)  # type: ignore[type-var]


class ErrorEnrichmentMiddleware(AsyncMiddleware):
    """Turn a routing denial (a bare 403 carrying its reason) into the specific OpenAI error.

    A 403 that carries no denial — an upstream's own, say — passes through untouched, and so do
    non-/ai/ paths and every other status.
    """

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        if response.status_code != 403 or not request.path.startswith("/ai/"):
            return response
        denial = getattr(response, "denial", None)
        return render_denial(denial) if isinstance(denial, Denial) else response


class TierRoutingMiddleware(AsyncMiddleware):
    """Parse, authenticate, authorize, rate-limit and route each API request from the auth snapshot."""

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        endpoint = request.path.removeprefix(API_PREFIX)
        snapshot = await aget_snapshot()
        key = authenticate(snapshot, request.headers.get("Authorization"))
        if key is None:
            if not request.headers.get("Authorization"):
                return openai_error(
                    401,
                    "You didn't provide an API key. Send it as 'Authorization: Bearer sk-…'.",
                    code="missing_api_key",
                )
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        if refuses_inference(key):
            return openai_error(
                403, "Platform keys are for management only and cannot call the API.", code="wrong_key_purpose"
            )
        call = GatewayCall(key=key, endpoint=endpoint, request_id=new_request_id(), started_at=time.time())
        request.gateway = call  # type: ignore[attr-defined]
        if request.method != "POST" or endpoint not in INFERENCE_ENDPOINTS:
            return await self.get_response(request)

        try:
            body = orjson.loads(request.body)
            alias = validate_body(body)
            call.body = body
            call.route = route_tier(endpoint, body)
        except orjson.JSONDecodeError:
            return openai_error(400, "The request body is not valid JSON.", code="invalid_json")
        except BadRequest as exc:
            return openai_error(400, exc.message, param=exc.param, code="invalid_request")
        if endpoint == "embeddings" and body.get("service_tier") == "flex":
            logger.warning("Flex requested on /embeddings: served in real time")

        model = snapshot.models.get(alias)
        if model is None:
            return openai_error(
                404, f"The model '{alias}' does not exist or you do not have access to it.", code="model_not_found"
            )
        decision = authorize(snapshot, key, model, call.tier)
        if isinstance(decision, Denial):
            return denied(decision.reason, decision.model, decision.purpose)
        assert isinstance(decision, Authorized)
        call.model = decision.model
        call.requested_alias = decision.requested_alias
        refusal = await limits.check_key(call)
        if refusal is not None:
            return refusal
        if call.route == Route.FLEX:
            return await flex.submit(call)
        return await self.serve(request, call)

    async def serve(self, request: HttpRequest, call: GatewayCall) -> HttpResponseBase:
        """Serve in real time, within the model's rate and capacity."""
        refusal = await limits.acquire(call)
        if refusal is not None:
            return refusal
        try:
            response = await self.get_response(request)
        except BaseException:
            limits.release(call)
            raise
        if not response.streaming:
            limits.release(call)  # a stream releases its capacity when it ends
        return response
