from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

# Credits are kept to the nano-credit: exact for any per-1M-token price with up to 3 decimals.
AMOUNT: dict[str, Any] = {"max_digits": 24, "decimal_places": 9}
PRICE: dict[str, Any] = {"max_digits": 18, "decimal_places": 6}
NANO = Decimal("0.000000001")
ONE_MILLION = Decimal(1_000_000)


class Tier(models.TextChoices):
    REALTIME = "realtime", "Real-time"
    FLEX = "flex", "Flex"
    BATCH = "batch", "Batch"


def price_key(tier: str, window: str = "") -> str:
    """What a price is looked up by: the tier, and for batch its completion window ("batch:24h")."""
    return f"{tier}:{window}" if window else tier


def price_keys() -> list[tuple[str, str]]:
    """Every (tier, completion window) a model may be priced at: each batch window is a tier of its own."""
    return [(Tier.REALTIME, ""), (Tier.FLEX, ""), *((Tier.BATCH, window) for window in settings.GATEWAY_BATCH_WINDOWS)]


class TariffQuerySet(models.QuerySet["Tariff"]):
    def active_at(self, when) -> TariffQuerySet:  # type: ignore[no-untyped-def]
        return self.filter(valid_from__lte=when).filter(Q(valid_until__isnull=True) | Q(valid_until__gt=when))

    def current(self) -> TariffQuerySet:
        return self.filter(valid_until__isnull=True)


class Tariff(models.Model):
    """The price of a model at one tier, in credits per 1M tokens, for a span of time."""

    model = models.ForeignKey("gateway.DeployedModel", on_delete=models.CASCADE, related_name="tariffs")
    tier = models.CharField(max_length=20, choices=Tier.choices, default=Tier.REALTIME)
    # A batch price is per completion window ("24h", "1h": settings.GATEWAY_BATCH_WINDOWS); "" for the other tiers.
    completion_window = models.CharField(max_length=10, blank=True, default="")
    input_price = models.DecimalField(**PRICE, help_text="Credits per 1M input tokens.")
    output_price = models.DecimalField(**PRICE, help_text="Credits per 1M output tokens.")
    valid_from = models.DateTimeField(default=timezone.now)
    valid_until = models.DateTimeField(null=True, blank=True)

    objects = TariffQuerySet.as_manager()

    class Meta:
        ordering = ["model", "tier", "-valid_from"]
        constraints = [
            models.CheckConstraint(
                condition=Q(input_price__gte=0) & Q(output_price__gte=0), name="tariff_prices_not_negative"
            ),
            models.CheckConstraint(
                condition=Q(valid_until__isnull=True) | Q(valid_until__gt=F("valid_from")),
                name="tariff_valid_span",
            ),
            models.UniqueConstraint(
                fields=["model", "tier", "completion_window"],
                condition=Q(valid_until__isnull=True),
                name="one_open_tariff_per_model_tier_window",
            ),
            models.CheckConstraint(
                condition=Q(tier="batch", completion_window__gt="") | (~Q(tier="batch") & Q(completion_window="")),
                name="tariff_window_only_for_batch",
            ),
        ]

    def __str__(self) -> str:
        prices = f"{self.input_price}/{self.output_price} per 1M"
        return f"{self.model} {price_key(self.tier, self.completion_window)}: {prices}"

    @property
    def is_paid(self) -> bool:
        return self.input_price > 0 or self.output_price > 0

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        return price_tokens(self.input_price, self.output_price, input_tokens, output_tokens)


def to_picos(price: Decimal) -> int:
    """A price per 1M tokens as integer pico-credits per token (exact: prices have six decimals)."""
    picos = price.scaleb(6)
    if picos != picos.to_integral_value():
        raise ValueError(f"{price} has more than six decimals")
    return int(picos)


def price_tokens(input_price: Decimal, output_price: Decimal, input_tokens: int, output_tokens: int) -> Decimal:
    total = (input_price * input_tokens + output_price * output_tokens) / ONE_MILLION
    return total.quantize(NANO)


class TransactionKind(models.TextChoices):
    PURCHASE = "purchase", "Purchase"
    ADMIN_GRANT = "admin_grant", "Admin grant"
    ADMIN_REMOVAL = "admin_removal", "Admin removal"
    USAGE = "usage", "Usage"


CREDITING_KINDS = {TransactionKind.PURCHASE, TransactionKind.ADMIN_GRANT}


class AppendOnlyError(Exception):
    pass


class CreditTransactionQuerySet(models.QuerySet["CreditTransaction"]):
    def update(self, **kwargs):  # type: ignore[no-untyped-def]
        raise AppendOnlyError("Ledger rows are never updated.")

    def delete(self):  # type: ignore[no-untyped-def]
        raise AppendOnlyError("Ledger rows are never deleted.")

    def signed_total(self) -> Decimal:
        credits = self.filter(kind__in=CREDITING_KINDS).aggregate(s=models.Sum("amount"))["s"] or Decimal(0)
        debits = self.exclude(kind__in=CREDITING_KINDS).aggregate(s=models.Sum("amount"))["s"] or Decimal(0)
        return credits - debits


class CreditTransaction(models.Model):
    """One entry of the append-only credit ledger. The kind gives the sign; the amount is > 0."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="credit_transactions")
    kind = models.CharField(max_length=20, choices=TransactionKind.choices)
    amount = models.DecimalField(**AMOUNT)
    source_id = models.CharField(max_length=100, unique=True, help_text="Idempotency key: one row per source.")
    description = models.CharField(max_length=500, blank=True)
    tier = models.CharField(max_length=20, choices=Tier.choices, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = CreditTransactionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.CheckConstraint(condition=Q(amount__gt=0), name="ledger_amount_positive")]

    def __str__(self) -> str:
        return f"{self.kind} {self.signed_amount} for {self.user_id}"

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._state.adding:
            raise AppendOnlyError("Ledger rows are never updated.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise AppendOnlyError("Ledger rows are never deleted.")

    @property
    def signed_amount(self) -> Decimal:
        return self.amount if self.kind in CREDITING_KINDS else -self.amount


class BalanceQuerySet(models.QuerySet["Balance"]):
    def amount_of(self, user: Any) -> Decimal:
        """A user's credits; zero for a user who never had a ledger entry."""
        return self.filter(user=user).values_list("amount", flat=True).first() or Decimal(0)


class Balance(models.Model):
    """A user's current credits: the ledger's sum, kept in step in the same transaction."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, primary_key=True, related_name="balance"
    )
    amount = models.DecimalField(**AMOUNT, default=Decimal(0))
    # Moves by one with every change, so a reader can tell which of two copies of a balance is newer.
    version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = BalanceQuerySet.as_manager()

    def __str__(self) -> str:
        return f"{self.amount}"
