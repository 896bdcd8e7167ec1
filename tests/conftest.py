"""Live servers for end-to-end tests: the fake upstream and the gateway on a free port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from django.conf import settings
from django.db import close_old_connections, connection

from accounts.models import User
from accounts.services import create_api_key
from billing.models import Balance, CreditTransaction
from gateway.models import DeployedModel
from gateway.services import add_endpoint, add_model
from gateway.worker import Runner, run_flex_jobs
from tests.conformance import conforming_client
from tests.management_client import api, platform_key  # noqa: F401  (fixtures of the management API's tests)
from tests.upstream import COMPLETION_TOKENS, PROMPT_TOKENS, FakeUpstream, free_port

PRICE_IN = Decimal("0.50")
PRICE_OUT = Decimal("1.50")
FLEX_IN = Decimal("0.25")
FLEX_OUT = Decimal("0.75")
REALTIME_COST = (PRICE_IN * PROMPT_TOKENS + PRICE_OUT * COMPLETION_TOKENS) / Decimal(1_000_000)
FLEX_COST = (FLEX_IN * PROMPT_TOKENS + FLEX_OUT * COMPLETION_TOKENS) / Decimal(1_000_000)
HELLO = [{"role": "user", "content": "hi"}]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def own_journal(tmp_path_factory) -> None:
    """A journal directory for this test run, which the gateway processes it starts share."""
    import os

    from django.conf import settings

    directory = str(tmp_path_factory.mktemp("journal"))
    settings.GATEWAY_JOURNAL_DIR = os.environ["GATEWAY_JOURNAL_DIR"] = directory


@pytest.fixture(scope="session", autouse=True)
def own_files(tmp_path_factory) -> Iterator[Path]:
    """A files directory for this test run, which the gateway processes it starts share."""
    from django.test import override_settings

    directory = tmp_path_factory.mktemp("files")
    os.environ["GATEWAY_FILES_DIR"] = str(directory)
    files = {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(directory)}}
    with override_settings(STORAGES={**settings.STORAGES, "files": files}):
        yield directory


@pytest.fixture(scope="session", autouse=True)
def block_only_the_tests_own_thread(django_db_blocker) -> None:  # type: ignore[no-untyped-def]
    """Outside database tests pytest-django blocks database access by swapping
    ``BaseDatabaseWrapper.ensure_connection`` for every thread at once. The live gateway's threads
    (and a flex worker's) stand for processes of their own: one blocked mid-connect, after taking a
    pooled connection and before switching it to autocommit, kept that half-made connection, and the
    next call on its thread wrote into a transaction nobody committed (a response created, then not
    found). Block the test's own thread only.
    """
    from django.db.backends.base.base import BaseDatabaseWrapper
    from pytest_django.plugin import DjangoDbBlocker

    blocking = DjangoDbBlocker._blocking_wrapper
    django_db_blocker._dj_db_wrapper  # noqa: B018  (pytest-django notes the real method on first use)
    real = django_db_blocker._real_ensure_connection

    def ensure_connection(connection):  # type: ignore[no-untyped-def]
        if threading.current_thread() is threading.main_thread():
            blocking()  # raises pytest-django's "Database access not allowed"
        return real(connection)

    def thread_aware(entry):  # type: ignore[no-untyped-def]
        return ensure_connection if getattr(entry, "__func__", None) is blocking else entry

    django_db_blocker._history[:] = [thread_aware(entry) for entry in django_db_blocker._history]
    BaseDatabaseWrapper.ensure_connection = thread_aware(BaseDatabaseWrapper.ensure_connection)
    DjangoDbBlocker._blocking_wrapper = property(lambda _: ensure_connection)  # every block() from now on


@pytest.fixture(scope="session", autouse=True)
def patient_flush() -> Iterator[None]:
    """Empty the database after a transactional test even while the live gateway reads it.

    The session's gateway keeps polling (its snapshot, balances, journals), and on PostgreSQL a
    poll can meet the flush's TRUNCATE in a deadlock, which PostgreSQL breaks by failing one of
    them; left failed, every later test would start on the last one's rows. A deadlock is meant
    to be retried: try the flush again (saying why), a few times, before giving up.
    """
    from django.core.management import CommandError
    from django.core.management.commands import flush
    from django.db import OperationalError

    original = flush.Command.handle

    def handle(self, **options):  # type: ignore[no-untyped-def]
        for attempt in range(1, 4):
            try:
                return original(self, **options)
            except CommandError as exc:
                if attempt == 3 or not isinstance(exc.__cause__, OperationalError):
                    raise
                print(f"The flush failed ({exc.__cause__}); trying again.", file=sys.stderr)
                time.sleep(0.2 * attempt)

    flush.Command.handle = handle
    yield
    flush.Command.handle = original


@pytest.fixture(scope="session", autouse=True)
def fresh_redis_state() -> None:
    """Credit accounts and limit counters in Redis are keyed by ids: a test database made again reuses them."""
    from django.conf import settings

    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        for kind in ("credits", "limits"):
            for key in client.scan_iter(f"{settings.REDIS_PREFIX}:{kind}:*"):
                client.delete(key)


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


class ThreadedServer:
    def __init__(self) -> None:
        from dwctl_site.asgi import application

        self.port = free_port()
        config = uvicorn.Config(application, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("The gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class GatewayProcess:
    """The gateway as a process of its own (uvicorn, as in production) on this test's database."""

    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**live_process_env(), **env}
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> GatewayProcess:
        command = ["-m", "uvicorn", "dwctl_site.asgi:application", "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=self.env)
        wait_for(self.up, timeout=30, interval=0.2)
        return self

    def up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ai/v1/models", timeout=1).status_code == 401
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class StoppedClock:
    """A clock that moves only when the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def limits_clock(monkeypatch) -> StoppedClock:
    """The clock of rate limits and token windows (gateway.limits.clock), stopped for the test."""
    from gateway import limits

    clock = StoppedClock(time.time())
    monkeypatch.setattr(limits, "clock", clock)
    return clock


@pytest.fixture(scope="session")
def gateway_server(django_db_setup, django_db_blocker) -> Iterator[ThreadedServer]:  # type: ignore[no-untyped-def]
    # The gateway reads the database as it starts (the credential check in gateway.handler.lifespan).
    with django_db_blocker.unblock():
        server = ThreadedServer().start()
    yield server
    server.stop()


@dataclass
class World:
    upstream: FakeUpstream
    url: str
    paid: DeployedModel
    free: DeployedModel
    embed: DeployedModel

    def client(self, secret: str, **kwargs) -> openai.OpenAI:  # type: ignore[no-untyped-def]
        # A short timeout: a test that waits on a bug fails in seconds, not after the SDK's 10 minutes.
        # Every body it receives is checked against OpenAI's OpenAPI description (tests/conformance.py).
        options = {"timeout": 20, "http_client": conforming_client(), **kwargs}
        return openai.OpenAI(base_url=f"{self.url}/ai/v1", api_key=secret, max_retries=0, **options)


def settle() -> None:
    """Let the gateway finish this test's background work and write its usage before the next test."""
    from gateway import views, warm_path
    from gateway.accounting import accountant

    wait_for(lambda: not views._background and not warm_path._running, timeout=15)
    accountant.flush()


@pytest.fixture
def world(
    transactional_db, upstream, gateway_server, user_with_credits, user_without_credits, outsider
) -> Iterator[World]:
    """Models on the fake upstream: a paid chat model and a paid embeddings model for the research
    group, a free public model, and failure models named after their upstream behaviour."""
    endpoint, _ = add_endpoint("fake", upstream.base_url, api_key="upstream-secret", timeout_seconds=3)
    prices = {
        "input_price": PRICE_IN,
        "output_price": PRICE_OUT,
        "flex_input_price": FLEX_IN,
        "flex_output_price": FLEX_OUT,
    }
    paid = add_model("gpt-test", endpoint=endpoint, upstream_model="gpt-upstream", groups=["research"], **prices)
    embed = add_model("embed-test", endpoint=endpoint, kind="embeddings", groups=["research"], **prices)
    free = add_model("free-model", endpoint=endpoint, public=True)
    for behaviour in ("fail-500", "fail-400", "forbidden", "slow", "flaky", "long-stream", "json-only", "held"):
        add_model(behaviour, endpoint=endpoint, groups=["research"], **prices)
    upstream.requests.clear()
    upstream.peak_in_flight = 0
    upstream.slow_seconds = 5.0  # a test may shorten it
    upstream.release.clear()
    yield World(upstream=upstream, url=gateway_server.url, paid=paid, free=free, embed=embed)
    upstream.release.set()  # no held call outlives its test
    settle()


@pytest.fixture
def make_key(transactional_db) -> Callable[..., str]:
    def make(user: User, purpose: str = "realtime", **kwargs) -> str:  # type: ignore[no-untyped-def]
        return create_api_key(user, purpose=purpose, **kwargs)[1]

    return make


def live_database_url() -> str:
    """The URL of the database this test runs against, for a child process (a server, a worker)."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


def live_process_env() -> dict[str, str]:
    """The environment of a child process sharing this test's database, and the keys that read its credentials."""
    return {
        **os.environ,
        "DATABASE_URL": live_database_url(),
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,
        "GATEWAY_ENCRYPTION_KEYS": ",".join(settings.GATEWAY_ENCRYPTION_KEYS),
    }


def balance_of(user: User) -> Decimal:
    return Balance.objects.get(user=user).amount


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> object:
    """Poll until `condition()` is truthy; fail the test if it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# --- flex workers ------------------------------------------------------------------------------


class WorkerThread:
    """A flex runner on its own thread and event loop, as a qcluster worker would run it."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.runner = Runner(linger=True, lifetime=3600, hard_stop=3600, stop=self.stop)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.runner.run())
        finally:
            close_old_connections()

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the flex worker did not stop"


@pytest.fixture
def flex_worker(world) -> Iterator[WorkerThread]:
    with WorkerThread() as worker:
        yield worker


def drain() -> int:
    """Run one runner until nothing is due, on a thread of its own (as a worker process would)."""
    finished: list[int] = []
    thread = threading.Thread(target=lambda: finished.append(run_flex_jobs()))
    thread.start()
    thread.join(60)
    return finished[0]


def flex_charges(job_id: object) -> list[CreditTransaction]:
    return list(CreditTransaction.objects.filter(kind="usage", source_id=str(job_id)))


def upstream_calls(world, model: str) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for seen in world.upstream.requests if seen["body"].get("model") == model)


def post(world, secret: str, path: str, body: dict) -> httpx.Response:  # type: ignore[no-untyped-def, type-arg]
    with conforming_client(timeout=30) as client:
        return client.post(f"{world.url}/ai/v1/{path}", json=body, headers={"Authorization": f"Bearer {secret}"})


@pytest.fixture
def staff_client(client, admin_user):  # type: ignore[no-untyped-def]
    """Django's test client, logged in to the admin as a superuser."""
    client.force_login(admin_user)
    return client
