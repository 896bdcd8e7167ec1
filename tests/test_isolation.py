"""The tests and the session's live gateway share one database: each transactional test starts on
an empty one, even when the flush after the previous test meets the gateway's poll in a deadlock,
and the gateway's threads are never blocked from it between tests (see tests/conftest.py)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

on_postgresql = pytest.mark.skipif(connection.vendor != "postgresql", reason="a TRUNCATE deadlock is PostgreSQL's")


def test_outside_database_tests_only_the_tests_own_thread_is_blocked(django_db_setup):  # the test database made
    from django.db import close_old_connections

    from gateway.snapshot import read_version

    with pytest.raises(RuntimeError, match="Database access not allowed"):
        connection.ensure_connection()
    read: list[object] = []

    def poll() -> None:  # as the live gateway's snapshot watcher does, from a thread of its own
        try:
            read.append(read_version())
        except Exception as exc:
            read.append(exc)
        finally:
            close_old_connections()

    thread = threading.Thread(target=poll)
    thread.start()
    thread.join(10)
    assert len(read) == 1 and isinstance(read[0], str), read


@on_postgresql
@pytest.mark.django_db(transaction=True)
def test_a_reader_that_deadlocks_the_flush_after_this_test(user_with_credits):
    import psycopg
    from psycopg import sql

    tables = connection.introspection.django_table_names(only_existing=True, include_views=False)
    db = connection.settings_dict
    dsn = f"host={db['HOST'] or 'localhost'} port={db['PORT'] or 5432} user={db['USER']} dbname={db['NAME']}"

    def read() -> None:
        # Holds one table while the flush waits for it, then reads the tables the flush holds.
        with psycopg.connect(dsn) as reader:
            reader.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(sql.Identifier(tables[-1])))
            time.sleep(1.0)
            for table in tables[:-1]:
                reader.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(sql.Identifier(table)))

    threading.Thread(target=read, daemon=True).start()


@on_postgresql
@pytest.mark.django_db(transaction=True)
def test_the_next_test_starts_on_an_empty_database(user_with_credits):
    from accounts.models import User

    assert list(User.objects.values_list("username", flat=True)) == [user_with_credits.username]
