"""The multi-step loop of /v1/responses with server tools: one implementation for every mode.

model call → run every server-tool call of that step (concurrently) → append the calls and their
outputs → model call again … until a step calls no server tool. A step that calls a client tool
(one the gateway does not own) ends the loop: its function_call items go back to the client, as
OpenAI returns them, so client-side agent loops keep working (the server's calls of that step are
run first, so the client's follow-up holds every call's output). At most ``max_model_calls`` model
calls (per model); reaching the cap ends the response ``incomplete``.

Blocking, streamed and background calls (gateway.warm_path) and flex jobs (gateway.worker) all run
:meth:`Loop.run`; they differ only in how a model call is made, what hears the items as they come,
and who bills the model calls the loop lists in ``model_calls``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import clients
from gateway.jobs import as_items
from gateway.snapshot import ModelEntry, ToolEntry
from gateway.tools import merged_tools, owned, run_tool
from gateway.upstream import UpstreamResult, error_message, failure_of, parse_json, unstreamed

Tokens = tuple[int | None, int | None]
# Why a response that reached its model's cap is incomplete (the record says it in words):
# OpenAI's incomplete reasons are a closed list, and this is the one that means "ran out of budget".
CAP_REASON = "max_output_tokens"
ModelCaller = Callable[[dict[str, Any]], Awaitable[UpstreamResult]]
ItemsHeard = Callable[[list[dict[str, Any]]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One model call of the loop, for its bill: each is charged on its own, at the tier served."""

    status: int
    tokens: Tokens
    ttfb_ms: float | None


@dataclass(slots=True)
class LoopEnd:
    """How the loop ended: the status and Responses-shaped body to store, its summed tokens, an error."""

    status: int
    body: Any
    tokens: Tokens
    error: str = ""
    cancelled: bool = False


