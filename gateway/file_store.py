"""Files: their bytes in the `files` storage (any Django storage backend), their records in `StoredFile`.

Every file comes in through `create_file`, an upload and (for the Batch API) a file the gateway
writes alike: the bytes are stored first, then the row; a row whose bytes are gone never exists.
"""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.files import File
from django.core.files.storage import Storage, storages
from django.db.models import Q
from django.utils import timezone

from gateway.batch_file import InvalidBatchFile, read_batch_file
from gateway.models import UPLOAD_PURPOSES, FilePurpose, StoredFile

logger = logging.getLogger(__name__)
CONTENT_CHUNK_BYTES = 1024 * 1024


class Refused(ValueError):
    """An upload that is not stored: the message names why, `param` the form field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Page:
    files: list[StoredFile]
    has_more: bool


def file_storage() -> Storage:
    return storages["files"]


def check_purpose(purpose: str | None) -> str:
    if not purpose:
        raise Refused("You must provide a 'purpose'.", "purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise Refused(f"Invalid 'purpose': '{purpose}'. Use one of {', '.join(UPLOAD_PURPOSES)}.", "purpose")
    return purpose


def create_file(
    content: File,
    *,
    owner_id: int,
    api_key_id: int | None,
    filename: str,
    purpose: str,
    expires_after_seconds: int | None = None,
) -> StoredFile:
    """Validate (a batch input file: every line) and store a file; `Refused` stores nothing."""
    line_count, request_url = None, ""
    if purpose == FilePurpose.BATCH:
        if content.size > settings.GATEWAY_BATCH_MAX_BYTES:
            raise Refused(f"A batch file may hold at most {settings.GATEWAY_BATCH_MAX_BYTES} bytes.", "file")
        content.seek(0)
        try:
            # A line is one request: it may be as large as a request body, no larger.
            batch = read_batch_file(
                content,
                max_lines=settings.GATEWAY_BATCH_MAX_LINES,
                max_line_bytes=settings.GATEWAY_MAX_BODY_BYTES,
            )
        except InvalidBatchFile as exc:
            raise Refused(str(exc), "file") from None
        line_count, request_url = batch.line_count, batch.url
    content.seek(0)
    file_id = uuid.uuid4()
    created_at = timezone.now()
    expires_at = (
        None if expires_after_seconds is None else created_at + datetime.timedelta(seconds=expires_after_seconds)
    )
    # Never the client's file name in the storage: it could name a path.
    storage_name = file_storage().save(f"{owner_id}/file-{file_id.hex}", content)
    try:
        return StoredFile.objects.create(
            id=file_id,
            owner_id=owner_id,
            api_key_id=api_key_id,
            filename=filename[:255],
            purpose=purpose,
            bytes=content.size,
            storage_name=storage_name,
            line_count=line_count,
            request_url=request_url,
            created_at=created_at,
            expires_at=expires_at,
        )
    except BaseException:
        file_storage().delete(storage_name)
        raise


def find_file(public_id: str, owner_id: int) -> StoredFile | None:
    """The owner's file for a `file-<hex>` id; None for a bad id, an expired file, or someone else's."""
    try:
        file_id = uuid.UUID(public_id.removeprefix("file-"))
    except ValueError:
        return None
    return StoredFile.objects.visible_to(owner_id).filter(pk=file_id).first()


def list_files(owner_id: int, *, purpose: str | None, after: StoredFile | None, limit: int, order: str) -> Page:
    """A page of the owner's files by creation time (`order` "asc" or "desc"), after the file `after`."""
    files = StoredFile.objects.visible_to(owner_id)
    if purpose:
        files = files.filter(purpose=purpose)
    if order == "asc":
        files = files.order_by("created_at", "id")
        if after is not None:
            files = files.filter(Q(created_at__gt=after.created_at) | Q(created_at=after.created_at, id__gt=after.id))
    else:
        files = files.order_by("-created_at", "-id")
        if after is not None:
            files = files.filter(Q(created_at__lt=after.created_at) | Q(created_at=after.created_at, id__lt=after.id))
    found = list(files[: limit + 1])
    return Page(files=found[:limit], has_more=len(found) > limit)


def delete_file(stored: StoredFile) -> None:
    """Delete a file's record, then its bytes (bytes left behind by a failure are only wasted space)."""
    StoredFile.objects.filter(pk=stored.pk).delete()
    try:
        file_storage().delete(stored.storage_name)
    except Exception:
        logger.exception("Could not delete %s (%s) from the files storage", stored.public_id, stored.storage_name)


async def content_chunks(stored: StoredFile) -> AsyncIterator[bytes]:
    """A file's bytes, read off the event loop a chunk at a time (a storage may be a network away)."""
    handle = await sync_to_async(file_storage().open, thread_sensitive=False)(stored.storage_name, "rb")
    try:
        while chunk := await sync_to_async(handle.read, thread_sensitive=False)(CONTENT_CHUNK_BYTES):
            yield chunk
    finally:
        await sync_to_async(handle.close, thread_sensitive=False)()
