"""Pure decisions of the request path: request validation, authentication, authorization, tier routing.

Nothing here touches the database or the network; every function reads the request and the
auth snapshot and returns a decision, so each rule is unit-tested on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from accounts.models import Purpose
from accounts.services import hash_secret
from gateway.call import Route
from gateway.errors import BLOCKED_BY_RULE, NO_ACCESS, Denial
from gateway.snapshot import KeyEntry, ModelEntry, Snapshot
from routing_rules.models import RuleAction

REALTIME_TIERS = frozenset({"auto", "default", "priority", "scale"})
# API paths (below /ai/v1/) that call a model, and those that may be queued.
INFERENCE_PATHS = frozenset({"chat/completions", "embeddings", "responses"})
FLEX_PATHS = frozenset({"chat/completions", "responses"})


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def validate_body(body: Any) -> str:
    """Check the fields the gateway itself reads; return the requested model alias."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise BadRequest("You must provide a model parameter.", "model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string.", "model")
    for flag in ("stream", "background", "store"):
        if flag in body and body[flag] is not None and not isinstance(body[flag], bool):
            raise BadRequest(f"'{flag}' must be a boolean.", flag)
    if body.get("background") is True and body.get("store") is False:
        raise BadRequest("A background response is stored to be read later: 'store' must be true with it.", "store")
    tier = body.get("service_tier")
    if tier is not None and not isinstance(tier, str):
        raise BadRequest("'service_tier' must be a string.", "service_tier")
    if tier is not None and tier != "flex" and tier not in REALTIME_TIERS:
        raise BadRequest(
            f"Invalid value for 'service_tier': '{tier}'. Use one of auto, default, flex, priority, scale.",
            "service_tier",
        )
    return model


def route_tier(path: str, body: dict[str, Any]) -> Route:
    """Decide how a validated request is served: now, now without the client, or queued."""
    if body.get("service_tier") == "flex" and path in FLEX_PATHS:
        return Route.FLEX
    if path == "responses" and body.get("background") is True:
        return Route.BACKGROUND
    return Route.REALTIME


@dataclass(frozen=True, slots=True)
class Authorized:
    model: ModelEntry
    requested_alias: str


def authenticate(snapshot: Snapshot, authorization: str | None, now: float | None = None) -> KeyEntry | None:
    """Return the key for an `Authorization: Bearer sk-…` header, or None if unknown, revoked or expired."""
    if not authorization:
        return None
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret:
        return None
    key = snapshot.keys.get(hash_secret(secret.strip()))
    if key is None:
        return None
    if key.expires_at is not None and key.expires_at <= (now or time.time()):
        return None
    return key


def authorize(snapshot: Snapshot, key: KeyEntry, model: ModelEntry, tier: str) -> Authorized | Denial:
    """Apply, in order, group access and the traffic rule for the key's purpose (credits: gateway.budget)."""
    requested = model.alias
    if not snapshot.can_access(key.user_id, model):
        return Denial(NO_ACCESS, requested)
    rule = model.rules.get(key.purpose)
    if rule is not None:
        action, target_alias = rule
        if action == RuleAction.DENY:
            return Denial(BLOCKED_BY_RULE, requested, key.purpose)
        target = snapshot.models.get(target_alias)
        if target is not None:
            model = target
    return Authorized(model=model, requested_alias=requested)


def refuses_inference(key: KeyEntry) -> bool:
    return key.purpose == Purpose.PLATFORM
