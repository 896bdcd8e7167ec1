"""What the call journal costs per request: one append on the request path, one read back off it.

    .venv/bin/python bench/journal_cost.py [--records 100000]

Prints one `BENCHJSON {...}` line: microseconds per append (the `write()` every finished call
pays before its last byte goes out), per fsync-ed seal of a flush interval's segment, and per
record read back by the writer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dwctl_site.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret")

import django

django.setup()

from gateway.accounting import CallRecord, journal_line  # noqa: E402
from gateway.journal import Journal  # noqa: E402


def line(request_id: str) -> tuple[object, ...]:
    return journal_line(
        request_id=request_id,
        user_id=7,
        api_key_id=12,
        model_id=3,
        model_alias="gpt-bench",
        path="chat/completions",
        tier="realtime",
        status_code=200,
        started_at=time.time(),
        latency_ms=1.234,
        ttfb_ms=1.0,
        input_tokens=12,
        output_tokens=10,
        job_id=None,
        usage_estimated=False,
        committed=5_000,
        job=None,
        client_request_id="",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    request_ids = [uuid.uuid4().hex for _ in range(args.records)]
    with tempfile.TemporaryDirectory() as directory:
        journal = Journal(Path(directory), "bench")
        started = time.perf_counter()
        for request_id in request_ids:
            journal.append(line(request_id))  # built and written, as a finished call does
        append_us = (time.perf_counter() - started) / len(request_ids) * 1e6
        started = time.perf_counter()
        (segment,) = journal.seal()
        seal_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        read = [CallRecord.from_line(line) for line in segment.lines()]
        read_us = (time.perf_counter() - started) / len(read) * 1e6
        assert len(read) == len(request_ids)
    result = {
        "records": len(request_ids),
        "append_us": round(append_us, 2),
        "seal_fsync_ms": round(seal_ms, 2),
        "read_back_us": round(read_us, 2),
    }
    print("BENCHJSON " + orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
