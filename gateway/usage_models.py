"""The usage dashboard's rollup of the request log (written by gateway/usage.py).

Imported by gateway.models, so Django knows them as models of the gateway app.
"""

from __future__ import annotations

from django.db import models


class UsageRollup(models.Model):
    """The request log added up by hour, for the usage dashboard (gateway/usage.py writes it every minute).

    One row per hour and dimension: `all` (every call; with its latency histogram), or one `user`,
    `key` (their ids) or `model` (its alias) — so a 30-day page reads hundreds of rows, not millions.
    """

    hour = models.DateTimeField()
    dimension = models.CharField(max_length=8)
    value = models.CharField(max_length=200, blank=True, default="")
    requests = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    spend_nano = models.BigIntegerField(default=0, help_text="Credits spent, in nano-credits (exact sums).")
    latency_bins = models.JSONField(default=dict, help_text="Answered calls per latency bin (usage.LATENCY_BIN).")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["dimension", "hour", "value"], name="usage_rollup_unique")]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}h {self.dimension} {self.value}".strip()


class UsageRollupMark(models.Model):
    """How far the rollup has read the request log (its highest id)."""

    name = models.CharField(max_length=50, unique=True)
    last_id = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name} at {self.last_id}"
