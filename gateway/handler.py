"""A lean ASGI handler for the /ai/ API, still Django's views, URLs and middleware.

Django's stock ``ASGIHandler`` pays, on every request, for the project's sync middleware (a
thread hop each), the ``request_started``/``request_finished`` receivers and a thread-sensitive
context (two threads started per request) — most of its per-request cost, measured in
``bench/``. The API needs none of it: its middleware is async, and code that touches the
database manages its own connections in worker threads. So this handler:

- runs only ``GATEWAY_MIDDLEWARE`` (the two async gateway middlewares);
- gives a model call (a POST to chat completions, embeddings or responses) the short way: its
  request is an :class:`ApiRequest` (method, path, headers, body, client address: all the
  middlewares and views read), its view is found by path, and an unhandled error is answered 500
  in the OpenAI envelope — Django's request, URL resolver and exception handling cost about a
  tenth of such a call's CPU (bench/hot_path_cost.py). Every other /ai/ request is Django's;
- reads the body with the size limit enforced while reading (413 early): into memory — except a
  file upload's, spooled to a temporary file under its own limit (``GATEWAY_MAX_FILE_BYTES``);
- sends no request signals (not even ``request_finished`` as a response closes), does not log
  refusals a second time, and closes the response on the event loop.

It keeps Django's disconnect handling: a client that goes away cancels the view — except that a
relayed stream is read on for up to ``GATEWAY_STREAM_DRAIN_SECONDS``, so the upstream's usage
arrives and is billed, before it is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import tempfile
from typing import IO, Any

from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest
from django.urls import resolve, set_script_prefix
from django.utils.module_loading import import_string

from gateway import errors
from gateway.call import new_request_id
from gateway.errors import FILE_TOO_LARGE_MESSAGE, error_body
from gateway.middleware import API_PREFIX
from gateway.policy import INFERENCE_PATHS
from gateway.upstream import Relay

logger = logging.getLogger(__name__)

GATEWAY_MIDDLEWARE = [
    "gateway.middleware.ErrorEnrichmentMiddleware",
    "gateway.middleware.TierRoutingMiddleware",
]


UPLOAD_PATH = "/ai/v1/files"
# What a multipart form adds around its file (boundaries, part headers, the purpose field): the file
# itself is held to GATEWAY_MAX_FILE_BYTES exactly by gateway/files.py.
MULTIPART_FRAMING_BYTES = 64 * 1024
# An upload stays in memory only this far, then goes on to disk.
UPLOAD_SPOOL_MEMORY_BYTES = 256 * 1024


class BodyTooLarge(Exception):
    pass


def is_upload(scope) -> bool:  # type: ignore[no-untyped-def]
    return scope["method"] == "POST" and scope["path"] == UPLOAD_PATH


class Headers:
    """A request's headers by lower-case name, as Django's ``request.headers.get`` reads them (repeated
    ones joined with commas)."""

    __slots__ = ("values",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        values: dict[str, str] = {}
        for name, value in raw:
            key = name.decode("latin1").lower()
            text = value.decode("latin1")
            values[key] = f"{values[key]},{text}" if key in values else text
        self.values = values

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name.lower(), default)


class ApiRequest:
    """A model call's request (POST with a JSON body to an inference path) as the gateway's
    middlewares and views read it: its method, path, headers, body and client address — what they
    use of Django's request, without the rest of its making (META, the URL resolver)."""

    __slots__ = ("META", "body", "gateway", "headers", "method", "path", "request_id")

    def __init__(self, scope: dict[str, Any], body: bytes) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers = Headers(scope["headers"])
        self.body = body
        client = scope.get("client")
        self.META = {"REMOTE_ADDR": client[0] if client else ""}


def api_errors(get_response):  # type: ignore[no-untyped-def]
    """What Django's ``convert_exception_to_response`` does for an API request: an unhandled error is
    logged and answered 500, in the OpenAI envelope (as dwctl_site.urls.handler500 answers it)."""

    async def inner(request):  # type: ignore[no-untyped-def]
        try:
            return await get_response(request)
        except Exception:
            logger.exception("Internal Server Error: %s", request.path)
            return errors.internal_error()

    return inner


class GatewayHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = True) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        handler = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]
        for path in reversed(GATEWAY_MIDDLEWARE):
            handler = convert_exception_to_response(import_string(path)(handler))
        self._middleware_chain = handler
        # The model calls' short way: the same middlewares, the view their URL resolves to, found by path.
        paths = [API_PREFIX + path for path in INFERENCE_PATHS]
        self.inference_views = {path: resolve(path).func for path in paths}

        async def inference_view(request):  # type: ignore[no-untyped-def]
            return await self.inference_views[request.path](request)

        handler = api_errors(inference_view)
        for path in reversed(GATEWAY_MIDDLEWARE):
            handler = api_errors(import_string(path)(handler))
        self.inference_chain = handler

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await self.handle(scope, receive, send)

    async def get_response_async(self, request):  # type: ignore[no-untyped-def]
        # Django's own also logs every 4xx and 5xx answer, from a worker thread: a thread hop per
        # refusal. The request log records every /ai/ answer, and an unhandled error is still
        # logged where it is caught (convert_exception_to_response).
        response = await self._middleware_chain(request)  # type: ignore[misc]  # async all through
        response._resource_closers.append(request.close)  # an upload's parsed files go with it
        return response

    async def read_limited_body(self, receive, limit: int, sink):  # type: ignore[no-untyped-def]
        """Read the body into ``sink`` (a file object), refusing it once past ``limit`` bytes;
        returns the sink rewound, or closes it and raises."""
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise RequestAborted()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge()
                sink.write(chunk)
                if not message.get("more_body", False):
                    sink.seek(0)
                    return sink
        except BaseException:
            sink.close()
            raise

    async def handle(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        upload = is_upload(scope)
        try:
            sink: IO[bytes]
            if upload:
                limit = settings.GATEWAY_MAX_FILE_BYTES + MULTIPART_FRAMING_BYTES
                sink = tempfile.SpooledTemporaryFile(max_size=UPLOAD_SPOOL_MEMORY_BYTES)  # noqa: SIM115 (closed below)
            else:
                limit, sink = settings.GATEWAY_MAX_BODY_BYTES, io.BytesIO()
            body_file = await self.read_limited_body(receive, limit, sink)
        except RequestAborted:
            return
        except BodyTooLarge:
            if upload:
                message = FILE_TOO_LARGE_MESSAGE.format(limit=settings.GATEWAY_MAX_FILE_BYTES)
                await send_json(send, 413, error_body(413, message, code="file_too_large"))
            else:
                message = f"The request body is larger than the limit of {settings.GATEWAY_MAX_BODY_BYTES} bytes."
                await send_json(send, 413, error_body(413, message, code="request_too_large"))
            return
        try:
            await self.serve(scope, receive, send, body_file)
        finally:
            body_file.close()  # an upload's temporary file goes now, not when it is collected

    async def serve(self, scope, receive, send, body_file) -> None:  # type: ignore[no-untyped-def]
        request: ApiRequest | HttpRequest | None
        if scope["method"] == "POST" and scope["path"] in self.inference_views:
            request, get_response = ApiRequest(scope, body_file.getvalue()), self.inference_chain
        else:
            set_script_prefix(scope.get("root_path", "") or "/")
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                assert error_response is not None
                await self.send_response(error_response, send)
                return
            get_response = self.run_get_response

        serving = asyncio.current_task()
        assert serving is not None
        watch = ClientWatch(serving, request)
        watching = asyncio.create_task(watch.run(self.listen_for_disconnect, receive))
        try:
            response = await get_response(request)
            try:
                if isinstance(response, Relay):
                    await send_relay(response, send)
                else:
                    await self.send_response(response, send)
                watch.answered = True
            finally:
                close_quietly(response)
        except asyncio.CancelledError:
            if not watch.left:
                raise  # not for the client's leaving: the server's
            serving.uncancel()
        except RequestAborted:
            pass
        except Exception:
            logger.exception("Unhandled error while serving %s", scope.get("path"))
        finally:
            watch.stop()
            watching.cancel()


class ClientWatch:
    """Cancels the serving of a request when its client goes away (a view sees CancelledError, and
    records the call as cut off) — except that a relayed stream is read on, into the void, for
    ``GATEWAY_STREAM_DRAIN_SECONDS``, so the call's usage arrives and is billed, before it is cut.

    The request is served in the task that received it, watched by one task of its own."""

    __slots__ = ("answered", "cut", "left", "request", "serving")

    def __init__(self, serving: asyncio.Task[Any], request: Any) -> None:
        self.serving, self.request = serving, request
        self.answered = False  # the whole response went out: a disconnect now is the end, not a leaving
        self.left = False
        self.cut: asyncio.TimerHandle | None = None

    async def run(self, listen: Any, receive: Any) -> None:
        with contextlib.suppress(RequestAborted):
            await listen(receive)
        if self.answered:
            return
        self.left = True
        call = getattr(self.request, "gateway", None)
        if call is not None and call.relaying:
            drain = settings.GATEWAY_STREAM_DRAIN_SECONDS
            self.cut = asyncio.get_running_loop().call_later(drain, self.serving.cancel)
        else:
            self.serving.cancel()

    def stop(self) -> None:
        if self.cut is not None:
            self.cut.cancel()


def close_quietly(response) -> None:  # type: ignore[no-untyped-def]
    """``response.close()`` without its ``request_finished`` signal, whose receivers tidy up
    database connections this thread never holds (gateway.db hands worker threads' back)."""
    for closer in response._resource_closers:
        try:
            closer()
        except Exception:
            logger.exception("Error while closing a response")
    response._resource_closers.clear()
    response.closed = True


async def send_relay(response: Relay, send) -> None:  # type: ignore[no-untyped-def]
    headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    async with contextlib.aclosing(response.parts) as parts:
        async for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body"})


async def send_json(send, status: int, body: bytes) -> None:  # type: ignore[no-untyped-def]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", f"req_{new_request_id()}".encode()),  # as on every answer (TierRoutingMiddleware)
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def lifespan(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """ASGI lifespan: refuse to start on credentials no key decrypts, and write the journals of
    processes that died; write this process's journal and close the upstream client at shutdown."""
    from gateway import clients, metrics
    from gateway.accounting import accountant
    from gateway.checks import check_credentials
    from gateway.db import in_thread

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            errors = await in_thread(check_credentials, databases=["default"])
            if errors:
                await send({"type": "lifespan.startup.failed", "message": "\n".join(e.msg for e in errors)})
                return
            try:
                await in_thread(accountant.drain_orphans)
            except Exception:
                logger.exception("Could not write journals left by stopped processes; will retry")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await accountant.aflush()
                await clients.aclose()
                metrics.process_stopped()
            except Exception:
                logger.exception("Error during shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
