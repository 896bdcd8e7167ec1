"""A client that holds on cannot hold a gateway process: its head is bounded in size and in time, its
body in time, and connections beyond the cap are refused while the ones within it are served.

Each test runs the production server (`python -m dwctl_site.server`) as a subprocess, on raw sockets.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dwctl_site.server import check_open_file_limit
from tests.conftest import live_database_url
from tests.upstream import free_port

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent
CEILING = 60  # seconds a hung test waits before it fails; never a margin a test relies on
LOW_SOFT_LIMIT = 256


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    first: socket.socket  # the connection that found the server up: the first one it accepted

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=CEILING)
        return sock


def start_gateway(*, low_soft_limit: bool = False, args: tuple[str, ...] = (), **env: str) -> Gateway:
    port = free_port()
    command = [sys.executable, "-m", "dwctl_site.server", "--port", str(port), "--log-level", "warning", *args]
    if low_soft_limit:
        # As a service manager starts it: a low soft limit (the usual 1,024, lower here), a higher hard one.
        command = ["bash", "-c", f'ulimit -S -n {LOW_SOFT_LIMIT} && exec "$@"', "bash", *command]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": live_database_url(), "DJANGO_SECRET_KEY": "test-only-secret", **env},
    )
    # uvicorn listens only once the app is loaded and started: the first accepted connection means up.
    deadline = time.monotonic() + CEILING
    while True:
        try:
            first = socket.create_connection(("127.0.0.1", port), timeout=CEILING)
            return Gateway(process, port, first)
        except ConnectionRefusedError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("The gateway did not start") from None
            time.sleep(0.1)


def stop_gateway(gateway: Gateway) -> None:
    gateway.first.close()
    gateway.process.terminate()
    gateway.process.wait(CEILING)


@pytest.fixture(scope="module")
def gateway(django_db_setup) -> Iterator[Gateway]:
    """The defaults, started as a service manager would, with a low soft limit of open files."""
    server = start_gateway(low_soft_limit=True)
    yield server
    stop_gateway(server)


@pytest.fixture(scope="module")
def impatient_gateway(django_db_setup) -> Iterator[Gateway]:
    server = start_gateway(GATEWAY_HEADER_TIMEOUT="1", GATEWAY_BODY_TIMEOUT="1")
    yield server
    stop_gateway(server)


@pytest.fixture
def capped_gateway(django_db_setup) -> Iterator[Gateway]:
    """Three connections served; long timeouts, so connections held by the test stay open."""
    server = start_gateway(
        args=("--timeout-keep-alive", "600"),
        GATEWAY_MAX_CONNECTIONS="3",
        GATEWAY_HEADER_TIMEOUT="600",
        GATEWAY_BODY_TIMEOUT="600",
    )
    yield server
    stop_gateway(server)


def request(path: str = "/ai/v1/models", *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gateway", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, http.client.HTTPMessage, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.headers, response.read()


def error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["code"]


def read_until_closed(sock: socket.socket) -> bytes | None:
    """What the server sends until it closes its side; None if it has not closed within the ceiling."""
    sock.settimeout(CEILING)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return received


def closed_by_server(sock: socket.socket) -> bool:
    return read_until_closed(sock) is not None


def test_a_header_block_over_the_limit_gets_a_431(gateway):
    with gateway.connect() as sock:
        sock.sendall(request("/ai/v1/models", "X-Padding: " + "a" * 70_000))
        status, headers, body = read_response(sock)
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert error_code(body) == "request_headers_too_large"

    with gateway.connect() as sock:
        sock.sendall(request("/admin/login/", "X-Padding: " + "a" * 70_000))
        status, headers, body = read_response(sock)
    assert status == 431
    assert headers["content-type"].startswith("text/plain")


def test_a_header_block_within_the_limit_is_served(gateway):
    with gateway.connect() as sock:
        sock.sendall(request("/ai/v1/models", "X-Padding: " + "a" * 60_000))
        status, _headers, body = read_response(sock)
    assert status == 401
    assert error_code(body) == "missing_api_key"


def test_a_client_trickling_its_headers_is_cut_off(impatient_gateway):
    with impatient_gateway.connect() as sock:
        sock.sendall(b"GET /ai/v1/models HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        # One byte at a time: the head would take far longer than the ceiling to complete.
        deadline = time.monotonic() + CEILING
        while not select.select([sock], [], [], 0.1)[0]:
            assert time.monotonic() < deadline, "the trickling client was never cut off"
            sock.sendall(b"a")
        status, _headers, body = read_response(sock)
        assert status == 408
        assert error_code(body) == "request_timeout"
        assert closed_by_server(sock)


def test_a_connection_that_sends_nothing_is_closed(impatient_gateway):
    with impatient_gateway.connect() as sock:
        sock.settimeout(CEILING)
        assert sock.recv(1) == b""


def test_a_client_that_stops_sending_its_body_gets_a_408(impatient_gateway):
    with impatient_gateway.connect() as sock:
        head = "POST /ai/v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: 1000\r\n\r\n".encode() + b'{"model": "gpt-test", ')
        status, _headers, body = read_response(sock)
        assert status == 408
        assert error_code(body) == "request_timeout"
        assert closed_by_server(sock)


def test_connections_beyond_the_cap_are_refused_while_one_within_it_is_served(capped_gateway):
    bystander = capped_gateway.first
    bystander.sendall(request())
    assert read_response(bystander)[0] == 401
    held = [capped_gateway.connect(), capped_gateway.connect()]  # the cap of three is reached

    with capped_gateway.connect() as refused:
        refused.sendall(request())
        status, headers, body = read_response(refused)
        assert status == 503
        assert headers["retry-after"] == "1"
        assert error_code(body) == "server_busy"
        assert closed_by_server(refused)

    bystander.sendall(request())
    assert read_response(bystander)[0] == 401
    for sock in held:
        sock.close()


def test_beyond_twice_the_cap_a_connection_is_closed_at_once(capped_gateway):
    # Three served (the first is the one that found the server up), three waiting for their refusal.
    held = [capped_gateway.connect() for _ in range(5)]
    with capped_gateway.connect() as closed:
        assert read_until_closed(closed) == b"", "closed without an answer"

    waiting = held[-1]
    waiting.sendall(request("/admin/login/"))
    status, headers, _body = read_response(waiting)
    assert status == 503
    assert headers["content-type"].startswith("text/plain")
    for sock in held:
        sock.close()


def test_the_server_raises_its_soft_limit_of_open_files(gateway):
    limits = Path(f"/proc/{gateway.process.pid}/limits").read_text()
    soft, hard = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5]
    assert int(soft) > LOW_SOFT_LIMIT
    assert soft == hard


def test_a_limit_of_open_files_too_low_for_the_settings_is_named_at_start(caplog, settings):
    settings.GATEWAY_MAX_CONNECTIONS = 4096
    with caplog.at_level(logging.WARNING, logger="dwctl_site.server"):
        check_open_file_limit(1024)
        assert "GATEWAY_MAX_CONNECTIONS=4096" in caplog.text
        assert "LimitNOFILE" in caplog.text
        caplog.clear()
        check_open_file_limit(1_000_000)
        assert not caplog.text
