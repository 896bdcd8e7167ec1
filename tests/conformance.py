"""Every body the gateway writes, checked against OpenAI's own OpenAPI description.

`assert_conforms(body, "Response")` validates a body against `components/schemas/<name>` of
`../shared/reference/openai-openapi.yaml` (OpenAPI 3.1, so its schemas are JSON Schema 2020-12).
`check_response` is an httpx response hook: every client the tests make (`world.client`, `post`)
runs it, so each JSON body the gateway answers is validated against the schema of its endpoint —
a new endpoint has to name its schema in `SCHEMAS` before any test can call it.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"

# (method, path below /ai/v1/) → the schema of a success body; None: not ours to check (the
# upstream's own body, passed through), or no schema in the spec (DELETE /responses/{id}).
SCHEMAS: list[tuple[str, re.Pattern[str], str | None]] = [
    ("POST", re.compile(r"chat/completions"), "CreateChatCompletionResponse"),
    ("POST", re.compile(r"embeddings"), "CreateEmbeddingResponse"),
    ("POST", re.compile(r"responses"), "Response"),
    ("GET", re.compile(r"responses/[^/]+"), "Response"),
    ("POST", re.compile(r"responses/[^/]+/cancel"), "Response"),
    ("DELETE", re.compile(r"responses/[^/]+"), None),
    ("GET", re.compile(r"responses/[^/]+/input_items"), "ResponseItemList"),
    ("POST", re.compile(r"files"), "OpenAIFile"),
    ("GET", re.compile(r"files"), "ListFilesResponse"),
    ("GET", re.compile(r"files/[^/]+"), "OpenAIFile"),
    ("DELETE", re.compile(r"files/[^/]+"), "DeleteFileResponse"),
    ("GET", re.compile(r"files/[^/]+/content"), None),  # the file's own bytes, never JSON of ours
    ("POST", re.compile(r"batches"), "Batch"),
    ("GET", re.compile(r"batches"), "ListBatchesResponse"),
    ("GET", re.compile(r"batches/[^/]+"), "Batch"),
    ("POST", re.compile(r"batches/[^/]+/cancel"), "Batch"),
    ("GET", re.compile(r"models"), "ListModelsResponse"),
    ("GET", re.compile(r"models/.+"), "Model"),
]


@cache
def _spec() -> dict[str, Any]:
    if not SPEC.is_file():
        raise AssertionError(f"OpenAI's OpenAPI description is not at {SPEC}")
    with SPEC.open() as handle:
        return _nullable(yaml.load(handle, Loader=yaml.CSafeLoader))  # the C loader: the file is 3 MB


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true`, which the description still uses in places, as JSON Schema's null."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def _validator(schema: str) -> Draft202012Validator:
    spec = _spec()
    if schema not in spec["components"]["schemas"]:
        raise AssertionError(f"the spec has no schema {schema!r}")
    registry: Registry[Any] = Registry().with_resource("openapi", DRAFT202012.create_resource(spec))
    return Draft202012Validator({"$ref": f"openapi#/components/schemas/{schema}"}, registry=registry)


def violations(body: Any, schema: str) -> list[str]:
    """What is wrong with `body` as a `schema`, one line per error."""
    found = []
    for error in _validator(schema).iter_errors(body):
        error = best_match([error])  # of an anyOf/oneOf, the branch that came closest
        where = "/".join(str(part) for part in error.absolute_path) or "(the body)"
        found.append(f"{where}: {error.message}")
    return found


def assert_conforms(body: Any, schema: str) -> None:
    found = violations(body, schema)
    assert not found, f"not a conforming {schema}:\n  " + "\n  ".join(found[:20])


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON data of each event of an SSE body, without the closing `[DONE]`."""
    events = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                events.append(orjson.loads(line[5:].strip()))
    return events


def assert_stream_conforms(raw: bytes, schema: str) -> list[dict[str, Any]]:
    """Validate each event of an SSE body (ResponseStreamEvent, CreateChatCompletionStreamResponse)."""
    events = sse_events(raw)
    assert events, "the stream carried no event"
    for number, event in enumerate(events):
        found = violations(event, schema)
        assert not found, f"event {number} is not a conforming {schema}:\n  " + "\n  ".join(found[:20])
    return events


def schema_of(method: str, path: str, status: int) -> str | None:
    if status >= 400:
        return "ErrorResponse"
    for known_method, pattern, schema in SCHEMAS:
        if method == known_method and pattern.fullmatch(path):
            return schema
    raise AssertionError(f"no schema is known for {method} /ai/v1/{path}: name it in tests/conformance.SCHEMAS")


def check_response(response: httpx.Response) -> None:
    """httpx response hook: validate a JSON body from /ai/v1/ against its endpoint's schema."""
    path = response.request.url.path
    if not path.startswith("/ai/v1/") or "application/json" not in response.headers.get("content-type", ""):
        return
    schema = schema_of(response.request.method, path.removeprefix("/ai/v1/"), response.status_code)
    if schema is not None:
        assert_conforms(orjson.loads(response.read()), schema)


def conforming_client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(event_hooks={"response": [check_response]}, **kwargs)


async def acheck_response(response: httpx.Response) -> None:
    if "application/json" in response.headers.get("content-type", ""):
        await response.aread()
    check_response(response)


def conforming_async_client(**kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(event_hooks={"response": [acheck_response]}, **kwargs)
