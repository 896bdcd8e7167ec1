"""Changes reach every gateway process: a key revoked here is refused by a second server process."""

from __future__ import annotations

import httpx
import pytest

from accounts.models import ApiKey
from accounts.services import revoke_api_key
from tests.conftest import GatewayProcess, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def second_gateway(world):  # type: ignore[no-untyped-def]
    with GatewayProcess() as gateway:
        yield gateway.url


def test_revoked_key_is_refused_by_another_process(second_gateway, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    headers = {"Authorization": f"Bearer {secret}"}
    wait_for(lambda: httpx.get(f"{second_gateway}/ai/v1/models", headers=headers).status_code == 200)

    revoke_api_key(ApiKey.objects.get(owner=user_with_credits))

    # Within a second on an idle machine (the poll interval); the ceiling leaves room for a loaded one.
    wait_for(lambda: httpx.get(f"{second_gateway}/ai/v1/models", headers=headers).status_code == 401, timeout=15)
