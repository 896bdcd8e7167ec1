#!/usr/bin/env python3
"""Flex queue benchmark: held clients, queue throughput and idle latency.

It starts its own processes against a fresh database: two mock upstreams (one answering after
FLEX_DELAY_MS, one at once), one gateway process (uvicorn) and, when the phase needs it, one
``manage.py qcluster`` with FLEX_WORKERS worker processes. Then:

1. **held clients** — FLEX_CLIENTS concurrent blocking flex chat completions while no worker
   runs: once every job is queued, the gateway's VmRSS and thread count (from /proc) with all
   of them held, against the same figures idle.
2. **throughput** — the worker cluster starts and drains those jobs against the slow upstream:
   jobs/s (first claim to last completion), peak calls in flight (sampled from the queue),
   and how many clients got their 200.
3. **latency** — on the idle system, FLEX_LATENCY_SAMPLES blocking flex calls one after another
   on the fast upstream: client-seen submit → result time (p50 / p95 / max).

Run by bench/run.sh's flex hook (it reads BENCH_RESULTS, BENCH_WORK_DIR, BENCH_LOG_DIR,
BENCH_PYTHON, BENCH_DATABASE_URL) or on its own: ``.venv/bin/python bench/flex.py``.
Results are printed and, with BENCH_RESULTS set, appended there as JSON lines with "kind": "flex".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = os.environ.get("BENCH_PYTHON") or sys.executable
WORK_DIR = Path(os.environ.get("BENCH_WORK_DIR") or tempfile.mkdtemp(prefix="dwctl-flex-"))
LOG_DIR = Path(os.environ.get("BENCH_LOG_DIR") or WORK_DIR)
RESULTS = os.environ.get("BENCH_RESULTS", "")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{WORK_DIR / 'flex.sqlite3'}"
CLIENTS = int(os.environ.get("FLEX_CLIENTS", "1000"))
DELAY_MS = int(os.environ.get("FLEX_DELAY_MS", "1000"))
WORKERS = int(os.environ.get("FLEX_WORKERS", "2"))
LATENCY_SAMPLES = int(os.environ.get("FLEX_LATENCY_SAMPLES", "20"))
SECRET = "bench-flex-secret-key"  # noqa: S105  (the throwaway Django secret of the bench processes)
# The throwaway key that encrypts the bench endpoints' credentials (a fixed valid Fernet key).
ENCRYPTION_KEY = "Ce1Y1ZhtUeMofhyL2xlKiK3zAh2JWAYCXPBF0TNtN5U="

_children: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": DATABASE_URL,
        "DJANGO_SECRET_KEY": SECRET,
        "GATEWAY_ENCRYPTION_KEYS": ENCRYPTION_KEY,
        "GATEWAY_QCLUSTER_WORKERS": str(WORKERS),
        "GATEWAY_LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "dwctl_site.settings"),
    }
    env.pop("GATEWAY_QCLUSTER_SYNC", None)
    return env


def start(name: str, *args: str) -> subprocess.Popen[bytes]:
    log = (LOG_DIR / f"flex-{name}.log").open("ab")
    process = subprocess.Popen(
        [*args], cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    _children.append(process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB and the thread count of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in {"VmRSS", "VmHWM", "Threads"}:
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(session: int) -> float:
    """CPU time (user + system) of the live processes of a session (a child started here and its children)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # process group id: start_new_session made it the child's pid
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def record(**fields: object) -> None:
    line = json.dumps({"kind": "flex", **fields})
    print(line, flush=True)
    if RESULTS:
        with open(RESULTS, "a") as out:
            out.write(line + "\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- database -------------------------------------------------------------------------------------


def setup_django() -> None:
    os.environ.update(
        {k: v for k, v in child_env().items() if k in {"DATABASE_URL", "DJANGO_SECRET_KEY", "GATEWAY_ENCRYPTION_KEYS"}}
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dwctl_site.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def seed(slow_base: str, fast_base: str) -> str:
    from accounts.services import create_api_key
    from billing.services import create_user
    from gateway.models import DeployedModel
    from gateway.services import add_endpoint, add_model

    user = create_user("flex-bench", credits=Decimal(1_000_000), groups=["bench"])
    prices: dict[str, Any] = {
        "input_price": Decimal("0.50"),
        "output_price": Decimal("1.50"),
        "flex_input_price": Decimal("0.25"),
        "flex_output_price": Decimal("0.75"),
    }
    slow, _ = add_endpoint("flex-slow", slow_base, api_key="bench", timeout_seconds=60)
    fast, _ = add_endpoint("flex-fast", fast_base, api_key="bench", timeout_seconds=60)
    add_model("flex-slow", endpoint=slow, upstream_model="bench-model", groups=["bench"], **prices)
    add_model("flex-fast", endpoint=fast, upstream_model="bench-model", groups=["bench"], **prices)
    DeployedModel.objects.filter(alias__in=["flex-slow", "flex-fast"]).update(flex_concurrency=CLIENTS)
    return create_api_key(user, name="flex bench")[1]


def queue_counts() -> dict[str, int]:
    from django.db import close_old_connections
    from django.db.models import Count

    from gateway.models import InferenceRequest

    try:
        return dict(InferenceRequest.objects.values_list("state").annotate(n=Count("id")).values_list("state", "n"))
    finally:
        close_old_connections()


def drain_window() -> tuple[float, int]:
    """Seconds from the first claim to the last completion, and the jobs completed in between."""
    from django.db.models import Max, Min

    from gateway.models import InferenceRequest

    done = InferenceRequest.objects.filter(state="completed", model_alias="flex-slow")
    span = done.aggregate(first=Min("claimed_at"), last=Max("completed_at"))
    if span["first"] is None:
        return 0.0, 0
    # claimed_at is the last claim (a retried job is claimed again); the earliest one is close enough.
    return (span["last"] - span["first"]).total_seconds(), done.count()


# --- load -----------------------------------------------------------------------------------------


async def flex_call(session, url: str, model: str, n: int) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    body = {"model": model, "messages": [{"role": "user", "content": f"job {n}"}], "service_tier": "flex"}
    started = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as reply:
        await reply.read()
        return reply.status, time.perf_counter() - started


async def held_clients_and_throughput(url: str, gateway: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    import aiohttp

    idle = proc_status(gateway.pid)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        calls = [asyncio.create_task(flex_call(session, url, "flex-slow", n)) for n in range(CLIENTS)]
        submitted = time.monotonic()
        while (await asyncio.to_thread(queue_counts)).get("pending", 0) < CLIENTS:
            if time.monotonic() - submitted > 120:
                raise RuntimeError(f"only {(await asyncio.to_thread(queue_counts))} of {CLIENTS} jobs were queued")
            await asyncio.sleep(0.2)
        queued_s = time.monotonic() - submitted
        await asyncio.sleep(1)
        held = proc_status(gateway.pid)
        record(
            what="held_clients",
            clients=CLIENTS,
            queued_in_s=round(queued_s, 2),
            idle_rss_kb=idle["VmRSS"],
            held_rss_kb=held["VmRSS"],
            rss_per_client_kb=round((held["VmRSS"] - idle["VmRSS"]) / CLIENTS, 1),
            idle_threads=idle["Threads"],
            held_threads=held["Threads"],
        )

        cluster = start("qcluster", PY, "manage.py", "qcluster")
        started = time.monotonic()
        gateway_cpu = cpu_seconds(gateway.pid)
        peak = 0
        while not all(call.done() for call in calls):
            peak = max(peak, (await asyncio.to_thread(queue_counts)).get("processing", 0))
            await asyncio.sleep(0.25)
            if time.monotonic() - started > 600:
                raise RuntimeError("the queue did not drain within 10 minutes")
        wall = time.monotonic() - started
        gateway_cpu = cpu_seconds(gateway.pid) - gateway_cpu
        cluster_cpu = cpu_seconds(cluster.pid)
        results = [call.result() for call in calls]
    window, completed = await asyncio.to_thread(drain_window)
    peak_status = proc_status(gateway.pid)
    record(
        what="throughput",
        jobs=CLIENTS,
        workers=WORKERS,
        upstream_delay_ms=DELAY_MS,
        ok=sum(1 for status, _ in results if status == 200),
        completed=completed,
        jobs_per_s=round(completed / window, 1) if window else 0,
        drain_window_s=round(window, 2),
        wall_s_from_cluster_start=round(wall, 2),
        peak_in_flight=peak,
        gateway_peak_rss_kb=peak_status["VmHWM"],
        gateway_cpu_s=round(gateway_cpu, 1),
        workers_cpu_s=round(cluster_cpu, 1),
    )
    return cluster


async def idle_latency(url: str) -> None:
    import aiohttp

    await asyncio.sleep(3)  # let the cluster settle: idle system
    latencies = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for n in range(LATENCY_SAMPLES):
            status, seconds = await flex_call(session, url, "flex-fast", n)
            if status == 200:
                latencies.append(seconds * 1000)
    record(
        what="idle_latency",
        samples=len(latencies),
        p50_ms=round(statistics.median(latencies), 1) if latencies else None,
        p95_ms=round(percentile(latencies, 0.95), 1) if latencies else None,
        max_ms=round(max(latencies), 1) if latencies else None,
    )


KEY = ""


def main() -> None:
    global KEY
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop  # noqa: F401

        loop_args = ["--loop", "uvloop", "--http", "httptools"]
    except ImportError:
        loop_args = []
    slow_port, fast_port, gateway_port = free_port(), free_port(), free_port()
    mock = str(ROOT / "bench" / "mock_upstream.py")
    try:
        slow = start("mock-slow", PY, mock, "--port", str(slow_port), "--delay-ms", str(DELAY_MS))
        fast = start("mock-fast", PY, mock, "--port", str(fast_port))
        subprocess.run(
            [PY, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=child_env(), check=True, stdout=subprocess.DEVNULL
        )
        setup_django()
        KEY = seed(f"http://127.0.0.1:{slow_port}/v1", f"http://127.0.0.1:{fast_port}/v1")
        wait_port(slow_port, slow)
        wait_port(fast_port, fast)
        gateway = start(
            "gateway",
            f"{Path(PY).parent}/uvicorn",
            "dwctl_site.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(gateway_port),
            "--no-access-log",
            "--log-level",
            "warning",
            "--lifespan",
            "on",
            "--backlog",
            str(max(2048, CLIENTS * 2)),
            *loop_args,
        )
        wait_port(gateway_port, gateway)
        url = f"http://127.0.0.1:{gateway_port}/ai/v1/chat/completions"
        print(
            f"flex bench: {CLIENTS} clients, upstream {DELAY_MS} ms, {WORKERS} workers, db {DATABASE_URL}", flush=True
        )
        asyncio.run(held_clients_and_throughput(url, gateway))
        asyncio.run(idle_latency(url))
    finally:
        for process in reversed(_children):
            stop(process)


if __name__ == "__main__":
    main()
