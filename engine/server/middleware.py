"""ASGI middleware that acts before a request body is read: the Host check, the token gate and
the upload limit.

Checking here (rather than in FastAPI dependencies, which run after the multipart body is
parsed) means a client without the token, or with an oversized upload, costs the server no
parsing and no temporary files.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.server.auth import is_loopback, token_matches

PUBLIC_PATHS = frozenset({"/v1/health"})
LOOPBACK_NAMES = frozenset({"localhost"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})


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


def host_name(header: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), lower case and
    without brackets or a trailing dot; None when it is not of that shape."""
    text = header.strip().lower()
    if text.startswith("["):
        name, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return None
        return name or None
    name, colon, port = text.partition(":")
    if colon and not (port.isascii() and port.isdigit()):
        return None
    name = name.rstrip(".")
    return name or None


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostCheck:
    """421 for a request whose Host header is not a name of this server.

    A web page cannot read answers from another site, unless its own name comes to point at
    this server (DNS rebinding): then its requests carry the page's name in Host. So only the
    bound address and names the operator listed pass: on loopback, 127.0.0.1, localhost and
    [::1] (any port); bound to a wildcard (0.0.0.0, ::), any IP address; else the bound
    address. An IP address never comes from a rebinding page, a name might."""

    def __init__(self, app: ASGIApp, bound: str, allowed: tuple[str, ...] = ()) -> None:
        self.app = app
        self.bound = bound.strip("[]").lower()
        self.allowed = frozenset(
            name for name in (host_name(item) for item in allowed) if name is not None
        )

    def accepts(self, name: str) -> bool:
        if name in self.allowed or name == self.bound:
            return True
        address, bound_address = _ip(name), _ip(self.bound)
        if is_loopback(self.bound):
            return name in LOOPBACK_NAMES or (address is not None and address.is_loopback)
        if self.bound in WILDCARD_ADDRESSES:
            return address is not None or name in LOOPBACK_NAMES
        return address is not None and address == bound_address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"host")
        name = host_name(given) if given is not None else None
        if name is not None and self.accepts(name):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # no route uses one; refuse without an HTTP body
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = "no Host header" if given is None else f"the Host header {given[:100]!r}"
        await _send_error(
            send,
            421,
            f"{shown} does not name this server, so the request is refused (a web page whose "
            "name was made to point here could otherwise read it). Use the address the server "
            f"listens on ({self.bound or 'its IP address'}), or, if clients reach it by another "
            "name, start it with --allowed-host NAME",
            "Host",
            {},
        )


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
