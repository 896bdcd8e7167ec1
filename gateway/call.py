"""What the request path knows about one API call: below everything that produces or reads it."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from django.http import HttpRequest

from gateway.snapshot import KeyEntry, ModelEntry, ToolEntry


@dataclass(frozen=True, slots=True)
class Headroom:
    """What a call left of one limit: its size, how much remains now, seconds until it is whole again."""

    limit: int
    remaining: int
    reset: float


class Route(StrEnum):
    REALTIME = "realtime"
    BACKGROUND = "background"  # realtime call run without the client: /responses with background: true
    FLEX = "flex"


@dataclass(slots=True)
class GatewayCall:
    """One API call as TierRoutingMiddleware admitted it: who calls, what, and how it is served."""

    key: KeyEntry
    path: str  # the API path below /ai/v1/, e.g. "chat/completions"
    request_id: str
    started_at: float
    body: dict[str, Any] = field(default_factory=dict)
    model: ModelEntry | None = None  # the model served (after a redirect)
    requested_alias: str = ""
    route: Route = Route.REALTIME
    tools: tuple[ToolEntry, ...] = ()  # the server tools offered on a /responses call (gateway.tools)
    body_bytes: int = 0  # the size of the request body, for estimating its input tokens
    hold: Any = None  # the credits it holds while in flight (gateway.budget.Hold)
    client_request_id: str = ""  # what the client sent as X-Client-Request-Id, stored with its record
    slot: tuple[int, str] | None = None  # the capacity slot it holds: (model id, lease)
    recorded: bool = False  # its record is made where it ends, not by gateway.answers
    relaying: bool = False  # its upstream's stream is being relayed: a client that leaves is not waited for
    # Left by the limit checks for the x-ratelimit-* headers: the tighter of the key's and the model's.
    request_headroom: Headroom | None = None
    token_headroom: Headroom | None = None

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def tier(self) -> str:
        return "flex" if self.route == Route.FLEX else "realtime"

    @property
    def served(self) -> ModelEntry:
        """The model an admitted inference call is served by."""
        assert self.model is not None, "only inference calls have a model"
        return self.model

    def job_fields(self, model_alias: str) -> dict[str, Any]:
        """What a recorded call stores about its request (see gateway.jobs.create_job)."""
        return {
            "job_id": uuid.UUID(self.request_id),
            "owner_id": self.key.user_id,
            "api_key_id": self.key.id,
            "model_alias": model_alias,
            "path": self.path,
            "request_body": self.body,
        }


class GatewayRequest(HttpRequest):
    """A request on the /ai/ path, as TierRoutingMiddleware hands it to the views."""

    gateway: GatewayCall


def new_request_id() -> str:
    # A random UUID without a syscall per request (uuid4 reads os.urandom): ids must be unique,
    # not secret — a response id is only ever readable by its owner.
    return uuid.UUID(int=random.getrandbits(128), version=4).hex
