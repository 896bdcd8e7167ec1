"""What the API's bodies share: exact credit amounts (strings in JSON, so no float ever touches money)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, TypeVar

from django.db.models import Model, QuerySet
from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema

from common.numbers import parse_amount, plain_decimal
from management_api.errors import not_found

# Out: `"99.5"`, exact, no trailing zeros. In: a string (or a whole number), positive, at most 9 decimals.
Credits = Annotated[
    Decimal,
    PlainSerializer(plain_decimal, return_type=str),
    WithJsonSchema({"type": "string", "format": "decimal", "examples": ["99.5"]}),
]
Amount = Annotated[
    Decimal,
    BeforeValidator(parse_amount),
    WithJsonSchema({"type": "string", "format": "decimal", "examples": ["100"]}),
]
# A price in credits per 1M tokens: zero or more, to the micro-credit.
Price = Annotated[
    Decimal,
    Field(ge=0, max_digits=18, decimal_places=6),
    PlainSerializer(plain_decimal, return_type=str),
    WithJsonSchema({"type": "string", "format": "decimal", "examples": ["0.5"]}),
]
# Limits: empty (null) for none.
Positive = Annotated[int, Field(gt=0)]


M = TypeVar("M", bound=Model)


def get_or_404(queryset: QuerySet[M], pk: Any, what: str) -> M:
    """The row of `queryset` with this id, or the API's 404 naming what was looked for."""
    row = queryset.filter(pk=pk).first()
    if row is None:
        raise not_found(what, pk)
    return row
