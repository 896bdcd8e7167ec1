"""Changes reach every gateway process: a key revoked here is refused by a second server process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from accounts.models import ApiKey
from accounts.services import revoke_api_key
from tests.conftest import live_process_env, wait_for
from tests.upstream import free_port

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def second_gateway(world):  # type: ignore[no-untyped-def]
    port = free_port()
    env = live_process_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "dwctl_site.asgi:application", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=30, interval=0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ai/v1/models", timeout=1).status_code == 401
    except httpx.TransportError:
        return False


def test_revoked_key_is_refused_by_another_process(second_gateway, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    headers = {"Authorization": f"Bearer {secret}"}
    wait_for(lambda: httpx.get(f"{second_gateway}/ai/v1/models", headers=headers).status_code == 200)

    revoke_api_key(ApiKey.objects.get(owner=user_with_credits))

    # Within a second on an idle machine (the poll interval); the ceiling leaves room for a loaded one.
    wait_for(lambda: httpx.get(f"{second_gateway}/ai/v1/models", headers=headers).status_code == 401, timeout=15)
