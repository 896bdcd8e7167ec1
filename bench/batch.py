#!/usr/bin/env python3
"""Batch API benchmark: a 50,000-line upload and create, then a batch run by two worker processes.

It starts its own processes against a fresh database (the helpers of bench/flex.py): a mock
upstream answering after BATCH_DELAY_MS, one gateway process (uvicorn) and, for the run, one
``manage.py qcluster`` with FLEX_WORKERS worker processes. Then:

1. **create** — BATCH_CREATE_LINES lines uploaded with the official client and made a batch while
   no worker runs: upload and create times, and the gateway's RSS growth (VmHWM, its peak, after
   both, against VmRSS before). That batch is then cancelled (its lines are not run).
2. **run** — a batch of BATCH_RUN_LINES lines on the slow upstream; the cluster starts and runs
   it: lines/s from the first claim to the last line's end, and the wall time to `completed`.
   Real-time chat completions on a second, instant mock upstream (REALTIME_CONNECTIONS at a time for
   REALTIME_SECONDS) are measured before the cluster starts and again while the batch runs.

``.venv/bin/python bench/batch.py`` (SQLite in a temporary directory), or with
``BENCH_DATABASE_URL=postgres://…`` on PostgreSQL. Results print as JSON lines ("kind": "batch").
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flex as fx

CREATE_LINES = int(os.environ.get("BATCH_CREATE_LINES", "50000"))
RUN_LINES = int(os.environ.get("BATCH_RUN_LINES", "10000"))
DELAY_MS = int(os.environ.get("BATCH_DELAY_MS", "1000"))
CONCURRENCY = int(os.environ.get("BATCH_CONCURRENCY", "400"))  # the model's flex_concurrency
REALTIME_CONNECTIONS = int(os.environ.get("REALTIME_CONNECTIONS", "16"))
REALTIME_SECONDS = float(os.environ.get("REALTIME_SECONDS", "8"))


def record(**fields: object) -> None:
    print(json.dumps({"kind": "batch", "db": fx.DATABASE_URL.split(":", 1)[0], **fields}), flush=True)


def seed(base: str, fast_base: str) -> str:
    from accounts.services import create_api_key
    from billing.services import create_user
    from gateway.models import DeployedModel
    from gateway.services import add_endpoint, add_model

    user = create_user("batch-bench", credits=Decimal(1_000_000), groups=["bench"])
    endpoint, _ = add_endpoint("batch-slow", base, api_key="bench", timeout_seconds=60)
    add_model(
        "batch-slow",
        endpoint=endpoint,
        upstream_model="bench-model",
        groups=["bench"],
        input_price="0.50",
        output_price="1.50",
        batch_input_price="0.10",
        batch_output_price="0.30",
    )
    fast, _ = add_endpoint("batch-fast", fast_base, api_key="bench", timeout_seconds=60)
    add_model("realtime-fast", endpoint=fast, upstream_model="bench-model", groups=["bench"], input_price="0.50")
    DeployedModel.objects.filter(alias="batch-slow").update(flex_concurrency=CONCURRENCY)
    return create_api_key(user, name="batch bench")[1]


def batch_file(lines: int) -> Path:
    path = fx.WORK_DIR / f"batch-{lines}.jsonl"
    with path.open("wb") as out:
        for n in range(lines):
            body = {"model": "batch-slow", "messages": [{"role": "user", "content": f"line {n} " + "x" * 200}]}
            line = {"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            out.write(json.dumps(line).encode() + b"\n")
    return path


def create(client, path: Path) -> tuple[str, float, float]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    uploaded_s = time.perf_counter() - started
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    return batch.id, uploaded_s, time.perf_counter() - started


async def realtime_rate(url: str, key: str) -> float:
    """Real-time chat completions per second (200s only), REALTIME_CONNECTIONS at a time."""
    import asyncio

    import aiohttp

    body = {"model": "realtime-fast", "messages": [{"role": "user", "content": "hi"}]}
    ok = 0
    stop_at = time.monotonic() + REALTIME_SECONDS

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        while time.monotonic() < stop_at:
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as reply:
                await reply.read()
                ok += reply.status == 200

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(REALTIME_CONNECTIONS)))
    return ok / REALTIME_SECONDS


def run_window(batch_id: str) -> float:
    from django.db.models import Max, Min

    from gateway.models import InferenceRequest

    lines = InferenceRequest.objects.filter(batch_id=batch_id.removeprefix("batch_"), state="completed")
    span = lines.aggregate(first=Min("claimed_at"), last=Max("completed_at"))
    return (span["last"] - span["first"]).total_seconds()


def main() -> None:
    import openai

    fx.LOG_DIR.mkdir(parents=True, exist_ok=True)
    # The bench's files and journals stay in its own directory (its child processes inherit these).
    os.environ["GATEWAY_FILES_DIR"] = str(fx.WORK_DIR / "files")
    os.environ["GATEWAY_JOURNAL_DIR"] = str(fx.WORK_DIR / "journal")
    upstream_port, fast_port, gateway_port = fx.free_port(), fx.free_port(), fx.free_port()
    try:
        upstream = fx.start(
            "mock-batch", fx.PY, str(fx.ROOT / "bench" / "mock_upstream.py"), "--port", str(upstream_port),
            "--delay-ms", str(DELAY_MS),
        )  # fmt: skip
        fast = fx.start("mock-fast", fx.PY, str(fx.ROOT / "bench" / "mock_upstream.py"), "--port", str(fast_port))
        fx.subprocess.run(
            [fx.PY, "manage.py", "migrate", "--noinput"],
            cwd=fx.ROOT,
            env=fx.child_env(),
            check=True,
            stdout=fx.subprocess.DEVNULL,
        )
        fx.setup_django()
        key = seed(f"http://127.0.0.1:{upstream_port}/v1", f"http://127.0.0.1:{fast_port}/v1")
        fx.wait_port(upstream_port, upstream)
        fx.wait_port(fast_port, fast)
        gateway = fx.start(
            "gateway", f"{Path(fx.PY).parent}/uvicorn", "dwctl_site.asgi:application", "--host", "127.0.0.1",
            "--port", str(gateway_port), "--no-access-log", "--log-level", "warning", "--lifespan", "on",
        )  # fmt: skip
        fx.wait_port(gateway_port, gateway)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/ai/v1", api_key=key, timeout=600, max_retries=0
        )

        path = batch_file(CREATE_LINES)
        time.sleep(1)
        before = fx.proc_status(gateway.pid)
        batch_id, upload_s, create_s = create(client, path)
        after = fx.proc_status(gateway.pid)
        record(
            what="create",
            lines=CREATE_LINES,
            file_mb=round(path.stat().st_size / 2**20, 1),
            upload_s=round(upload_s, 2),
            create_s=round(create_s, 2),
            rss_before_kb=before["VmRSS"],
            rss_peak_kb=after["VmHWM"],
            rss_growth_mb=round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
        )
        started = time.perf_counter()
        cancelled = client.batches.cancel(batch_id)
        record(
            what="cancel", lines=CREATE_LINES, status=cancelled.status, cancel_s=round(time.perf_counter() - started, 2)
        )

        if RUN_LINES:
            import asyncio

            realtime_url = f"http://127.0.0.1:{gateway_port}/ai/v1/chat/completions"
            idle_rate = asyncio.run(realtime_rate(realtime_url, key))
            run_id, _, _ = create(client, batch_file(RUN_LINES))
            cluster = fx.start("qcluster", fx.PY, "manage.py", "qcluster")
            started = time.monotonic()
            while client.batches.retrieve(run_id).request_counts.completed < 1:  # type: ignore[union-attr]
                time.sleep(0.2)
            busy_rate = asyncio.run(realtime_rate(realtime_url, key))
            still_running = client.batches.retrieve(run_id).status == "in_progress"
            record(
                what="realtime_during_batch",
                connections=REALTIME_CONNECTIONS,
                seconds=REALTIME_SECONDS,
                idle_req_per_s=round(idle_rate, 1),
                during_batch_req_per_s=round(busy_rate, 1),
                ratio=round(busy_rate / idle_rate, 3) if idle_rate else None,
                batch_still_running_at_end=still_running,
            )
            while (batch := client.batches.retrieve(run_id)).status not in {"completed", "failed", "expired"}:
                if time.monotonic() - started > 1800:
                    raise RuntimeError("the batch did not finish within 30 minutes")
                time.sleep(0.5)
            wall = time.monotonic() - started
            window = run_window(run_id)
            record(
                what="run",
                lines=RUN_LINES,
                workers=fx.WORKERS,
                upstream_delay_ms=DELAY_MS,
                flex_concurrency=CONCURRENCY,
                status=batch.status,
                completed=batch.request_counts.completed if batch.request_counts else None,
                lines_per_s=round(RUN_LINES / window, 1) if window else None,
                run_window_s=round(window, 1),
                wall_s_to_completed=round(wall, 1),
            )
            fx.stop(cluster)
    finally:
        for process in reversed(fx._children):
            fx.stop(process)


if __name__ == "__main__":
    tempfile.tempdir = str(fx.WORK_DIR)
    main()
