"""Flex tier: queue the request, hold or release the client. (Being built: served in real time for now.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.http import HttpResponse

if TYPE_CHECKING:
    from gateway.middleware import GatewayCall


async def submit(call: GatewayCall, serve_now) -> HttpResponse:  # type: ignore[no-untyped-def]
    """Until the queue lands, a flex request is served in real time."""
    return await serve_now()
