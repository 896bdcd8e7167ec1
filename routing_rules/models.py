from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from accounts.models import Purpose


class RuleAction(models.TextChoices):
    DENY = "deny", "Deny"
    REDIRECT = "redirect", "Redirect"


class TrafficRule(models.Model):
    """What happens to calls to a model made with keys of one purpose: deny, or redirect."""

    model = models.ForeignKey("gateway.DeployedModel", on_delete=models.CASCADE, related_name="traffic_rules")
    purpose = models.CharField(max_length=20, choices=Purpose.choices)
    action = models.CharField(max_length=10, choices=RuleAction.choices)
    target = models.ForeignKey(
        "gateway.DeployedModel",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="redirected_rules",
        help_text="The model to serve instead (redirect only).",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["model", "purpose"]
        constraints = [
            models.UniqueConstraint(fields=["model", "purpose"], name="one_rule_per_model_purpose"),
            models.CheckConstraint(
                condition=(Q(action=RuleAction.DENY) & Q(target__isnull=True))
                | (Q(action=RuleAction.REDIRECT) & Q(target__isnull=False) & ~Q(target=F("model"))),
                name="rule_target_matches_action",
            ),
        ]

    def __str__(self) -> str:
        if self.action == RuleAction.REDIRECT:
            return f"{self.model} [{self.purpose}] → {self.target}"
        return f"{self.model} [{self.purpose}] denied"

    def clean(self) -> None:
        if self.action == RuleAction.DENY and self.target_id is not None:
            raise ValidationError({"target": "A deny rule has no target."})
        if self.action == RuleAction.REDIRECT:
            if self.target_id is None:
                raise ValidationError({"target": "A redirect rule needs a target model."})
            if self.target_id == self.model_id:
                raise ValidationError({"target": "A model cannot redirect to itself."})
            target = self.target
            if target is not None and target.deleted_at is not None:
                raise ValidationError({"target": f"'{target.alias}' is deleted."})
