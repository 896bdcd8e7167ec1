from __future__ import annotations

from functools import cached_property
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest

# Below this many rows an exact count is cheap; above it an unfiltered list shows PostgreSQL's estimate.
EXACT_COUNT_BELOW = 100_000


class LargeTablePaginator(Paginator):
    """For tables that grow with every call (the request log, the ledger): the unfiltered list is
    counted from PostgreSQL's row estimate (``pg_class.reltuples``, kept by autovacuum and ANALYZE),
    not by ``COUNT(*)``, which reads the whole table. A filtered or searched list, and every list on
    SQLite or on a small table, is counted exactly."""

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if isinstance(queryset, QuerySet) and not queryset.query.where:
            estimate = estimated_rows(queryset)
            if estimate >= EXACT_COUNT_BELOW:
                return estimate
        return super().count


def estimated_rows(queryset: QuerySet[Any]) -> int:
    """PostgreSQL's estimate of the rows of the queryset's table; -1 where there is none."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return -1
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", [queryset.model._meta.db_table]
        )
        row = cursor.fetchone()
    return -1 if row is None else int(row[0])


class ReadOnlyAdmin(admin.ModelAdmin):
    """History and read models: viewable, never written from the admin."""

    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class LargeTableAdmin(ReadOnlyAdmin):
    """A read-only table that grows with every call: counted by :class:`LargeTablePaginator`, and
    no facet counts (a COUNT over the table per filter choice)."""

    paginator = LargeTablePaginator
    show_facets = admin.ShowFacets.NEVER
