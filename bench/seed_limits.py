# Put limits on the bench user's keys and on the bench models, set so high that no request is ever
# refused: every request then takes the limit checks' path (in memory, or in Redis when the gateway
# runs with REDIS_URL), which is what a deployment with limits pays.
#
#   SEED_USER=bench SEED_MODELS="bench-model bench-slow" python manage.py shell < bench/seed_limits.py
#
# There is no management command for limits, so this writes the fields through the ORM. A field this
# version of the gateway does not have is skipped and named, so the script keeps working as they change.
import os
import sys
from decimal import Decimal

from django.core.exceptions import FieldDoesNotExist

from accounts.models import ApiKey
from gateway.models import DeployedModel

USER = os.environ.get("SEED_USER", "bench")
MODELS = os.environ.get("SEED_MODELS", "bench-model bench-slow").split()

KEY_LIMITS = {
    "requests_per_second": 1_000_000,
    "burst_size": 1_000_000,
    "tokens_per_minute": 1_000_000_000,
    "spend_limit": Decimal(1_000_000_000),
    "spend_window": "month",
}
MODEL_LIMITS = {
    "requests_per_second": 1_000_000,
    "burst_size": 1_000_000,
    "tokens_per_minute": 1_000_000_000,
    "capacity": 100_000,
    "max_output_tokens": 4096,
}


def known(model, limits):
    fields, missing = {}, []
    for name, value in limits.items():
        try:
            model._meta.get_field(name)
        except FieldDoesNotExist:
            missing.append(name)
        else:
            fields[name] = value
    if missing:
        print(f"  {model.__name__}: no field {', '.join(missing)} (skipped)", file=sys.stderr)
    return fields


keys = ApiKey.objects.filter(owner__username=USER).update(**known(ApiKey, KEY_LIMITS))
models = DeployedModel.objects.filter(alias__in=MODELS).update(**known(DeployedModel, MODEL_LIMITS))
print(f"limits set on {keys} key(s) of {USER} and {models} model(s)", flush=True)
