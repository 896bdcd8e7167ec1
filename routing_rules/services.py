from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from accounts.models import Purpose
from routing_rules.models import RuleAction, TrafficRule


@transaction.atomic
def add_traffic_rule(model, *, purpose: str, action: str, target=None) -> TrafficRule:  # type: ignore[no-untyped-def]
    """Add a deny or redirect rule for a model and key purpose, validated before it is written."""
    if purpose not in Purpose.values:
        raise ValidationError(f"Unknown purpose '{purpose}': use one of {', '.join(Purpose.values)}.")
    if action not in RuleAction.values:
        raise ValidationError(f"Unknown action '{action}': use deny or redirect.")
    if TrafficRule.objects.filter(model=model, purpose=purpose).exists():
        raise ValidationError(f"'{model.alias}' already has a rule for {purpose} keys.")
    rule = TrafficRule(model=model, purpose=purpose, action=action, target=target)
    rule.full_clean()
    rule.save()
    return rule


@transaction.atomic
def update_traffic_rule(  # type: ignore[no-untyped-def]
    rule: TrafficRule, *, action: str, target=None, purpose: str | None = None
) -> TrafficRule:
    """Change what a rule does (deny, or redirect to `target`) and, given, the key purpose it applies to;
    validated before it is written."""
    if action not in RuleAction.values:
        raise ValidationError(f"Unknown action '{action}': use deny or redirect.")
    if purpose is not None:
        if purpose not in Purpose.values:
            raise ValidationError(f"Unknown purpose '{purpose}': use one of {', '.join(Purpose.values)}.")
        rule.purpose = purpose
    rule.action, rule.target = action, target
    rule.full_clean()
    rule.save()
    return rule


def delete_traffic_rule(rule: TrafficRule) -> None:
    """Remove a rule: calls to its model with keys of its purpose are served as any other."""
    rule.delete()
