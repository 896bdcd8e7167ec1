"""What the gateway's process spends per /ai/ request: a model call and two kinds of refusal,
with metrics off and on.

    .venv/bin/python bench/hot_path_cost.py [--requests 2000] [--rounds 3] [--clients 8] [--root CHECKOUT]

Starts the fake upstream (bench/mock_upstream.py) and two gateway processes of CHECKOUT (this one
by default; another worktree measures an older commit the same way) on one scratch SQLite database,
set up with the management commands: one with GATEWAY_METRICS off, one with it on. In rounds that
alternate the two, it sends `--requests` calls of each kind and reads the serving process's CPU time
(utime + stime of /proc/PID/stat) before and after, then waits for the usage writer to finish so
the records of the round are paid for in that round:

- ``call``            a paid chat completion (the bench body), answered by the upstream;
- ``stream``          the same with ``stream: true`` (and the usage chunk), relayed event by event;
- ``unknown_key``     a key the gateway never issued: 401 invalid_api_key;
- ``unknown_model``   a valid key and a model that does not exist: 404 model_not_found.

Prints one ``BENCHJSON {...}`` line per process and kind: the median over rounds of CPU
microseconds per request, and the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from responses_cost import cpu_seconds, free_port, wait_up

PY = sys.executable
CHAT = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly and precisely."},
        {"role": "user", "content": "In one sentence, what does an AI gateway add between a client and a model?"},
    ],
    "max_tokens": 64,
    "temperature": 0.2,
}
KINDS = {  # kind -> (model, use the bench key, expected status)
    "call": ("bench-model", True, 200),
    "stream": ("bench-model", True, 200),
    "unknown_key": ("bench-model", False, 401),
    "unknown_model": ("no-such-model", True, 404),
}
SETTLE_SECONDS = 1.5  # longer than the usage writer's flush interval


def setup(root: Path, env: dict[str, str], upstream: str) -> str:
    """The catalog, through the management commands; returns the bench key's secret."""

    def manage(*args: str) -> str:
        return subprocess.run(
            [PY, "manage.py", *args], cwd=root, env=env, check=True, capture_output=True, text=True
        ).stdout

    manage("migrate", "--noinput")
    manage("add_endpoint", "mock", upstream)
    prices = ("--input-price", "0.50", "--output-price", "1.50", "--public")
    manage("add_model", "bench-model", "--endpoint", "mock", "--upstream-model", "bench-model", *prices)
    manage("create_user", "bench", "--credits", "1000000")
    return manage("create_api_key", "bench", "--name", "bench").strip().splitlines()[-1]


def measure(pid: int, url: str, secret: str, kind: str, requests: int, clients: int) -> float:
    """CPU microseconds of the gateway process per request, the records' writing included."""
    model, keyed, expected = KINDS[kind]
    key = secret if keyed else "sk-" + "x" * 43
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    streamed = {"stream": True, "stream_options": {"include_usage": True}} if kind == "stream" else {}
    body = orjson.dumps({**CHAT, "model": model, **streamed})
    pool = [httpx.Client(headers=headers, timeout=30) for _ in range(clients)]

    def send(n: int) -> None:
        reply = pool[n % clients].post(url, content=body)
        if reply.status_code != expected:
            raise RuntimeError(f"{kind}: HTTP {reply.status_code}, expected {expected}: {reply.text[:300]}")

    try:
        with ThreadPoolExecutor(clients) as executor:
            before = cpu_seconds(pid)
            list(executor.map(send, range(requests)))
            time.sleep(SETTLE_SECONDS)
            after = cpu_seconds(pid)
    finally:
        for client in pool:
            client.close()
    # The idle wait costs the process almost nothing; it is measured, not subtracted.
    return (after - before) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    root = args.root.resolve()
    work = Path(tempfile.mkdtemp(prefix="dwctl-hot-path-cost-"))
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work}/db.sqlite3",
        "DJANGO_SECRET_KEY": "bench-secret",
        "GATEWAY_ENCRYPTION_KEYS": "Ce1Y1ZhtUeMofhyL2xlKiK3zAh2JWAYCXPBF0TNtN5U=",  # a throwaway key
        "ALLOWED_HOSTS": "*",
        "DJANGO_DEBUG": "0",
    }
    mock_port = free_port()
    processes = []
    try:
        mock = subprocess.Popen(
            [PY, str(Path(__file__).resolve().parent / "mock_upstream.py"), "--port", str(mock_port)]
        )
        processes.append(mock)
        wait_up(f"http://127.0.0.1:{mock_port}/health")
        secret = setup(root, env, f"http://127.0.0.1:{mock_port}/v1")
        gateways = {}
        for metrics in ("off", "on"):
            port = free_port()
            server_env = {
                **env,
                "GATEWAY_METRICS": "1" if metrics == "on" else "0",
                "GATEWAY_JOURNAL_DIR": str(work / f"journal-{metrics}"),
            }
            server = [PY, "-m", "dwctl_site.server", "--host", "127.0.0.1", "--port", str(port)]
            gateway = subprocess.Popen([*server, "--log-level", "warning"], cwd=root, env=server_env)
            processes.append(gateway)
            wait_up(f"http://127.0.0.1:{port}/ai/v1/models")
            gateways[metrics] = (gateway.pid, f"http://127.0.0.1:{port}/ai/v1/chat/completions")
        for pid, url in gateways.values():  # warm up: imports, pools, the snapshot
            for kind in KINDS:
                measure(pid, url, secret, kind, 200, args.clients)
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for kind in KINDS:
                for metrics, (pid, url) in gateways.items():
                    cost = measure(pid, url, secret, kind, args.requests, args.clients)
                    samples.setdefault((metrics, kind), []).append(cost)
        for (metrics, kind), values in samples.items():
            line = {
                "metrics": metrics,
                "kind": kind,
                "cpu_us_per_request": round(statistics.median(values), 1),
                "rounds": [round(value, 1) for value in values],
            }
            print("BENCHJSON " + orjson.dumps(line).decode())
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
