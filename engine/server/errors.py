"""The service's one error shape: `{"error": {"status", "message", "field"}}`, for every failure."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EngineError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP status, a message a painter can act on, and the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def error_response(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"status": status, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _field_from_location(loc: tuple | list) -> str | None:
    # FastAPI locations look like ("body", "image") or ("path", "job_id"); the first entry
    # only says where the value came from.
    parts = [str(part) for part in loc[1:]] if len(loc) > 1 else [str(part) for part in loc]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.field, err.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, err: EngineError) -> JSONResponse:
        return error_response(err.status, err.message, err.field)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if not errors:
            return error_response(422, "the request is not valid")
        first = errors[0]
        field = _field_from_location(first.get("loc", ()))
        message = str(first.get("msg", "is not valid"))
        text = f"{field}: {message}" if field else message
        if len(errors) > 1:
            text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(422, text, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else "the request failed"
        return error_response(err.status_code, message, getattr(err, "field", None), err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        # Reaching this is a bug in the service; the answer stays JSON and names the error type.
        log.exception("unexpected error while answering a request")
        return error_response(500, f"internal error ({type(err).__name__}); see the server log")
