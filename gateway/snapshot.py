"""The auth snapshot: everything a request needs before the upstream call, held in memory.

A request reads only the current immutable :class:`Snapshot` — no database. The snapshot is
rebuilt when the data behind it changes: every change moves a random token in
``SnapshotVersion`` (on commit, from ``gateway.signals``), and each gateway process checks that
token every ``GATEWAY_SNAPSHOT_POLL_SECONDS`` from a background task on its event loop. A
change made in this process also marks the snapshot stale at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone

from accounts.models import AccessGroup, ApiKey
from billing.models import Tariff, to_picos
from billing.services import paid_tiers, prices_at
from gateway import metrics
from gateway.db import in_thread
from gateway.models import DeployedModel, ResponsesApi, SnapshotVersion, Tool, decrypt_credentials
from routing_rules.models import RuleAction, TrafficRule

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    id: int
    user_id: int
    purpose: str
    expires_at: float | None
    requests_per_second: int | None
    burst_size: int | None
    tokens_per_minute: int | None = None
    spend_limit: Decimal | None = None
    spend_window: str = ""


@dataclass(frozen=True, slots=True)
class EndpointEntry:
    id: int
    base_url: str
    auth_headers: dict[str, str]
    timeout_seconds: float
    connect_timeout_seconds: float
    translates_responses: bool = False  # /v1/responses served by its /chat/completions (gateway.translate)
    name: str = ""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    id: int
    alias: str
    upstream_model: str
    kind: str
    endpoint: EndpointEntry
    group_ids: frozenset[int]
    public: bool
    # purpose -> (action, target alias or "")
    rules: dict[str, tuple[str, str]]
    paid_tiers: frozenset[str]
    requests_per_second: int | None
    burst_size: int | None
    capacity: int | None
    flex_concurrency: int
    created: int
    tokens_per_minute: int | None = None
    max_model_calls: int = 10  # of one /v1/responses request with server tools (gateway.loop)
    max_output_tokens: int | None = None
    # tier -> (input, output) pico-credits per token (= micro-credits per 1M tokens: exact, prices
    # have six decimals), for the tiers it has a price at: credit admission prices in integers
    prices: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolEntry:
    """A server-side tool as the request path runs it (gateway.tools): its credential in clear."""

    name: str
    description: str
    parameters: dict[str, Any]
    url: str
    headers: dict[str, str]
    timeout_seconds: float
    group_ids: frozenset[int]
    public: bool  # attached to Everyone

    @property
    def function(self) -> dict[str, Any]:
        """The tool as a Responses function tool, as the model is offered it."""
        return {"type": "function", "name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    keys: dict[str, KeyEntry] = field(default_factory=dict)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    user_groups: dict[int, frozenset[int]] = field(default_factory=dict)
    keys_by_id: dict[int, KeyEntry] = field(default_factory=dict)
    tools: dict[int, tuple[ToolEntry, ...]] = field(default_factory=dict)  # by model id

    def can_access(self, user_id: int, model: ModelEntry) -> bool:
        return model.public or not model.group_ids.isdisjoint(self.user_groups.get(user_id, ()))

    def tools_for(self, user_id: int, model: ModelEntry) -> tuple[ToolEntry, ...]:
        """The server tools offered on a call: attached to its model and to one of its caller's groups."""
        groups = self.user_groups.get(user_id, frozenset())
        return tuple(
            tool for tool in self.tools.get(model.id, ()) if tool.public or not tool.group_ids.isdisjoint(groups)
        )


def read_version() -> str:
    return SnapshotVersion.objects.filter(pk=1).values_list("token", flat=True).first() or ""


def build_snapshot() -> Snapshot:
    """Read the whole snapshot from the database (a handful of queries, whatever the size)."""
    version = read_version()
    now = timezone.now()
    keys = {
        row["secret_hash"]: KeyEntry(
            id=row["id"],
            user_id=row["owner_id"],
            purpose=row["purpose"],
            expires_at=row["expires_at"].timestamp() if row["expires_at"] else None,
            requests_per_second=row["requests_per_second"],
            burst_size=row["burst_size"],
            tokens_per_minute=row["tokens_per_minute"],
            spend_limit=row["spend_limit"],
            spend_window=row["spend_window"],
        )
        for row in ApiKey.objects.active()
        .filter(owner__is_active=True)
        .values(
            "id",
            "secret_hash",
            "owner_id",
            "purpose",
            "expires_at",
            "requests_per_second",
            "burst_size",
            "tokens_per_minute",
            "spend_limit",
            "spend_window",
        )
    }
    everyone = AccessGroup.objects.everyone()
    model_groups: dict[int, set[int]] = {}
    for group_id, model_id in AccessGroup.models.through.objects.values_list("accessgroup_id", "deployedmodel_id"):
        model_groups.setdefault(model_id, set()).add(group_id)
    user_groups: dict[int, set[int]] = {}
    for group_id, user_id in AccessGroup.members.through.objects.values_list("accessgroup_id", "user_id"):
        user_groups.setdefault(user_id, set()).add(group_id)

    tariffs: dict[int, list[Tariff]] = {}
    for tariff in Tariff.objects.active_at(now):
        tariffs.setdefault(tariff.model_id, []).append(tariff)

    live = {m.id: m for m in DeployedModel.objects.live().select_related("endpoint")}
    rules: dict[int, dict[str, tuple[str, str]]] = {}
    for rule in TrafficRule.objects.all():
        if rule.action == RuleAction.REDIRECT and rule.target_id not in live:
            continue  # a redirect to a retired model cannot be served; the model serves itself
        target = live[rule.target_id].alias if rule.target_id else ""
        rules.setdefault(rule.model_id, {})[rule.purpose] = (rule.action, target)

    # Raises, naming them, if a credential cannot be decrypted: a model is never called without its
    # credential, nor silently dropped; a running process keeps its previous snapshot (_watch).
    credentials = decrypt_credentials({model.endpoint_id: model.endpoint for model in live.values()}.values())
    models = {}
    for model in live.values():
        endpoint = model.endpoint
        credential = credentials[endpoint.id]
        auth_headers = {endpoint.auth_header: f"{endpoint.auth_prefix}{credential}"} if credential else {}
        groups = model_groups.get(model.id, set())
        models[model.alias] = ModelEntry(
            id=model.id,
            alias=model.alias,
            upstream_model=model.upstream_model,
            kind=model.kind,
            endpoint=EndpointEntry(
                id=endpoint.id,
                name=endpoint.name,
                base_url=endpoint.base_url.rstrip("/"),
                auth_headers=auth_headers,
                timeout_seconds=float(endpoint.timeout_seconds),
                connect_timeout_seconds=float(endpoint.connect_timeout_seconds),
                translates_responses=endpoint.responses_api == ResponsesApi.TRANSLATE,
            ),
            group_ids=frozenset(groups - {everyone.id}),
            public=everyone.id in groups,
            rules=rules.get(model.id, {}),
            paid_tiers=paid_tiers(tariffs.get(model.id, ()), now),
            prices={
                tier: (to_picos(input_price), to_picos(output_price))
                for tier, (input_price, output_price) in prices_at(tariffs.get(model.id, ()), now).items()
            },
            requests_per_second=model.requests_per_second,
            burst_size=model.burst_size,
            capacity=model.capacity,
            flex_concurrency=model.flex_concurrency,
            created=int(model.created_at.timestamp()),
            tokens_per_minute=model.tokens_per_minute,
            max_output_tokens=model.max_output_tokens,
            max_model_calls=model.max_model_calls,
        )
    return Snapshot(
        version=version,
        keys=keys,
        keys_by_id={key.id: key for key in keys.values()},
        models=models,
        user_groups={user_id: frozenset(ids) for user_id, ids in user_groups.items()},
        tools=build_tools(set(live), everyone.id),
    )


