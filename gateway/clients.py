"""The one shared upstream HTTP client of this process.

Callers use :func:`send` and get an :class:`UpstreamResponse`; which client moves the bytes is
decided here alone (``GATEWAY_UPSTREAM_TRANSPORT``): ``builtin`` (default, gateway.http_client),
``aiohttp``, or ``httpx`` (httpx's API on the httpx-aiohttp transport). ``bench/`` measures them
(the ``gateway-aiohttp`` and ``gateway-httpx`` targets): the built-in one costs the least CPU per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
from django.conf import settings

from gateway import http_client
from gateway.http_client import UpstreamError, UpstreamTimeout, UpstreamUnreachable

__all__ = ["UpstreamError", "UpstreamResponse", "UpstreamTimeout", "UpstreamUnreachable", "aclose", "send"]


class UpstreamResponse(Protocol):
    status: int
    content_type: str

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class _AiohttpResponse:
    __slots__ = ("_response", "content_type", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc)) from exc

    async def close(self) -> None:
        self._response.close()


class _AiohttpClient:
    def __init__(self) -> None:
        connector = aiohttp.TCPConnector(limit=settings.GATEWAY_UPSTREAM_POOL_SIZE, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def send(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float, connect_timeout: float
    ) -> UpstreamResponse:
        try:
            response = await self._session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc) or "timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        await self._session.close()


class _HttpxResponse:
    __slots__ = ("_response", "content_type", "status")

    def __init__(self, response) -> None:  # type: ignore[no-untyped-def]
        self._response = response
        self.status = response.status_code
        self.content_type = response.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        import httpx

        try:
            return await self._response.aread()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        finally:
            await self._response.aclose()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(str(exc)) from exc

    async def close(self) -> None:
        await self._response.aclose()


class _HttpxClient:
    def __init__(self) -> None:
        import httpx
        from httpx_aiohttp import AiohttpTransport

        size = settings.GATEWAY_UPSTREAM_POOL_SIZE
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._client = httpx.AsyncClient(transport=AiohttpTransport(limits=limits), limits=limits)

    async def send(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float, connect_timeout: float
    ) -> UpstreamResponse:
        import httpx

        request = self._client.build_request(
            "POST", url, content=body, headers=headers, timeout=httpx.Timeout(timeout, connect=connect_timeout)
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self._client.aclose()


Client = http_client.Client | _AiohttpClient | _HttpxClient
_clients: dict[asyncio.AbstractEventLoop, Client] = {}


def _new_client() -> Client:
    transport = settings.GATEWAY_UPSTREAM_TRANSPORT
    if transport == "aiohttp":
        return _AiohttpClient()
    if transport == "httpx":
        return _HttpxClient()
    return http_client.Client(settings.GATEWAY_UPSTREAM_POOL_SIZE)


def _client() -> Client:
    # One client per event loop: a process normally has one loop; tests and workers may start more.
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _new_client()
        for old_loop in [other for other in _clients if other.is_closed()]:
            del _clients[old_loop]
        _clients[loop] = client
    return client


async def send(
    url: str, body: bytes, headers: Mapping[str, str], *, timeout: float, connect_timeout: float
) -> UpstreamResponse:
    """POST a body upstream; the response body is read (or streamed) by the caller, who closes it."""
    return await _client().send(url, body, headers, timeout, connect_timeout)


async def aclose() -> None:
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()
