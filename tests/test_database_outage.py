"""A database outage under load: real-time calls are served throughout, and billed once when it returns.

The gateway runs on a PostgreSQL server of this test's own, which the test stops and starts again.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from django.db import connection

from tests.conftest import HELLO, ROOT, GatewayProcess, live_process_env, wait_for
from tests.upstream import free_port

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(PG_BIN is None or shutil.which("runuser") is None, reason="needs PostgreSQL's server binaries"),
]
SEED = """
from decimal import Decimal
from accounts.services import create_api_key
from billing.services import create_user
from gateway.services import add_endpoint, add_model
endpoint, _ = add_endpoint("fake", "{upstream}", timeout_seconds=5)
add_model("gpt-test", endpoint=endpoint, public=True, input_price=Decimal("0.5"), output_price=Decimal("1.5"))
print(create_api_key(create_user("erin", credits=100))[1])
"""


class Cluster:
    """A throwaway PostgreSQL server, run as the postgres user."""

    def __init__(self) -> None:
        # Not under pytest's own temporary directory, which only root may enter.
        self.data, self.port = Path(tempfile.mkdtemp(prefix="dwctl-pg-")), free_port()
        shutil.chown(self.data, "postgres")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        assert PG_BIN is not None
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args],
            check=True,
            capture_output=True,
            cwd=self.data,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.data / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def count(self, sql: str) -> int:
        with psycopg.connect(self.url) as db:
            row = db.execute(sql).fetchone()
            return int(row[0]) if row else 0


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if connection.vendor != "postgresql":
        pytest.skip("runs in the PostgreSQL suite")
    server = Cluster()
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(server.data, ignore_errors=True)


def test_an_outage_under_load_serves_realtime_and_bills_every_answer_once(world, cluster):
    env = {**live_process_env(), "DATABASE_URL": cluster.url, "REDIS_PREFIX": f"outage{cluster.port}"}
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], cwd=ROOT, env=env, check=True, capture_output=True)
    seeded = subprocess.run(
        [*manage, "shell", "-c", SEED.format(upstream=world.upstream.base_url)],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {seeded.stdout.strip().splitlines()[-1]}"}
    statuses: list[int] = []
    stop = threading.Event()

    with GatewayProcess(DATABASE_URL=cluster.url, REDIS_PREFIX=env["REDIS_PREFIX"]) as gateway:

        def load() -> None:
            with httpx.Client(base_url=f"{gateway.url}/ai/v1", headers=headers, timeout=15) as client:
                while not stop.is_set():
                    reply = client.post("/chat/completions", json={"model": "gpt-test", "messages": HELLO})
                    statuses.append(reply.status_code)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(statuses) >= 20, timeout=30)

        cluster.stop()
        during = len(statuses)
        client = httpx.Client(base_url=f"{gateway.url}/ai/v1", headers=headers, timeout=15)
        answered = client.post("/responses", json={"model": "gpt-test", "input": "hi"})
        started = time.monotonic()
        flex = {"model": "gpt-test", "messages": HELLO, "service_tier": "flex"}
        queued = client.post("/chat/completions", json=flex)
        refused_in = time.monotonic() - started
        time.sleep(10)  # the outage, under load
        served_during = len(statuses) - during
        cluster.start()
        back = time.monotonic()
        response_id = answered.json()["id"]
        wait_for(lambda: client.get(f"/responses/{response_id}").status_code == 200, timeout=30, interval=0.1)
        recovered_in = time.monotonic() - back
        stop.set()
        for thread in threads:
            thread.join(20)

        ok = statuses.count(200)
        # Every answer is charged once: the chat calls, and the /responses call answered during the outage.
        wait_for(lambda: cluster.count("select count(*) from billing_credittransaction where kind='usage'") == ok + 1,
                 timeout=30)  # fmt: skip
    print(f"served {served_during} calls during the outage; 503 in {refused_in:.2f} s; back in {recovered_in:.2f} s")
    assert served_during > 0
    assert all(status == 200 for status in statuses)
    assert answered.status_code == 200
    assert queued.status_code == 503 and queued.json()["error"]["code"] == "database_unavailable"
    assert queued.headers["Retry-After"] == "2"
    assert cluster.count("select count(distinct source_id) from billing_credittransaction") == ok + 2  # + the grant