def build_tools(live: set[int], everyone_id: int) -> dict[int, tuple[ToolEntry, ...]]:
    """The server tools of each live model, by model id (three queries)."""
    tool_groups: dict[int, set[int]] = {}
    for tool_id, group_id in Tool.groups.through.objects.values_list("tool_id", "accessgroup_id"):
        tool_groups.setdefault(tool_id, set()).add(group_id)
    entries = {}
    for tool in Tool.objects.all():
        credential = tool.decrypt_credential()
        groups = tool_groups.get(tool.id, set())
        entries[tool.id] = ToolEntry(
            name=tool.name,
            description=tool.description,
            parameters=tool.parameters,
            url=tool.url,
            headers={"Authorization": f"Bearer {credential}"} if credential else {},
            timeout_seconds=float(tool.timeout_seconds),
            group_ids=frozenset(groups - {everyone_id}),
            public=everyone_id in groups,
        )
    tools: dict[int, list[ToolEntry]] = {}
    for tool_id, model_id in Tool.models.through.objects.values_list("tool_id", "deployedmodel_id"):
        if model_id in live and tool_id in entries:
            tools.setdefault(model_id, []).append(entries[tool_id])
    return {model_id: tuple(sorted(found, key=lambda t: t.name)) for model_id, found in tools.items()}


def mark_changed() -> None:
    """Tell every gateway process (and this one, at once) that the snapshot is out of date."""
    SnapshotVersion.objects.update_or_create(pk=1, defaults={"token": uuid.uuid4().hex, "changed_at": timezone.now()})
    with _state.lock:
        _state.changes += 1


class _State:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        # Local changes counted so far, and how many of them the current snapshot includes: a
        # snapshot is published only once built, so "stale" must not be cleared when a build starts.
        self.changes = 0
        self.included = -1
        self.watcher: asyncio.Task[None] | None = None
        self.lock = threading.Lock()
        self.build_lock = threading.Lock()

    @property
    def stale(self) -> bool:
        return self.snapshot is None or self.included < self.changes


_state = _State()


def _rebuild(*, force: bool = False) -> Snapshot:
    with _state.build_lock:
        if not force and _state.snapshot is not None and not _state.stale:
            return _state.snapshot  # another thread has just built it
        changes = _state.changes
        started = time.perf_counter()
        snapshot = build_snapshot()
        _state.snapshot, _state.included = snapshot, changes
        metrics.observe_snapshot_build(started)
        return snapshot


async def _watch() -> None:
    while True:
        await asyncio.sleep(settings.GATEWAY_SNAPSHOT_POLL_SECONDS)
        try:
            current = _state.snapshot
            version = await in_thread(read_version)
            if _state.stale or current is None or version != current.version:
                await in_thread(_rebuild, force=True)
            else:
                metrics.snapshot_is_current()
        except Exception as exc:
            logger.warning("Could not refresh the auth snapshot; keeping the previous one: %s", exc)


async def aget_snapshot() -> Snapshot:
    """Return the current snapshot; the first call in a process builds it and starts the watcher."""
    snapshot = _state.snapshot
    if snapshot is None or _state.stale:
        snapshot = await in_thread(_rebuild)
    loop = asyncio.get_running_loop()
    if _state.watcher is None or _state.watcher.done() or _state.watcher.get_loop() is not loop:
        _state.watcher = loop.create_task(_watch())
    return snapshot


def get_snapshot() -> Snapshot:
    """Sync twin of :func:`aget_snapshot` for workers, which run no watcher: checks the shared
    version itself (one query), so a change made in any process is seen."""
    current = _state.snapshot
    if current is None or _state.stale or read_version() != current.version:
        return _rebuild(force=True)
    return current
