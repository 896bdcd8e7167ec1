"""What the limits of keys and models share: their rules, and how a few of them are changed at once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from django.core.exceptions import ValidationError
from django.db.models import Field, Model


def rate_limit_errors(row: Any, counts: Iterable[str]) -> dict[str, str]:
    """The broken rules among a row's counted limits, by field: each is positive, a burst needs a rate."""
    errors = {}
    for name in counts:
        # Zero would refuse every call; negatives the field itself refuses (a PositiveIntegerField).
        if getattr(row, name) == 0:
            empty = ", or empty for no limit" if row._meta.get_field(name).null else ""
            errors[name] = f"Must be a positive whole number{empty}."
    if row.burst_size is not None and row.requests_per_second is None:
        errors.setdefault("burst_size", "A burst needs a rate: set requests per second too.")
    return errors


def save_validated(row: Model, fields: Sequence[str], values: Mapping[str, object], *, reset: bool = False) -> None:
    """Set `values` among `fields` (with `reset`, every one of `fields` goes back to its default first),
    validate the whole row as its admin form would, then save only `fields`.

    On a validation error the row gets its old values back and nothing is written. Saving only
    `fields` leaves a concurrent write to the rest of the row (a revocation, a last use) in place.
    """
    unknown = set(values) - set(fields)
    if unknown:
        raise TypeError(f"Not a limit: {', '.join(sorted(unknown))}.")
    before = {name: getattr(row, name) for name in fields}
    if reset:
        for name in fields:
            setattr(row, name, cast("Field[Any, Any]", row._meta.get_field(name)).get_default())
    for name, value in values.items():
        setattr(row, name, value)
    try:
        row.full_clean()
    except ValidationError:
        for name, value in before.items():
            setattr(row, name, value)
        raise
    row.save(update_fields=fields)
