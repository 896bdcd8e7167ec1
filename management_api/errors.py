"""Every failure of the management API in the envelope the /ai/ API uses:
`{"error": {"message", "type", "param", "code"}}` — bad input, a missing object, a refused caller alike."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import NON_FIELD_ERRORS
from django.core.exceptions import ValidationError as ModelValidationError
from django.db.models.deletion import ProtectedError
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as InputError
from pydantic import ValidationError as PydanticValidationError

from common.commands import validation_messages
from gateway.errors import openai_error

logger = logging.getLogger(__name__)

CODES = {400: "invalid_value", 401: "unauthenticated", 403: "forbidden", 404: "not_found", 409: "conflict"}


class ApiError(HttpError):
    """A failure the API reports as it is: its status, message, the field it concerns and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, message)
        self.param = param
        self.code = code


def not_found(what: str, key: object) -> ApiError:
    return ApiError(404, f"No {what} {key}.", code="not_found")


def error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> HttpResponse:
    return openai_error(status, message, param=param, code=code or CODES.get(status))


def _input_error(request: HttpRequest, exc: InputError) -> HttpResponse:
    # Pydantic's locations are (where, [the payload argument,] field…): name the field as a client sends it.
    first: dict[str, Any] = exc.errors[0]
    where, *loc = (str(part) for part in first.get("loc", ()))
    if where == "body" and len(loc) > 1:
        loc = loc[1:]
    param = ".".join(loc) or None
    message = str(first.get("msg", "Invalid value.")).removeprefix("Value error, ")
    return error(400, f"{param}: {message}" if param else message, param=param, code=str(first.get("type", "")) or None)


def _model_error(request: HttpRequest, exc: ModelValidationError) -> HttpResponse:
    param = None
    if hasattr(exc, "error_dict"):
        fields = [field for field in exc.error_dict if field != NON_FIELD_ERRORS]
        param = fields[0] if fields else None
    return error(400, " ".join(validation_messages(exc)), param=param)


def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if isinstance(exc, ApiError):
        return error(exc.status_code, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, AuthenticationError) and exc.message == "Unauthorized":
        # Raised by the framework when no credential was sent at all.
        return error(
            401,
            "No credential: send a platform key as 'Authorization: Bearer sk-…', or sign into the admin.",
            code="missing_credential",
        )
    return error(exc.status_code, exc.message)


def _server_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    # An answer that fails its own schema is the API's bug, not the caller's: a 500, logged, never a 400.
    logger.error("Management API error on %s %s", request.method, request.path, exc_info=exc)
    return error(500, "The management API failed to handle this request.", code="internal_error")


def install(api: NinjaAPI) -> None:
    """Answer every failure of `api` in the envelope."""
    # ninja's hints type a handler's exception as `E | type[E]`; it is always called with an instance.
    handlers: list[tuple[type[Exception], Any]] = [
        (InputError, _input_error),
        (HttpError, _http_error),
        (ModelValidationError, _model_error),
        (ValueError, lambda request, exc: error(400, str(exc))),
        (PydanticValidationError, _server_error),
        (Http404, lambda request, exc: error(404, str(exc) or "Not found.")),
        (ProtectedError, lambda request, exc: error(409, exc.args[0])),
    ]
    for exception, handler in handlers:
        api.add_exception_handler(exception, handler)
