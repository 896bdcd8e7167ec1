# Seed a gateway database for the snapshot-scale benchmark, in ONE process:
#
#   SEED_KEYS=10000 SEED_MODELS=1000 SEED_USERS=100 SEED_ENDPOINT=mock \
#     python manage.py shell < bench/seed_scale.py
#
# It only uses the public management commands (add_model, create_user, create_api_key)
# through call_command, so it does not depend on the models' internals. The endpoint
# SEED_ENDPOINT must exist already (bench/run.sh creates it with add_endpoint).
# Writes are grouped in transactions of SEED_BATCH commands (0 = one commit per command).
import io
import os
import sys
import time

from django.core.management import call_command
from django.db import transaction

N_KEYS = int(os.environ.get("SEED_KEYS", "10000"))
N_MODELS = int(os.environ.get("SEED_MODELS", "1000"))
N_USERS = max(1, int(os.environ.get("SEED_USERS", "100")))
ENDPOINT = os.environ.get("SEED_ENDPOINT", "mock")
BATCH = int(os.environ.get("SEED_BATCH", "500"))


def run_batched(commands, label):
    """commands: list of (name, args). Runs them in transactions of BATCH commands."""
    sink = io.StringIO()
    t0 = time.monotonic()
    step = BATCH if BATCH > 0 else 1
    for start in range(0, len(commands), step):
        chunk = commands[start : start + step]
        if BATCH > 0:
            with transaction.atomic():
                for name, args in chunk:
                    call_command(name, *args, stdout=sink, stderr=sink)
        else:
            for name, args in chunk:
                call_command(name, *args, stdout=sink, stderr=sink)
        sink.seek(0)
        sink.truncate()
        done = start + len(chunk)
        if done % 2000 < step or done == len(commands):
            print(f"  {label}: {done}/{len(commands)} ({time.monotonic() - t0:.1f}s)", file=sys.stderr, flush=True)
    return time.monotonic() - t0


t_models = run_batched(
    [
        (
            "add_model",
            [
                f"scale-model-{i}",
                "--endpoint",
                ENDPOINT,
                "--upstream-model",
                "bench-model",
                "--input-price",
                "0.50",
                "--output-price",
                "1.50",
                "--public",
            ],
        )
        for i in range(N_MODELS)
    ],
    "models",
)
t_users = run_batched(
    [("create_user", [f"scale-user-{u}", "--credits", "1000"]) for u in range(N_USERS)],
    "users",
)
t_keys = run_batched(
    [
        ("create_api_key", [f"scale-user-{k % N_USERS}", "--purpose", "realtime", "--name", f"scale-key-{k}"])
        for k in range(N_KEYS)
    ],
    "keys",
)
print(
    f"seeded {N_MODELS} models ({t_models:.1f}s), {N_USERS} users ({t_users:.1f}s), {N_KEYS} keys ({t_keys:.1f}s)",
    flush=True,
)
