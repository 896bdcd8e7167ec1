"""The Files API through the official client: upload, list, read, download, delete; owner only; batch
input files checked line by line at upload, a bad one stored nowhere."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from gateway.batch_file import InvalidBatchFile, read_batch_file
from gateway.models import UPLOAD_PURPOSES, StoredFile
from tests.conformance import violations

pytestmark = pytest.mark.django_db(transaction=True)


def batch_line(custom_id: str, url: str = "/v1/chat/completions", **overrides: object) -> dict:  # type: ignore[type-arg]
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "gpt-test", "messages": []}}
    return {**line, **overrides}


def jsonl(*lines: object) -> bytes:
    return b"".join((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines)


def stored_objects(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()]


@pytest.fixture
def files_dir(own_files: Path) -> Path:
    """The run's files directory, emptied of earlier tests' files (their rows went with their database)."""
    for path in stored_objects(own_files):
        path.unlink()
    return own_files


def test_an_uploaded_file_is_retrieved_listed_downloaded_and_deleted(world, make_key, user_with_credits, files_dir):
    client = world.client(make_key(user_with_credits))
    content = b"any bytes at all \x00\xff\n" * 1000

    uploaded = client.files.create(file=("notes.bin", content), purpose="user_data")

    assert uploaded.id.startswith("file-")
    assert (uploaded.object, uploaded.bytes, uploaded.filename, uploaded.purpose) == (
        "file",
        len(content),
        "notes.bin",
        "user_data",
    )
    assert uploaded.expires_at is None
    assert client.files.retrieve(uploaded.id) == uploaded
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert client.files.content(uploaded.id).read() == content
    [stored] = stored_objects(files_dir)
    assert stored.read_bytes() == content

    deleted = client.files.delete(uploaded.id)

    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    assert not stored.exists()
    with pytest.raises(openai.NotFoundError, match=f"No such File object: {uploaded.id}"):
        client.files.retrieve(uploaded.id)


def test_a_batch_file_remembers_its_requests_and_their_url(world, make_key, user_with_credits):
    client = world.client(make_key(user_with_credits, purpose="batch"))
    lines = [batch_line(f"req-{n}", "/v1/embeddings", body={"model": "embed-test", "input": "x"}) for n in range(3)]

    uploaded = client.files.create(
        file=("in.jsonl", jsonl(*lines) + b"\n\n"), purpose="batch"
    )  # blank lines at the end

    row = StoredFile.objects.get()
    assert (row.public_id, row.line_count, row.request_url, row.owner) == (
        uploaded.id,
        3,
        "/v1/embeddings",
        user_with_credits,
    )


def test_another_users_file_is_not_found(world, make_key, user_with_credits, outsider):
    alice = world.client(make_key(user_with_credits))
    mallory = world.client(make_key(outsider))
    uploaded = alice.files.create(file=("secret.txt", b"mine"), purpose="user_data")

    for attempt in (mallory.files.retrieve, mallory.files.content, mallory.files.delete):
        with pytest.raises(openai.NotFoundError):
            attempt(uploaded.id)
    assert mallory.files.list().data == []
    with pytest.raises(openai.BadRequestError, match="after"):
        mallory.files.list(after=uploaded.id)
    assert alice.files.content(uploaded.id).read() == b"mine"


@pytest.mark.parametrize("purpose", [p for p in UPLOAD_PURPOSES if p not in ("batch", "evals")])
def test_every_openai_upload_purpose_is_accepted(world, make_key, user_with_credits, purpose):
    client = world.client(make_key(user_with_credits))
    assert client.files.create(file=("f.txt", b"x"), purpose=purpose).purpose == purpose  # type: ignore[arg-type]


def test_an_evals_file_is_accepted(world, make_key, user_with_credits):
    # OpenAI's description lets an upload name `evals` but leaves it off the File object's purposes:
    # the body is checked here, short of that one property, instead of by the client's hook.
    secret = make_key(user_with_credits)
    response = httpx.post(
        f"{world.url}/ai/v1/files",
        files={"file": ("e.jsonl", b"{}\n")},
        data={"purpose": "evals"},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 200
    assert response.json()["purpose"] == "evals"
    assert all(found.startswith("purpose:") for found in violations(response.json(), "OpenAIFile"))


def test_an_unknown_purpose_is_refused_naming_the_allowed_ones(world, make_key, user_with_credits, files_dir):
    client = world.client(make_key(user_with_credits))
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("f.txt", b"x"), purpose="batch_output")  # type: ignore[arg-type]
    allowed = "assistants, batch, evals, fine-tune, user_data, vision"
    assert refused.value.body["message"] == f"Invalid 'purpose': 'batch_output'. Use one of {allowed}."  # type: ignore[index]
    assert not StoredFile.objects.exists()
    assert stored_objects(files_dir) == []


def test_an_upload_without_a_file_names_the_missing_field(world, make_key, user_with_credits):
    secret = make_key(user_with_credits)
    response = httpx.post(
        f"{world.url}/ai/v1/files", data={"purpose": "batch"}, headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (jsonl(batch_line("a"), batch_line("b"), batch_line("a")), "Line 3: 'custom_id' \"a\" is used on line 1 too."),
        (jsonl(batch_line("a"), b"{not json"), "Line 2 is not valid JSON"),
        (jsonl(b"[1, 2]"), "Line 1 is not a JSON object."),
        (jsonl({**batch_line("a"), "custom_id": 7}), "Line 1: 'custom_id' must be a non-empty string."),
        (jsonl(batch_line("a"), batch_line("b", method="GET")), "Line 2: 'method' must be \"POST\"."),
        (
            jsonl(batch_line("a", "/v1/completions")),
            "Line 1: 'url' must be one of /v1/chat/completions, /v1/embeddings, /v1/responses.",
        ),
        (
            jsonl(batch_line("a"), batch_line("b", "/v1/responses")),
            "Line 2: 'url' is /v1/responses, but the file's first request calls /v1/chat/completions: "
            "all requests of a batch call one url.",
        ),
        (jsonl(batch_line("a", body=[])), "Line 1: 'body' must be a JSON object."),
        (jsonl(batch_line("a", body={"messages": []})), "Line 1: 'body' must name its 'model' (a non-empty string)."),
        (
            jsonl(batch_line("a"), b"", batch_line("b")),
            "Line 2 is blank: only the end of the file may have blank lines.",
        ),
        (b"\n\n", "The file holds no request: a batch file has one JSON request per line."),
        (jsonl(*(batch_line(str(n)) for n in range(4))), "Line 4: a batch file holds at most 3 requests."),
    ],
)
def test_a_bad_batch_file_is_refused_naming_its_first_bad_line_and_nothing_is_stored(
    world, make_key, user_with_credits, files_dir, settings, content, message
):
    settings.GATEWAY_BATCH_MAX_LINES = 3
    client = world.client(make_key(user_with_credits, purpose="batch"))

    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("in.jsonl", content), purpose="batch")

    assert refused.value.body["message"].startswith(message)  # type: ignore[index]
    assert refused.value.body["param"] == "file"  # type: ignore[index]
    assert not StoredFile.objects.exists()
    assert stored_objects(files_dir) == []


def test_a_batch_line_is_read_no_further_than_the_longest_request():
    source = io.BytesIO(jsonl(batch_line("a")) + b"x" * 1000)
    with pytest.raises(InvalidBatchFile, match=r"Line 2 is longer than the limit of 200 bytes\."):
        read_batch_file(source, max_lines=10, max_line_bytes=200)
    assert source.tell() < 400  # stopped at the limit, not at the end of the line


@pytest.mark.parametrize("size", [1001, 200_000], ids=["just over (checked by the view)", "far over (by the handler)"])
def test_a_file_over_the_limit_is_refused_with_413_and_not_stored(
    world, make_key, user_with_credits, files_dir, settings, size
):
    settings.GATEWAY_MAX_FILE_BYTES = 1000
    client = world.client(make_key(user_with_credits))
    assert client.files.create(file=("ok.bin", b"x" * 1000), purpose="user_data").bytes == 1000

    with pytest.raises(openai.APIStatusError, match="larger than the limit of 1000 bytes") as refused:
        client.files.create(file=("big.bin", b"x" * size), purpose="user_data")

    assert refused.value.status_code == 413
    assert StoredFile.objects.count() == 1
    assert len(stored_objects(files_dir)) == 1


def test_files_are_listed_newest_first_in_pages(world, make_key, user_with_credits):
    client = world.client(make_key(user_with_credits))
    ids = [client.files.create(file=(f"{n}.txt", b"x"), purpose="user_data").id for n in range(3)]
    batch = client.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch").id

    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == [batch, ids[2]]
    assert first.has_more
    rest = client.files.list(limit=2, after=ids[2])
    assert [f.id for f in rest.data] == [ids[1], ids[0]]
    assert not rest.has_more
    assert [f.id for f in client.files.list(order="asc", purpose="user_data")] == ids
    assert [f.id for f in client.files.list(purpose="batch")] == [batch]
    with pytest.raises(openai.BadRequestError, match="'limit' must be an integer from 1 to 10000"):
        client.files.list(limit=10_001)


def test_an_expiring_file_says_when_and_is_gone_once_expired(world, make_key, user_with_credits):
    client = world.client(make_key(user_with_credits))
    uploaded = client.files.create(
        file=("t.txt", b"x"), purpose="user_data", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert uploaded.expires_at is not None
    assert uploaded.expires_at - uploaded.created_at == 3600

    StoredFile.objects.update(expires_at=StoredFile.objects.get().created_at)

    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert client.files.list().data == []


@pytest.mark.parametrize("purpose", ["realtime", "batch", "playground"])
def test_every_key_that_may_call_the_api_may_upload(world, make_key, user_with_credits, purpose):
    client = world.client(make_key(user_with_credits, purpose=purpose))
    assert client.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch").bytes > 0


def test_a_platform_key_may_not_use_files(world, make_key, user_with_credits):
    client = world.client(make_key(user_with_credits, purpose="platform"))
    with pytest.raises(openai.PermissionDeniedError, match="Platform keys are for management only"):
        client.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
    with pytest.raises(openai.PermissionDeniedError):
        client.files.list()


def test_files_are_kept_by_the_configured_storage_backend(world, make_key, user_with_credits, files_dir, settings):
    # Any Django storage works (django-storages' S3Storage, say): here one that keeps files in memory.
    settings.STORAGES = {**settings.STORAGES, "files": {"BACKEND": "django.core.files.storage.InMemoryStorage"}}
    client = world.client(make_key(user_with_credits))

    uploaded = client.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")

    assert client.files.content(uploaded.id).read() == jsonl(batch_line("a"))
    assert stored_objects(files_dir) == []
    client.files.delete(uploaded.id)
