"""Configuration comes from the environment, and a bad value stops the start naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL", "REDIS_", "GATEWAY_"))}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG"),
        ({"GATEWAY_MAX_BODY_BYTES": "lots"}, "GATEWAY_MAX_BODY_BYTES"),
        ({"GATEWAY_MAX_HEADER_BYTES": "64"}, "GATEWAY_MAX_HEADER_BYTES"),
        ({"GATEWAY_HEADER_TIMEOUT": "0"}, "GATEWAY_HEADER_TIMEOUT"),
        ({"GATEWAY_BODY_TIMEOUT": "soon"}, "GATEWAY_BODY_TIMEOUT"),
        ({"GATEWAY_MAX_CONNECTIONS": "-1"}, "GATEWAY_MAX_CONNECTIONS"),
        ({"DATABASE_URL": "mysql2://nowhere/db", "DJANGO_SECRET_KEY": "x"}, "DATABASE_URL"),
        ({"DATABASE_URL": POSTGRES}, "DJANGO_SECRET_KEY"),
        ({"DATABASE_URL": POSTGRES, "DJANGO_SECRET_KEY": "x"}, "GATEWAY_ENCRYPTION_KEYS"),
        ({"GATEWAY_ENCRYPTION_KEYS": "not-a-fernet-key"}, "GATEWAY_ENCRYPTION_KEYS"),
        ({"GATEWAY_ENCRYPTION_KEYS": " , "}, "GATEWAY_ENCRYPTION_KEYS"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"GATEWAY_MAX_FILE_BYTES": "0"}, "GATEWAY_MAX_FILE_BYTES"),
        ({"GATEWAY_BATCH_MAX_LINES": "many"}, "GATEWAY_BATCH_MAX_LINES"),
        ({"GATEWAY_FILES_STORAGE_OPTIONS": "bucket=files"}, "GATEWAY_FILES_STORAGE_OPTIONS"),
        ({"GATEWAY_FILES_STORAGE_OPTIONS": "[1]"}, "GATEWAY_FILES_STORAGE_OPTIONS"),
    ],
)
def test_a_bad_variable_fails_the_checks_naming_it(env, named):
    result = manage("check", **env)
    assert result.returncode != 0
    assert named in result.stderr


def test_the_embedded_default_passes_the_checks():
    result = manage("check")
    assert result.returncode == 0, result.stderr


def test_a_malformed_encryption_key_is_named_by_position_and_never_echoed():
    valid = Fernet.generate_key().decode()
    malformed = Fernet.generate_key().decode()[:30]
    result = manage("check", GATEWAY_ENCRYPTION_KEYS=f"{valid},{malformed}")
    assert result.returncode != 0
    assert "GATEWAY_ENCRYPTION_KEYS: key 2 of 2 is not a Fernet key" in result.stderr
    assert malformed not in result.stderr


def test_the_embedded_default_keeps_its_generated_encryption_key_owner_only():
    assert manage("check").returncode == 0
    key_file = ROOT / ".encryption_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    Fernet(key_file.read_text().strip())  # a valid key


def test_the_asgi_application_refuses_to_start_with_a_bad_variable():
    code = "import dwctl_site.asgi"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "dwctl_site.settings", "DJANGO_DEBUG": "maybe"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DJANGO_DEBUG" in result.stderr
