"""Server-side tools: which a call is offered, how they join the client's, and running one.

A tool is an HTTP endpoint an operator registered (``gateway.models.Tool``). The gateway runs a
call of it by POSTing the call's arguments (a JSON object) to its URL with the tool's own
credential and the request's id; the answer's body, JSON or text, is what the model reads as the
call's output. A tool that fails, times out or answers non-2xx gives the model an error output:
it never fails the response.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from gateway import clients
from gateway.snapshot import ToolEntry

REQUEST_ID_HEADER = "X-Request-Id"
OUTPUT_LIMIT = 100_000  # characters of a tool's answer the model is shown


class Branch(StrEnum):
    """How a /v1/responses call is served (the reference's warm_path_branch)."""

    PASS_THROUGH = "pass_through"  # noqa: S105  (a branch name, not a secret): one model call, relayed (no server tool)
    LOOP = "loop"  # the multi-step loop, answered as one JSON response
    LOOP_STREAM = "loop_stream"  # the multi-step loop, its events streamed as they happen
    LOOP_BACKGROUND = "loop_background"  # the multi-step loop run without the client (202)


def warm_path_branch(*, tools: tuple[ToolEntry, ...], stream: bool, background: bool) -> Branch:
    """The branch of a realtime /v1/responses call: the loop only when a server tool is offered."""
    if not tools:
        return Branch.PASS_THROUGH
    if background:
        return Branch.LOOP_BACKGROUND
    return Branch.LOOP_STREAM if stream else Branch.LOOP


def merged_tools(body: dict[str, Any], tools: tuple[ToolEntry, ...]) -> dict[str, Any]:
    """The request with the server's tools after the client's; a client tool wins a name clash."""
    given = [tool for tool in body.get("tools") or [] if isinstance(tool, dict)]
    taken = {tool.get("name") for tool in given if tool.get("type") == "function"}
    added = [tool.function for tool in tools if tool.name not in taken]
    return {**body, "tools": [*given, *added]} if added else body


def owned(body: dict[str, Any], tools: tuple[ToolEntry, ...]) -> dict[str, ToolEntry]:
    """The server tools the gateway runs on this call, by name: those the client did not bring itself."""
    taken = {tool.get("name") for tool in body.get("tools") or [] if isinstance(tool, dict)}
    return {tool.name: tool for tool in tools if tool.name not in taken}


@dataclass(frozen=True, slots=True)
class ToolRun:
    """One server-tool call as it ran: what the model reads, and what its record says."""

    output: str
    status: int | None  # the tool's HTTP status; None when it could not be reached or timed out
    latency_ms: float
    error: str = ""


def error_output(message: str) -> str:
    return orjson.dumps({"error": message}).decode()


async def run_tool(tool: ToolEntry, arguments: str, request_id: str) -> ToolRun:
    """POST a call's arguments to its tool; any failure becomes an error output for the model."""
    started = time.perf_counter()

    def ran(output: str, status: int | None, error: str = "") -> ToolRun:
        return ToolRun(output[:OUTPUT_LIMIT], status, (time.perf_counter() - started) * 1000, error)

    try:
        parsed = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        message = f"The arguments of {tool.name} are not a JSON object."
        return ran(error_output(message), None, message)
    headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: request_id, **tool.headers}
    try:
        response = await clients.send(
            tool.url, orjson.dumps(parsed), headers, timeout=tool.timeout_seconds, connect_timeout=tool.timeout_seconds
        )
        try:
            body = (await response.read()).decode(errors="replace")
        finally:
            await response.close()
    except clients.UpstreamTimeout:
        message = f"The tool {tool.name} did not answer within {tool.timeout_seconds:g} seconds."
        return ran(error_output(message), None, message)
    except clients.UpstreamError:
        message = f"The tool {tool.name} could not be reached."
        return ran(error_output(message), None, message)
    if not 200 <= response.status < 300:
        message = f"The tool {tool.name} answered {response.status}: {body[:500]}"
        return ran(error_output(message), response.status, message)
    return ran(body, response.status)
