"""The two middlewares of the /ai/ path. Both are async-only: nothing on this path hops to a thread."""

from __future__ import annotations

import logging
import time
from typing import cast

import orjson
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from gateway import admission, errors, flex, limits
from gateway.answers import record_answer
from gateway.call import GatewayCall, GatewayRequest, Route, new_request_id
from gateway.db import DATABASE_ERRORS, in_thread
from gateway.errors import Denial, denied, render_denial
from gateway.jobs import conversation
from gateway.policy import (
    INFERENCE_PATHS,
    Authorized,
    BadRequest,
    authenticate,
    authorize,
    refuses_inference,
    route_tier,
    validate_body,
)
from gateway.snapshot import aget_snapshot

logger = logging.getLogger(__name__)
API_PREFIX = "/ai/v1/"
REQUEST_ID_HEADER = "x-request-id"
CLIENT_REQUEST_ID_LENGTH = 512  # OpenAI's limit for X-Client-Request-Id


class AsyncMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response) -> None:  # type: ignore[no-untyped-def]
        if not iscoroutinefunction(get_response):
            raise TypeError(f"{type(self).__name__} needs an async get_response")
        self.get_response = get_response
        markcoroutinefunction(self)  # type: ignore[type-var]


class ErrorEnrichmentMiddleware(AsyncMiddleware):
    """Turn a routing denial (a bare 403 carrying its reason) into the specific OpenAI error, and
    put every answer that no model call records on record, as the client got it (gateway.answers).

    A 403 that carries no denial — an upstream's own, say — passes through untouched, and so do
    non-/ai/ paths and every other status.
    """

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        started_at = time.time()
        response = await self.get_response(request)
        if not request.path.startswith("/ai/"):
            return response
        denial = getattr(response, "denial", None)
        if response.status_code == 403 and isinstance(denial, Denial):
            enriched = render_denial(denial)
            if REQUEST_ID_HEADER in response:
                enriched[REQUEST_ID_HEADER] = response[REQUEST_ID_HEADER]
            response = enriched
        request_id = getattr(request, "request_id", None)
        if request_id is not None:
            record_answer(request, response, request_id, started_at)
        return response


class TierRoutingMiddleware(AsyncMiddleware):
    """Parse, authenticate, authorize, rate-limit and route each API request from the auth snapshot."""

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        request_id = request.request_id = new_request_id()  # type: ignore[attr-defined]
        try:
            response = await self.route(request, request_id)
        except DATABASE_ERRORS:  # the first snapshot, a flex submission: they need the database
            logger.warning("The database is unavailable: answered 503", exc_info=True)
            response = errors.database_unavailable()
        # Every answer's id, refusals included; a /responses call's id is resp_<the same hex>.
        response[REQUEST_ID_HEADER] = f"req_{request_id}"
        call = getattr(request, "gateway", None)
        if call is not None:
            limits.add_headers(response, call)
        return response

    async def route(self, request: HttpRequest, request_id: str) -> HttpResponseBase:
        path = request.path.removeprefix(API_PREFIX)
        snapshot = await aget_snapshot()
        authorization = request.headers.get("Authorization")
        key = authenticate(snapshot, authorization)
        if key is None:
            return errors.invalid_api_key() if authorization else errors.missing_api_key()
        if refuses_inference(key):
            return errors.platform_key_refused()
        call = GatewayCall(key=key, path=path, request_id=request_id, started_at=time.time())
        call.client_request_id = request.headers.get("X-Client-Request-Id", "")[:CLIENT_REQUEST_ID_LENGTH]
        gateway_request = cast(GatewayRequest, request)
        gateway_request.gateway = call
        if request.method != "POST" or path not in INFERENCE_PATHS:
            return await self.get_response(request)

        try:
            body = orjson.loads(request.body)
            alias = validate_body(body)
            call.body = body
            call.body_bytes = len(request.body)
            call.route = route_tier(path, body)
        except orjson.JSONDecodeError:
            return errors.invalid_json()
        except BadRequest as exc:
            return errors.invalid_request(exc.message, exc.param)
        if path == "embeddings" and body.get("service_tier") == "flex":
            logger.warning("Flex requested on /embeddings: served in real time")

        if path == "responses" and body.get("previous_response_id"):
            continued = await in_thread(conversation, body, key.user_id)
            if continued is None:
                return errors.previous_response_not_found(str(body["previous_response_id"]))
            call.body = continued
        model = snapshot.models.get(alias)
        if model is None:
            return errors.model_not_found(alias)
        decision = authorize(snapshot, key, model, call.tier)
        if isinstance(decision, Denial):
            return denied(decision.reason, decision.model, decision.purpose)
        assert isinstance(decision, Authorized)
        call.model = decision.model
        call.requested_alias = decision.requested_alias
        if path == "responses":
            call.tools = snapshot.tools_for(key.user_id, decision.model)
        # One step (one round trip with Redis): limits, credits, a capacity slot; nothing taken on a refusal.
        refusal = await admission.admit(call)
        if refusal is not None:
            return refusal
        if call.route == Route.FLEX:
            return await flex.submit(call)
        return await self.get_response(request)
