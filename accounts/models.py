from __future__ import annotations

from django.contrib.auth.models import AbstractUser
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.db.models.deletion import ProtectedError
from django.utils import timezone

from common.limits import rate_limit_errors

EVERYONE = "Everyone"


class User(AbstractUser):
    """A person or service that owns API keys, a balance and group memberships."""


class Purpose(models.TextChoices):
    REALTIME = "realtime", "Real-time"
    BATCH = "batch", "Batch"
    PLAYGROUND = "playground", "Playground"
    PLATFORM = "platform", "Platform"


class AccessGroupQuerySet(models.QuerySet["AccessGroup"]):
    def everyone(self) -> AccessGroup:
        # Created by a data migration; recreated here if a test flush emptied the table.
        group, _ = self.get_or_create(name=EVERYONE, defaults={"is_builtin": True})
        return group

    def delete(self) -> tuple[int, dict[str, int]]:
        if self.filter(is_builtin=True).exists():
            raise ProtectedError(
                f"The built-in '{EVERYONE}' group cannot be deleted.", set(self.filter(is_builtin=True))
            )
        return super().delete()


class AccessGroup(models.Model):
    """Grants its members access to its models. The built-in Everyone group contains every user."""

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    is_builtin = models.BooleanField(default=False, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    members = models.ManyToManyField(User, blank=True, related_name="access_groups")
    # Last: from here on `models` in this class body is the field, not django.db.models.
    models = models.ManyToManyField("gateway.DeployedModel", blank=True, related_name="access_groups")

    objects = AccessGroupQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            # The built-in group can never be renamed, whatever path the write takes.
            models.CheckConstraint(
                condition=Q(is_builtin=False) | Q(name=EVERYONE),
                name="builtin_group_keeps_its_name",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def delete(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.is_builtin:
            raise ProtectedError(f"The built-in '{EVERYONE}' group cannot be deleted.", {self})
        return super().delete(*args, **kwargs)


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def active(self) -> ApiKeyQuerySet:
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))


class SpendWindow(models.TextChoices):
    """UTC calendar windows of a key's spend limit."""

    DAY = "day", "Day"
    WEEK = "week", "Week"
    MONTH = "month", "Month"


# What `set_key_limits` changes and `--clear` resets.
KEY_LIMITS = ("requests_per_second", "burst_size", "tokens_per_minute", "spend_limit", "spend_window")


class ApiKey(models.Model):
    """A bearer secret for the API. Only its SHA-256 is stored; the secret is shown once."""

    owner = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    purpose = models.CharField(max_length=20, choices=Purpose.choices, default=Purpose.REALTIME)
    secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(
        max_length=16, editable=False, help_text="The first characters of the secret, to recognise it."
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    requests_per_second = models.PositiveIntegerField(null=True, blank=True)
    burst_size = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Input plus output tokens per rolling minute."
    )
    spend_limit = models.DecimalField(
        max_digits=24, decimal_places=9, null=True, blank=True, help_text="Credits per spend window."
    )
    spend_window = models.CharField(max_length=10, choices=SpendWindow.choices, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(burst_size__isnull=True) | Q(requests_per_second__isnull=False),
                name="api_key_burst_needs_rate",
            ),
            models.CheckConstraint(
                condition=(Q(spend_limit__isnull=True) & Q(spend_window=""))
                | (Q(spend_limit__gt=0) & ~Q(spend_window="")),
                name="api_key_spend_limit_has_window",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or self.purpose})"

    def clean(self) -> None:
        # The admin form and `set_key_limits` both validate here; the constraints above hold the same in the database.
        errors = rate_limit_errors(self, ("requests_per_second", "burst_size", "tokens_per_minute"))
        if self.spend_limit is not None and self.spend_limit <= 0:
            errors["spend_limit"] = "Must be a positive number of credits, or empty for no limit."
        elif self.spend_limit is not None and not self.spend_window:
            errors["spend_window"] = "A spend limit needs a window: day, week or month."
        elif self.spend_limit is None and self.spend_window:
            errors["spend_limit"] = "A spend window needs a spend limit."
        if errors:
            raise ValidationError(errors)

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None
