"""What a batch input file must be, checked line by line as it is read (never loaded whole).

Each line is one request: a JSON object with a string `custom_id` unique in the file, `method` "POST",
a `url` the Batch API serves (the same on every line) and a `body` object naming its `model`. Blank
lines may only end the file. The first line that breaks a rule is reported by its number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import IO, Any

import orjson

BATCH_URLS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses")


class InvalidBatchFile(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class BatchFile:
    line_count: int
    url: str


def read_batch_file(source: IO[bytes], *, max_lines: int, max_line_bytes: int) -> BatchFile:
    """Check every line of a batch input file; `InvalidBatchFile` names the first bad one."""
    # A digest per custom_id, not the id itself: memory stays bounded by the line count, whatever the ids' length.
    seen: dict[bytes, int] = {}
    url = ""
    requests = 0
    first_blank = 0
    number = 0
    while raw := source.readline(max_line_bytes + 1):
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise InvalidBatchFile(f"Line {number} is longer than the limit of {max_line_bytes} bytes.")
        if not raw.strip():
            first_blank = first_blank or number
            continue
        if first_blank:
            raise InvalidBatchFile(f"Line {first_blank} is blank: only the end of the file may have blank lines.")
        requests += 1
        if requests > max_lines:
            raise InvalidBatchFile(f"Line {number}: a batch file holds at most {max_lines} requests.")
        line = parse_line(raw, number)
        custom_id = line["custom_id"]
        digest = hashlib.blake2b(custom_id.encode(), digest_size=16).digest()
        if digest in seen:
            raise InvalidBatchFile(
                f"Line {number}: 'custom_id' {orjson.dumps(custom_id).decode()} is used on line {seen[digest]} too."
            )
        seen[digest] = number
        if not url:
            url = line["url"]
        elif line["url"] != url:
            raise InvalidBatchFile(
                f"Line {number}: 'url' is {line['url']}, but the file's first request calls {url}: "
                "all requests of a batch call one url."
            )
    if not requests:
        raise InvalidBatchFile("The file holds no request: a batch file has one JSON request per line.")
    return BatchFile(line_count=requests, url=url)


def parse_line(raw: bytes, number: int) -> dict[str, Any]:
    """One request line, checked on its own."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidBatchFile(f"Line {number} is not valid JSON ({exc}).") from None
    if not isinstance(line, dict):
        raise InvalidBatchFile(f"Line {number} is not a JSON object.")
    if not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        raise InvalidBatchFile(f"Line {number}: 'custom_id' must be a non-empty string.")
    if line.get("method") != "POST":
        raise InvalidBatchFile(f"Line {number}: 'method' must be \"POST\".")
    if line.get("url") not in BATCH_URLS:
        raise InvalidBatchFile(f"Line {number}: 'url' must be one of {', '.join(BATCH_URLS)}.")
    body = line.get("body")
    if not isinstance(body, dict):
        raise InvalidBatchFile(f"Line {number}: 'body' must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidBatchFile(f"Line {number}: 'body' must name its 'model' (a non-empty string).")
    return line
