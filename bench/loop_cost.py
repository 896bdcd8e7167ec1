"""What the multi-step loop of /responses (server tools) costs the gateway's process, per step.

    .venv/bin/python bench/loop_cost.py [--requests 300] [--rounds 3] [--clients 4]

Starts the tests' fake upstream (its `agent` model follows a plan of tool calls, tests/upstream.py)
and tool server in this process, and one gateway process on a scratch SQLite database, set up with
its management commands: a paid model on a native endpoint and a server tool (`add_tool`) offered
on it. Then, in alternating rounds, sends `--requests` blocking /responses calls whose plan makes 0,
1 or 2 tool steps (1, 2 or 3 model calls), and a pass-through baseline (the same model and plan,
tools not offered), and reads the gateway's CPU time (utime + stime of /proc/PID/stat). Prints one
`BENCHJSON {...}` line per plan (median CPU microseconds per request over the rounds) and the cost
of one more step (model call + tool call): the slope from 0 to 2 tool steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.responses_cost import cpu_seconds, free_port, wait_up  # noqa: E402
from tests.upstream import FakeUpstream, ToolServer  # noqa: E402

PY = sys.executable
PLANS = {"pass_through": ("bench-plain", "just answer"), "steps_0": ("bench-tools", "just answer")}
PLANS |= {"steps_1": ("bench-tools", "plan: lookup"), "steps_2": ("bench-tools", "plan: lookup, lookup")}


def setup(env: dict[str, str], upstream: str, tool_url: str) -> str:
    def manage(*args: str) -> str:
        return subprocess.run(
            [PY, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
        ).stdout

    manage("migrate", "--noinput")
    manage("add_endpoint", "native", upstream)
    prices = ("--input-price", "0.50", "--output-price", "1.50", "--public")
    for alias in ("bench-plain", "bench-tools"):
        manage("add_model", alias, "--endpoint", "native", "--upstream-model", "agent", *prices)
    schema = orjson.dumps({"type": "object", "properties": {"query": {"type": "string"}}}).decode()
    manage("add_tool", "lookup", tool_url, "--description", "Look up.", "--parameters", schema,
           "--model", "bench-tools", "--group", "Everyone")  # fmt: skip
    manage("create_user", "bench", "--credits", "1000000")
    return manage("create_api_key", "bench", "--name", "bench").strip().splitlines()[-1]


def measure(pid: int, url: str, secret: str, model: str, plan: str, requests: int, clients: int) -> float:
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    body = orjson.dumps({"model": model, "input": plan})
    pool = [httpx.Client(headers=headers, timeout=30) for _ in range(clients)]

    def send(n: int) -> None:
        reply = pool[n % clients].post(url, content=body)
        if reply.status_code != 200 or reply.json()["status"] != "completed":
            raise RuntimeError(f"{model} {plan}: HTTP {reply.status_code}: {reply.text[:300]}")

    try:
        with ThreadPoolExecutor(clients) as executor:
            before = cpu_seconds(pid)
            list(executor.map(send, range(requests)))
            after = cpu_seconds(pid)
    finally:
        for client in pool:
            client.close()
    return (after - before) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dwctl-loop-cost-"))
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work}/db.sqlite3",
        "DJANGO_SECRET_KEY": "bench-secret",
        "GATEWAY_ENCRYPTION_KEYS": "Ce1Y1ZhtUeMofhyL2xlKiK3zAh2JWAYCXPBF0TNtN5U=",  # a throwaway key
        "GATEWAY_JOURNAL_DIR": str(work / "journal"),
        "ALLOWED_HOSTS": "*",
    }
    upstream, tools = FakeUpstream().start(), ToolServer().start()
    gateway_port = free_port()
    gateway = None
    try:
        secret = setup(env, upstream.base_url, tools.url("lookup"))
        server = [PY, "-m", "dwctl_site.server", "--host", "127.0.0.1", "--port", str(gateway_port)]
        gateway = subprocess.Popen([*server, "--log-level", "warning", "--lifespan", "off"], cwd=ROOT, env=env)
        wait_up(f"http://127.0.0.1:{gateway_port}/ai/v1/models")
        url = f"http://127.0.0.1:{gateway_port}/ai/v1/responses"
        for model, plan in PLANS.values():  # warm up every path
            measure(gateway.pid, url, secret, model, plan, 50, args.clients)
        samples: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, (model, plan) in PLANS.items():
                samples.setdefault(name, []).append(
                    measure(gateway.pid, url, secret, model, plan, args.requests, args.clients)
                )
        medians = {name: statistics.median(values) for name, values in samples.items()}
        for name, values in samples.items():
            line = {"plan": name, "cpu_us_per_request": round(medians[name], 1), "rounds": [round(v) for v in values]}
            print("BENCHJSON " + orjson.dumps(line).decode())
        per_step = (medians["steps_2"] - medians["steps_0"]) / 2
        print("BENCHJSON " + orjson.dumps({"cpu_us_per_tool_step": round(per_step, 1)}).decode())
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        upstream.stop()
        tools.stop()


if __name__ == "__main__":
    main()
