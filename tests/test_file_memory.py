"""An upload is streamed to storage and a download streamed back: a gateway process's memory does not
grow with the file. Measured on a gateway process of its own, by its peak resident set (/proc)."""

from __future__ import annotations

import openai
import orjson
import pytest

from gateway.models import StoredFile
from tests.conformance import conforming_client
from tests.conftest import GatewayProcess

pytestmark = pytest.mark.django_db(transaction=True)
MB = 1024 * 1024
LINES = 50_000


def peak_rss(pid: int) -> int:
    """The most resident memory the process has had, in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def big_batch_file() -> bytes:
    """50,000 requests (OpenAI's most), about 1 KB each: a 50 MB batch input file."""
    padding = "x" * 960
    lines = [
        orjson.dumps(
            {
                "custom_id": f"request-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-test", "messages": [{"role": "user", "content": padding}]},
            }
        )
        for n in range(LINES)
    ]
    return b"\n".join(lines) + b"\n"


def test_a_50_mb_upload_and_download_leave_the_gateways_memory_nearly_where_it_was(make_key, user_with_credits):
    content = big_batch_file()
    assert len(content) > 50 * MB
    secret = make_key(user_with_credits, purpose="batch")
    with GatewayProcess() as gateway:
        assert gateway.process is not None
        client = openai.OpenAI(
            base_url=f"{gateway.url}/ai/v1", api_key=secret, max_retries=0, timeout=120, http_client=conforming_client()
        )
        # Warm up every code path first (the multipart parser, the storage, the validator), so what
        # grows after is what the upload itself holds.
        small = client.files.create(file=("small.jsonl", content[:20_000].rsplit(b"\n", 1)[0]), purpose="batch")
        client.files.content(small.id).read()
        before = peak_rss(gateway.process.pid)

        uploaded = client.files.create(file=("big.jsonl", content), purpose="batch")
        after_upload = peak_rss(gateway.process.pid)
        downloaded = client.files.content(uploaded.id).read()
        after_download = peak_rss(gateway.process.pid)

    assert uploaded.bytes == len(content)
    assert StoredFile.objects.get(pk=uploaded.id.removeprefix("file-")).line_count == LINES
    assert downloaded == content
    # Held whole, the file alone would add 50 MB. What does grow is bounded by the line limit, not
    # the file's size: the validator's index of custom_ids (~10 MB for 50,000 requests).
    growth = {"upload": after_upload - before, "download": after_download - before}
    assert max(growth.values()) < 16 * MB, {name: f"{grown / MB:.1f} MB" for name, grown in growth.items()}
