"""ASGI middleware that acts before a request body is read: the token gate and the upload limit.

Checking here (rather than in FastAPI dependencies, which run after the multipart body is
parsed) means a client without the token, or with an oversized upload, costs the server no
parsing and no temporary files.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.server.auth import token_matches

PUBLIC_PATHS = frozenset({"/v1/health"})


async def _send_error(
    send: Send, status: int, message: str, field: str | None, headers: dict[str, str]
) -> None:
    body = json.dumps({"error": {"status": status, "message": message, "field": field}}).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if status == 413:
        # The rest of the body is not read; the connection cannot be reused.
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class TokenGate:
    """401/403 for /v1 routes (health excepted) before anything else happens."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/") or path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization") or ""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            await _send_error(
                send,
                401,
                "this route needs the header 'Authorization: Bearer <token>'; the token is in the file "
                "that 'instruct-edit serve' printed at start-up",
                "Authorization",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        if not token_matches(given.strip(), self.token):
            await _send_error(
                send,
                403,
                "the token is wrong; use the one the server was started with",
                "Authorization",
                {},
            )
            return
        await self.app(scope, receive, send)


class UploadTooLarge(HTTPException):
    field = "image"

    def __init__(self, message: str) -> None:
        super().__init__(413, message, headers={"Connection": "close"})


class UploadLimit:
    """413 when a request body exceeds `limit` bytes: at once from Content-Length, or while
    streaming (chunked uploads) by failing the body read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self, size: int | None = None) -> str:
        size_text = f" ({size / 2**20:.1f} MiB)" if size is not None else ""
        return (
            f"the upload{size_text} is larger than this server's limit of {self.limit / 2**20:.1f} MiB; "
            "send a smaller image or start the server with a larger --max-upload-mb"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if (
            declared is not None
            and declared.isascii()
            and declared.isdigit()
            and int(declared) > self.limit
        ):
            await _send_error(send, 413, self._too_large(int(declared)), "image", {})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message: dict[str, Any] = await receive()  # type: ignore[assignment]
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised inside FastAPI's form parsing, which passes HTTPException through
                    # (anything else would become a 400); the error handler shapes the answer.
                    raise UploadTooLarge(self._too_large())
            return message  # type: ignore[return-value]

        await self.app(scope, limited_receive, send)
