"""What a /responses call costs the gateway's process, native pass-through beside translation to chat completions.

    .venv/bin/python bench/responses_cost.py [--requests 1000] [--rounds 3] [--clients 4]

Starts the fake upstream (bench/mock_upstream.py) and one gateway process on a scratch SQLite
database, set up with its management commands: an endpoint that serves /responses natively and
one set to `--responses translate` on the same upstream, a paid model on each. Then, in rounds that
alternate the targets, sends `--requests` /responses calls (JSON and `stream: true`) and reads the
gateway's CPU time (utime + stime of /proc/PID/stat) before and after. Prints one `BENCHJSON {...}`
line per target and mode: the median over rounds of CPU microseconds per request, and the
translated / native ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
BODY = {
    "input": "In one sentence, what does an AI gateway add between a client and a model provider?",
    "instructions": "You are a helpful assistant. Answer briefly and precisely.",
    "max_output_tokens": 64,
    "temperature": 0.2,
}
TARGETS = {"native": "bench-native", "translated": "bench-translated"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def setup(env: dict[str, str], upstream: str) -> str:
    """The catalog, through the management commands; returns the bench key's secret."""

    def manage(*args: str) -> str:
        return subprocess.run(
            [PY, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
        ).stdout

    manage("migrate", "--noinput")
    manage("add_endpoint", "native", upstream)
    manage("add_endpoint", "chat-only", upstream, "--responses", "translate")
    prices = ("--input-price", "0.50", "--output-price", "1.50", "--public")
    manage("add_model", "bench-native", "--endpoint", "native", "--upstream-model", "bench-model", *prices)
    manage("add_model", "bench-translated", "--endpoint", "chat-only", "--upstream-model", "bench-model", *prices)
    manage("create_user", "bench", "--credits", "1000000")
    return manage("create_api_key", "bench", "--name", "bench").strip().splitlines()[-1]


def send(client: httpx.Client, url: str, model: str, stream: bool) -> None:
    body = orjson.dumps({**BODY, "model": model, **({"stream": True} if stream else {})})
    with client.stream("POST", url, content=body) as reply:
        raw = reply.read()
    if reply.status_code != 200 or b'"usage"' not in raw:
        raise RuntimeError(f"{model}: HTTP {reply.status_code}: {raw[:300]!r}")


def measure(pid: int, url: str, secret: str, model: str, stream: bool, requests: int, clients: int) -> float:
    """CPU microseconds of the gateway process per request, over `requests` calls from `clients` threads."""
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    pool = [httpx.Client(headers=headers, timeout=30) for _ in range(clients)]
    try:
        with ThreadPoolExecutor(clients) as executor:
            before = cpu_seconds(pid)
            list(executor.map(lambda n: send(pool[n % clients], url, model, stream), range(requests)))
            after = cpu_seconds(pid)
    finally:
        for client in pool:
            client.close()
    return (after - before) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dwctl-responses-cost-"))
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work}/db.sqlite3",
        "DJANGO_SECRET_KEY": "bench-secret",
        "GATEWAY_ENCRYPTION_KEYS": "Ce1Y1ZhtUeMofhyL2xlKiK3zAh2JWAYCXPBF0TNtN5U=",  # a throwaway key
        "GATEWAY_JOURNAL_DIR": str(work / "journal"),
        "ALLOWED_HOSTS": "*",
    }
    mock_port, gateway_port = free_port(), free_port()
    processes = []
    try:
        mock = subprocess.Popen([PY, str(ROOT / "bench" / "mock_upstream.py"), "--port", str(mock_port)])
        processes.append(mock)
        wait_up(f"http://127.0.0.1:{mock_port}/health")
        secret = setup(env, f"http://127.0.0.1:{mock_port}/v1")
        server = [PY, "-m", "dwctl_site.server", "--host", "127.0.0.1", "--port", str(gateway_port)]
        gateway = subprocess.Popen([*server, "--log-level", "warning", "--lifespan", "off"], cwd=ROOT, env=env)
        processes.append(gateway)
        wait_up(f"http://127.0.0.1:{gateway_port}/ai/v1/models")
        url = f"http://127.0.0.1:{gateway_port}/ai/v1/responses"
        for model in TARGETS.values():  # warm up both paths: imports, pools, snapshot
            for stream in (False, True):
                measure(gateway.pid, url, secret, model, stream, 200, args.clients)
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for mode, stream in (("json", False), ("stream", True)):
                for target, model in TARGETS.items():
                    cost = measure(gateway.pid, url, secret, model, stream, args.requests, args.clients)
                    samples.setdefault((target, mode), []).append(cost)
        for mode in ("json", "stream"):
            native = statistics.median(samples[("native", mode)])
            translated = statistics.median(samples[("translated", mode)])
            for target, median in (("native", native), ("translated", translated)):
                rounds = [round(value, 1) for value in samples[(target, mode)]]
                line = {"target": target, "mode": mode, "cpu_us_per_request": round(median, 1), "rounds": rounds}
                print("BENCHJSON " + orjson.dumps(line).decode())
            ratio = {"mode": mode, "translated_over_native": round(translated / native, 3)}
            print("BENCHJSON " + orjson.dumps(ratio).decode())
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
