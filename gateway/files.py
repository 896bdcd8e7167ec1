"""The Files API (`/ai/v1/files`): upload, list, read, download, delete — each caller sees only their own.

The handler has already spooled an upload's body to a temporary file (gateway/handler.py); here the
multipart form is parsed onto disk too, and the file validated and stored, all off the event loop.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from django.http import HttpResponse, StreamingHttpResponse
from django.http.multipartparser import MultiPartParserError
from django.http.response import HttpResponseBase
from django.utils.http import content_disposition_header

from gateway import errors
from gateway.call import GatewayRequest
from gateway.db import in_thread
from gateway.file_store import Refused, check_purpose, content_chunks, create_file, delete_file, find_file, list_files
from gateway.render import file_object, json_response
from gateway.stored import stored

MAX_LIST_LIMIT = 10_000  # OpenAI's bounds and default
# `expires_after[seconds]`: OpenAI's bounds, an hour to 30 days.
EXPIRY_SECONDS = range(3600, 2_592_000 + 1)


@stored("GET", "POST")
async def files(request: GatewayRequest) -> HttpResponseBase:
    if request.method == "POST":
        # Django's multipart parser writes the file part to a temporary file as it parses, never to memory.
        request.upload_handlers = [TemporaryFileUploadHandler(request)]
        return await in_thread(receive_upload, request)
    limit = request.GET.get("limit", str(MAX_LIST_LIMIT))
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        return errors.invalid_request(f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}.", "limit")
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        return errors.invalid_request("'order' must be 'asc' or 'desc'.", "order")
    owner_id = request.gateway.key.user_id
    after_id = request.GET.get("after")
    after = None
    if after_id:
        after = await in_thread(find_file, after_id, owner_id)
        if after is None:
            return errors.invalid_request(f"No file with id '{after_id}' to list after.", "after")
    page = await in_thread(
        list_files, owner_id, purpose=request.GET.get("purpose"), after=after, limit=int(limit), order=order
    )
    data = [file_object(stored_file) for stored_file in page.files]
    return json_response(
        {
            "object": "list",
            "data": data,
            "has_more": page.has_more,
            "first_id": data[0]["id"] if data else "",
            "last_id": data[-1]["id"] if data else "",
        }
    )


def receive_upload(request: GatewayRequest) -> HttpResponse:
    """Parse the form, check it, store the file (sync: the parser and the storage block)."""
    try:
        upload = request.FILES.get("file")
        form = request.POST
    except (MultiPartParserError, SuspiciousOperation) as exc:
        return errors.invalid_request(f"The request body is not a valid multipart/form-data form ({exc}).", None)
    try:
        purpose = check_purpose(form.get("purpose"))
        if upload is None:
            raise Refused("You must provide a 'file' (a file part of the multipart/form-data form).", "file")
        if upload.size is not None and upload.size > settings.GATEWAY_MAX_FILE_BYTES:
            return errors.file_too_large(settings.GATEWAY_MAX_FILE_BYTES)
        stored_file = create_file(
            upload,
            owner_id=request.gateway.key.user_id,
            api_key_id=request.gateway.key.id,
            filename=upload.name or "file",
            purpose=purpose,
            expires_after_seconds=expiry(form.get("expires_after[anchor]"), form.get("expires_after[seconds]")),
        )
    except Refused as exc:
        return errors.invalid_file(exc.message, exc.param)
    return json_response(file_object(stored_file))


def expiry(anchor: str | None, seconds: str | None) -> int | None:
    """`expires_after`, in seconds after the file's creation."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise Refused("'expires_after[anchor]' must be 'created_at'.", "expires_after")
    if seconds is None or not seconds.isdigit() or int(seconds) not in EXPIRY_SECONDS:
        raise Refused("'expires_after[seconds]' must be an integer from 3600 to 2592000.", "expires_after")
    return int(seconds)


@stored("GET", "DELETE")
async def file_detail(request: GatewayRequest, file_id: str) -> HttpResponseBase:
    stored_file = await in_thread(find_file, file_id, request.gateway.key.user_id)
    if stored_file is None:
        return errors.file_not_found(file_id)
    if request.method == "DELETE":
        await in_thread(delete_file, stored_file)
        return json_response({"id": stored_file.public_id, "object": "file", "deleted": True})
    return json_response(file_object(stored_file))


@stored("GET")
async def file_content(request: GatewayRequest, file_id: str) -> HttpResponseBase:
    stored_file = await in_thread(find_file, file_id, request.gateway.key.user_id)
    if stored_file is None:
        return errors.file_not_found(file_id)
    response = StreamingHttpResponse(content_chunks(stored_file), content_type="application/octet-stream")
    response["Content-Length"] = str(stored_file.bytes)
    response["Content-Disposition"] = content_disposition_header(True, stored_file.filename)
    return response