@dataclass
class Loop:
    model: ModelEntry
    request: dict[str, Any]  # the client's request (a follow-up already holding its conversation)
    tools: tuple[ToolEntry, ...]  # the server tools offered on this call
    request_id: str
    output: list[dict[str, Any]] = field(default_factory=list)  # every item of every step
    model_calls: list[ModelCall] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # what the record shows, step by step
    usage: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.body = unstreamed(merged_tools(self.request, self.tools))
        self.owned = owned(self.request, self.tools)
        self.seen_ids: set[str] = set()

    def progress(self) -> dict[str, Any]:
        """What a run again needs to go on from the last finished step (a JSON object)."""
        calls = [[call.status, *call.tokens] for call in self.model_calls]
        return {"output": self.output, "model_calls": calls, "usage": self.usage, "steps": self.steps}

    def resume(self, progress: Any) -> None:
        """Go on from a :meth:`progress` an earlier run left (nothing to do for none)."""
        if not isinstance(progress, dict):
            return
        self.output = list(progress.get("output") or [])
        self.model_calls = [ModelCall(status, (i, o), None) for status, i, o in progress.get("model_calls") or []]
        self.usage = dict(progress.get("usage") or {})
        self.steps = [*(progress.get("steps") or []), {"kind": "resumed", "name": "run again from here"}]
        self.seen_ids = {str(item.get("id")) for item in self.output if isinstance(item, dict)}

    @property
    def tokens(self) -> Tokens:
        if not self.model_calls or all(call.tokens[0] is None for call in self.model_calls):
            return None, None
        return self.usage.get("input_tokens", 0), self.usage.get("output_tokens", 0)

    async def run(
        self,
        call_model: ModelCaller,
        *,
        heard: ItemsHeard | None = None,
        stopped: Callable[[], Awaitable[bool]] | None = None,
        finished_step: Callable[[], Awaitable[None]] | None = None,
    ) -> LoopEnd:
        """Run the loop to its end; `heard` gets each step's items as they come, `stopped` is asked
        between steps whether the response was cancelled meanwhile, and `finished_step` hears each
        step that ends with another to come (a flex job keeps its :meth:`progress` then)."""
        cap = self.model.max_model_calls
        while True:
            result = await self.call(call_model)
            if isinstance(result, LoopEnd):
                return result
            payload = parse_json(result.body)
            items = self.adopt(payload.get("output") if isinstance(payload, dict) else None)
            if heard is not None and items:
                await heard(items)
            if isinstance(payload, dict) and payload.get("status") == "incomplete":
                return self.end(payload.get("incomplete_details"))
            calls = [item for item in items if item.get("type") == "function_call"]
            if not calls:
                return self.end()  # the model answered
            ours = [item for item in calls if item.get("name") in self.owned]
            outputs = await asyncio.gather(*(self.run_call(item) for item in ours))
            self.output.extend(outputs)
            if heard is not None and outputs:
                await heard(list(outputs))
            if len(ours) < len(calls):
                # A client tool's call goes back to the client, with the outputs of the server's
                # calls of the same step: its follow-up then holds every call's output.
                return self.end()
            if len(self.model_calls) >= cap:
                self.steps.append({"kind": "cap", "name": f"stopped after {cap} model calls"})
                return self.end({"reason": CAP_REASON}, error=f"Stopped after {cap} model calls, the model's cap.")
            if stopped is not None and await stopped():
                return LoopEnd(499, None, self.tokens, "Cancelled between steps.", cancelled=True)
            if finished_step is not None:
                await finished_step()

    async def call(self, call_model: ModelCaller) -> UpstreamResult | LoopEnd:
        """One model call with everything so far as its input; a failed one ends the loop failed."""
        body = {**self.body, "input": [*as_items(self.request.get("input")), *self.output]}
        started = time.perf_counter()
        try:
            result = await call_model(body)
        except clients.UpstreamError as exc:
            failure = failure_of(exc)
            self.note_model_call(ModelCall(failure.status, (None, None), None), started, failure.message)
            return LoopEnd(failure.status, None, self.tokens, failure.message)
        error = error_message(result) if result.status >= 400 else ""
        self.note_model_call(ModelCall(result.status, result.tokens, result.ttfb_ms), started, error)
        if result.status >= 400:
            return LoopEnd(result.status, parse_json(result.body), self.tokens, error)
        payload = parse_json(result.body)
        usage = payload.get("usage") if isinstance(payload, dict) else None
        for name, value in (usage if isinstance(usage, dict) else {}).items():
            if isinstance(value, int):
                self.usage[name] = self.usage.get(name, 0) + value
        return result

    def note_model_call(self, call: ModelCall, started: float, error: str) -> None:
        self.model_calls.append(call)
        self.steps.append(
            {
                "kind": "model",
                "name": self.model.alias,
                "status": call.status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                "input_tokens": call.tokens[0],
                "output_tokens": call.tokens[1],
                "error": error,
            }
        )

    def adopt(self, given: Any) -> list[dict[str, Any]]:
        """A step's output items, added to the response's; an id already used by an earlier step
        (an upstream numbers each answer's items from 1) is made unique."""
        items = [dict(item) for item in given or [] if isinstance(item, dict)]
        for index, item in enumerate(items):
            if not item.get("id") or item["id"] in self.seen_ids:
                item["id"] = f"{item.get('id') or 'item'}_{self.request_id[:12]}_{len(self.model_calls)}_{index}"
            self.seen_ids.add(item["id"])
        self.output.extend(items)
        return items

    async def run_call(self, item: dict[str, Any]) -> dict[str, Any]:
        """Run one server-tool call; its output item (an error output when the tool failed)."""
        tool = self.owned[item["name"]]
        ran = await run_tool(tool, item.get("arguments") or "", f"req_{self.request_id}")
        self.steps.append(
            {
                "kind": "tool",
                "name": tool.name,
                "status": ran.status,
                "latency_ms": round(ran.latency_ms, 1),
                "error": ran.error,
            }
        )
        return {
            "type": "function_call_output",
            "id": f"fco_{item['id']}",
            "call_id": item.get("call_id"),
            "output": ran.output,
            "status": "completed",
        }

    def end(self, incomplete: Any = None, *, error: str = "") -> LoopEnd:
        usage = dict(self.usage)
        if usage:
            usage["total_tokens"] = usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
        body: dict[str, Any] = {
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": incomplete or None,
            "output": self.output,
        }
        if usage:
            body["usage"] = usage
        return LoopEnd(200, body, self.tokens, error)
