"""A finished batch's output and error files, in OpenAI's per-line format, in input order.

Each line is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``.
A line that completed goes to the output file. A line the upstream answered with an error goes
to the error file with that answer as its `response`; a line that never got an answer from the
upstream (cancelled, expired, refused for credits, its model retired) goes there with
`response: null` and an `error` {code, message}. Both files list their lines in the order of the
input file; a file with no line is not written (its id stays null), as OpenAI does.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import IO, Any

import orjson
from django.core.files import File

from gateway.batch_models import Batch
from gateway.errors import BATCH_CANCELLED, BATCH_EXPIRED
from gateway.file_store import create_file, delete_file
from gateway.models import FilePurpose, InferenceRequest, JobState, StoredFile

# Failures the gateway decided itself: the upstream never answered these lines.
GATEWAY_CODES = frozenset({BATCH_EXPIRED, "insufficient_credits", "model_not_found", "gateway_interrupted"})
READ_CHUNK = 2000
LINE_FIELDS = ("id", "custom_id", "state", "response_status", "response_body", "error")


@dataclass
class Result:
    output_file: StoredFile | None
    error_file: StoredFile | None
    completed: int
    failed: int
    expired: bool

    def discard(self) -> None:
        for stored in (self.output_file, self.error_file):
            if stored is not None:
                delete_file(stored)


def error_code(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def result_line(line: dict[str, Any]) -> dict[str, Any]:
    """One line of the output or error file for a batch line's job (as `values(*LINE_FIELDS)`)."""
    head = {"id": f"batch_req_{line['id'].hex}", "custom_id": line["custom_id"]}
    code = error_code(line["response_body"])
    if line["state"] == JobState.CANCELED:
        return {**head, "response": None, "error": {"code": BATCH_CANCELLED, "message": line["error"]}}
    if line["state"] == JobState.FAILED and code in GATEWAY_CODES:
        return {**head, "response": None, "error": {"code": code, "message": line["error"]}}
    response = {
        "status_code": line["response_status"],
        "request_id": f"req_{line['id'].hex}",
        "body": line["response_body"],
    }
    return {**head, "response": response, "error": None}


def write_result_files(batch: Batch) -> Result:
    """Write the batch's output and error files from its lines (read in chunks: bounded memory)."""
    with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as failures:
        completed = failed = 0
        expired = False
        lines = InferenceRequest.objects.filter(batch=batch).order_by("line_number").values(*LINE_FIELDS)
        for line in lines.iterator(chunk_size=READ_CHUNK):
            if line["state"] == JobState.COMPLETED:
                completed += 1
                target: IO[bytes] = output
            else:
                failed += line["state"] == JobState.FAILED
                expired = expired or error_code(line["response_body"]) == BATCH_EXPIRED
                target = failures
            target.write(orjson.dumps(result_line(line)) + b"\n")
        files = [
            store(handle, batch, f"{batch.public_id}_{kind}.jsonl") if handle.tell() else None
            for handle, kind in ((output, "output"), (failures, "error"))
        ]
    return Result(files[0], files[1], completed, failed, expired)


def store(handle: IO[bytes], batch: Batch, filename: str) -> StoredFile:
    handle.seek(0)
    return create_file(
        File(handle, name=filename),
        owner_id=batch.owner_id,
        api_key_id=batch.api_key_id,
        filename=filename,
        purpose=FilePurpose.BATCH_OUTPUT,
    )
