"""Many-row INSERTs for the write paths that run once per request (usage ledger, request logs).

`bulk_create` builds a model instance and compiles every value of every row through the field
API; at a thousand rows a second that is a third of a core (measured in bench/). This writes the
same rows without it: on SQLite with one `executemany`, adapting only what the driver cannot take
as is; on PostgreSQL with COPY, whose rows psycopg formats in C. (An `executemany` there quotes every
parameter of every row in Python and sends one INSERT per row: about four times the CPU per row.)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from django.db import connection, models, transaction


def _decimal(value: Any) -> str | None:
    return None if value is None else str(value)


def _datetime_adapter() -> Callable[[Any], Any]:
    """Django's ``adapt_datetimefield_value`` for SQLite, for a plain datetime (what the writers
    give): naive in the connection's time zone, as text. Without its checks, a fifth of its cost."""
    zone = connection.timezone

    def adapt(value: Any) -> str | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(zone).replace(tzinfo=None)
        return str(value)

    return adapt


def _adapter(field: models.Field) -> Callable[[Any], Any] | None:  # type: ignore[type-arg]
    if isinstance(field, models.DecimalField):
        return _decimal
    if isinstance(field, models.DateTimeField):
        return _datetime_adapter()
    return None


def insert_rows(
    model: type[models.Model], columns: Sequence[str], rows: Iterable[Sequence[Any]], *, skip_conflicts: bool = False
) -> None:
    """INSERT rows of values for `columns` (field names or attnames, e.g. `user_id`), in the caller's
    transaction (or one of their own).

    With `skip_conflicts`, a row that breaks a unique constraint is left out (ON CONFLICT DO NOTHING).
    """
    meta = model._meta
    # Concrete fields only; get_field also knows attnames such as `user_id`.
    fields = [cast("models.Field[Any, Any]", meta.get_field(name)) for name in columns]
    names = [str(field.column) for field in fields]
    if connection.vendor == "postgresql":
        _copy_rows(meta.db_table, names, rows, skip_conflicts=skip_conflicts)
        return
    adapters = [(index, adapt) for index, field in enumerate(fields) if (adapt := _adapter(field)) is not None]
    quote = connection.ops.quote_name
    sql = "INSERT INTO {} ({}) VALUES ({}){}".format(  # noqa: S608  (names from model metadata, quoted)
        quote(meta.db_table),
        ", ".join(quote(name) for name in names),
        ", ".join(["%s"] * len(fields)),
        " ON CONFLICT DO NOTHING" if skip_conflicts else "",
    )
    values = []
    for row in rows:
        value = list(row)
        for index, adapt in adapters:
            value[index] = adapt(value[index])
        values.append(value)
    if values:
        with connection.cursor() as cursor:
            cursor.executemany(sql, values)


def _copy_rows(table: str, columns: list[str], rows: Iterable[Sequence[Any]], *, skip_conflicts: bool) -> None:
    """COPY rows into a table. COPY knows no ON CONFLICT: with `skip_conflicts` the rows go to a
    staging table first (temporary, one per connection and column set, kept for the session and
    empty between uses) and on from there with one INSERT … ON CONFLICT DO NOTHING."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return
    quote = connection.ops.quote_name
    target, names = quote(table), ", ".join(quote(name) for name in columns)
    # Atomic (no savepoint needed): in autocommit, ON COMMIT DELETE ROWS would empty the staging table
    # between the COPY and the INSERT; and staged rows never outlive a failure.
    with transaction.atomic(savepoint=False), connection.cursor() as cursor, connection.wrap_database_errors:
        connection.validate_no_broken_transaction()
        raw = cursor.cursor  # psycopg's own cursor: COPY is not in the DB-API that Django wraps
        into = target
        if skip_conflicts:
            into = "pg_temp." + quote(f"staged_{table[:40]}_{zlib.crc32(','.join(columns).encode()):08x}")
            raw.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {into} ON COMMIT DELETE ROWS"  # noqa: S608  (quoted metadata names)
                f" AS SELECT {names} FROM {target} WITH NO DATA"
            )
        with raw.copy(f"COPY {into} ({names}) FROM STDIN") as copy:
            copy.write_row(first)
            for row in rows:
                copy.write_row(row)
        if skip_conflicts:
            # Emptied by the same statement, so a second use in one transaction starts from nothing.
            raw.execute(
                f"WITH staged AS (DELETE FROM {into} RETURNING {names})"  # noqa: S608  (quoted metadata names)
                f" INSERT INTO {target} ({names}) SELECT {names} FROM staged ON CONFLICT DO NOTHING"
            )
