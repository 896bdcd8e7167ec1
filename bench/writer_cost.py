"""What the usage writer costs the gateway's process per call record, on SQLite and on PostgreSQL.

    .venv/bin/python bench/writer_cost.py [--batches 20] [--batch 500] [--root CHECKOUT]
        [--databases sqlite postgres] [--pg-admin-url URL] [--redis-url URL] [--redis-prefix P]

For each database, sets up a scratch one through the management commands of CHECKOUT (this one by
default; another worktree measures an older commit the same way): `migrate`, `add_endpoint`,
`add_model` with prices, `create_user` with credits, `create_api_key`. SQLite is a fresh file;
PostgreSQL a database `CREATE`-d on `--pg-admin-url` for the run and dropped after it. Then a child
process of CHECKOUT on that database journals `--batch` finished calls the way
`gateway.views.record_call` does (`journal_line(...)`, `journal().append`) and runs the writer's
flush (`accountant.flush()`: read back, price, charge, log, `budget.written`), `--batches` times
after one warm-up batch. It reads its own CPU time (`time.process_time`) around each flush, and on
PostgreSQL also the CPU time of the server process serving its connection (`pg_backend_pid()`, read
from /proc: the server runs on this machine).

With `--redis-url`, PostgreSQL is measured a second time with `REDIS_URL` set (credits in Redis,
under `--redis-prefix`, whose keys are deleted afterwards), as the Redis targets of `run.sh` run.

Prints one ``BENCHJSON {...}`` line per database: the median over batches of CPU microseconds per
record and every batch; on PostgreSQL also the server's CPU microseconds per record, over all batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

PY = sys.executable
HERE = Path(__file__).resolve()


def setup(root: Path, env: dict[str, str]) -> None:
    """The catalog, through the management commands."""

    def manage(*args: str) -> str:
        return subprocess.run(
            [PY, "manage.py", *args], cwd=root, env=env, check=True, capture_output=True, text=True
        ).stdout

    manage("migrate", "--noinput")
    manage("add_endpoint", "mock", "http://127.0.0.1:9/v1")
    prices = ("--input-price", "0.50", "--output-price", "1.50", "--public")
    manage("add_model", "bench-model", "--endpoint", "mock", "--upstream-model", "bench-model", *prices)
    manage("create_user", "bench", "--credits", "1000000")
    manage("create_api_key", "bench", "--name", "bench")


def child(batches: int, batch: int) -> None:
    """In CHECKOUT, on its database: journal and flush `batches` batches, print CPU µs per record."""
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dwctl_site.settings")
    import django

    django.setup()
    from django.db import connection
    from responses_cost import cpu_seconds

    from accounts.models import ApiKey
    from gateway.accounting import accountant, journal_line
    from gateway.journal import journal
    from gateway.models import DeployedModel

    key = ApiKey.objects.get(name="bench")
    model = DeployedModel.objects.get(alias="bench-model")

    def append(n: int) -> None:
        for _ in range(n):
            started = time.time()
            journal().append(
                journal_line(
                    request_id=uuid.uuid4().hex,
                    user_id=key.owner_id,
                    api_key_id=key.id,
                    model_id=model.id,
                    model_alias=model.alias,
                    path="chat/completions",
                    tier="realtime",
                    status_code=200,
                    started_at=started,
                    latency_ms=1.234,
                    ttfb_ms=None,
                    input_tokens=40,
                    output_tokens=10,
                    job_id=None,
                    usage_estimated=False,
                    committed=35_000,
                    job=None,
                    client_request_id="",
                )
            )

    def database_cpu() -> float:
        if connection.vendor != "postgresql":
            return 0.0
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cpu_seconds(cursor.fetchone()[0])

    per_record, database = [], []
    for round_ in range(batches + 1):
        append(batch)
        before, before_db = time.process_time(), database_cpu()
        accountant.flush()
        spent, spent_db = time.process_time() - before, database_cpu() - before_db
        if round_:  # the first one warms up: imports, the connection, the caches
            per_record.append(spent / batch * 1e6)
            database.append(spent_db / batch * 1e6)
    print(orjson.dumps([per_record, database]).decode())


def measure(root: Path, env: dict[str, str], batches: int, batch: int) -> list[list[float]]:
    reply = subprocess.run(
        [PY, str(HERE), "--child", "--batches", str(batches), "--batch", str(batch)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    if reply.returncode:
        raise RuntimeError(f"the writer's process failed:\n{reply.stderr[-3000:]}")
    return list(orjson.loads(reply.stdout.strip().splitlines()[-1]))


def psql(admin_url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--root", type=Path, default=HERE.parent.parent)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--pg-admin-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--redis-prefix", default=f"dwctl-writer-cost-{os.getpid()}")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.batches, args.batch)
        return
    root = args.root.resolve()
    work = Path(tempfile.mkdtemp(prefix="dwctl-writer-cost-"))
    base = {
        **os.environ,
        "DJANGO_SECRET_KEY": "bench-secret",
        "GATEWAY_ENCRYPTION_KEYS": "Ce1Y1ZhtUeMofhyL2xlKiK3zAh2JWAYCXPBF0TNtN5U=",  # a throwaway key
        "DJANGO_DEBUG": "0",
        "GATEWAY_METRICS": "0",
        "REDIS_URL": "",
    }
    pg_name = f"dwctl_writer_cost_{os.getpid()}"
    runs: list[tuple[str, dict[str, str]]] = []
    try:
        for database in args.databases:
            env = {**base, "GATEWAY_JOURNAL_DIR": str(work / f"journal-{database}")}
            if database == "sqlite":
                env["DATABASE_URL"] = f"sqlite:///{work}/db.sqlite3"
            else:
                psql(args.pg_admin_url, f'CREATE DATABASE "{pg_name}"')
                env["DATABASE_URL"] = args.pg_admin_url.rsplit("/", 1)[0] + "/" + pg_name
            setup(root, env)
            runs.append((database, env))
            if database == "postgres" and args.redis_url:
                redis_env = {**env, "REDIS_URL": args.redis_url, "REDIS_PREFIX": args.redis_prefix}
                runs.append(("postgres+redis", redis_env))
        for name, env in runs:
            values, database = measure(root, env, args.batches, args.batch)
            line = {
                "database": name,
                "batch": args.batch,
                "cpu_us_per_record": round(statistics.median(values), 1),
                "batches": [round(v, 1) for v in values],
            }
            if name.startswith("postgres"):  # over all batches: /proc counts in ticks of 10 ms
                line["db_cpu_us_per_record"] = round(statistics.fmean(database), 1)
            print("BENCHJSON " + orjson.dumps(line).decode(), flush=True)
    finally:
        if "postgres" in args.databases:
            psql(args.pg_admin_url, f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        if args.redis_url:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            for key in client.scan_iter(f"{args.redis_prefix}:*"):
                client.delete(key)


if __name__ == "__main__":
    main()
