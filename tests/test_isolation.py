"""Each transactional test starts on an empty database, even when the flush after the previous one
meets a reader in a deadlock (on PostgreSQL the session's live gateway keeps polling)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="a TRUNCATE deadlock is PostgreSQL's"),
]


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


def test_the_next_test_starts_on_an_empty_database(user_with_credits):
    from accounts.models import User

    assert list(User.objects.values_list("username", flat=True)) == [user_with_credits.username]
