"""`manage.py demo`: a working setup on the gateway's own echo upstream, whose printed commands work."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from decimal import Decimal

import orjson
from django.core.management import call_command

from accounts.models import ApiKey
from gateway.models import DeployedModel, Endpoint, RequestLog
from tests.conftest import ROOT, settle, wait_for


def demo(url: str) -> str:
    out = io.StringIO()
    call_command("demo", "--url", url, stdout=out)
    return out.getvalue()


def printed_curl(output: str) -> str:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("curl "))
    return "\n".join(lines[start : start + 3])


def printed_python(output: str) -> str:
    lines = output.splitlines()
    start = lines.index(".venv/bin/python - <<'EOF'")
    end = lines.index("EOF", start)
    return "\n".join(lines[start + 1 : end])


def test_the_printed_curl_gets_an_echo_and_is_billed(world):
    output = demo(world.url)
    done = subprocess.run(["bash", "-c", printed_curl(output)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr  # --fail-with-body: any status >= 400 fails
    answer = orjson.loads(done.stdout)
    assert answer["choices"][0]["message"]["content"] == "You said: Hello, gateway!"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    settle()
    log = RequestLog.objects.get(model_alias="demo-echo")
    assert log.status_code == 200
    assert (log.input_tokens, log.output_tokens) == (2, 4)
    assert log.cost == Decimal(100 * 2 + 200 * 4) / 1_000_000  # DEMO_PRICES, credits per 1M tokens


def test_the_printed_python_snippet_streams_the_echo(world):
    output = demo(world.url)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", printed_python(output)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "You said: Hello, gateway!"
    settle()
    wait_for(lambda: RequestLog.objects.filter(model_alias="demo-echo", output_tokens=4, cost__gt=0).exists())


def test_running_demo_twice_duplicates_nothing_and_leaves_one_live_key(world):
    demo(world.url)
    output = demo(world.url)
    assert Endpoint.objects.filter(name="demo").count() == 1
    assert DeployedModel.objects.filter(alias="demo-echo").count() == 1
    assert ApiKey.objects.active().filter(owner__username="demo").count() == 1
    done = subprocess.run(["bash", "-c", printed_curl(output)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_demo_upstream_answers_only_the_gateway(world):
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", f"{world.url}/demo/v1/chat/completions",
         "-d", "{}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.stdout == "401"


def test_the_demo_model_serves_responses_streamed_and_not(world):
    output = demo(world.url)
    secret = output.split("Bearer ", 1)[1].split('"', 1)[0]
    client = world.client(secret)
    assert client.responses.create(model="demo-echo", input="hi there").output_text == "You said: hi there"
    with client.responses.stream(model="demo-echo", input="hi there") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "You said: hi there"
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (2, 4)
