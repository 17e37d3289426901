"""The access token: where it comes from, where a generated one is kept, and how requests prove it.

Every /v1 route but health requires `Authorization: Bearer <token>`. A token is always in
force: when none is given, one is generated and written to a file only the user can read, so
local clients (the Krita plugin) pick it up from there.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from engine.server.errors import ApiError

TOKEN_FILE_NAME = "token"
# A token chosen by hand must not be guessable; generated ones are 43 characters.
MIN_TOKEN_CHARS = 16
MAKE_TOKEN_HINT = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="The service token: `--token`, the `--token-file`, or the generated token file "
    "whose path `instruct-edit serve` prints.",
)


class TokenError(Exception):
    """The token could not be set up; the message says which file or flag and what to do."""


@dataclass(frozen=True)
class TokenSource:
    token: str
    # Where the token lives, when it is in a file (always for a generated one).
    path: Path | None
    generated: bool
    explicit: bool  # given by the operator (--token, or an existing --token-file)


def default_token_path() -> Path:
    """A per-user state folder: %LOCALAPPDATA% on Windows, Application Support on macOS, XDG elsewhere."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "instruct-edit" / TOKEN_FILE_NAME


def _write_private(path: Path, text: str) -> None:
    """Create `path` readable and writable by the user only; never replaces an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def _check_private(path: Path) -> None:
    """POSIX: refuse a token file that other users may read (they could then use the service)."""
    if sys.platform == "win32":
        return  # no mode bits; the per-user folder's ACL protects it
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as err:
        raise TokenError(f"cannot read the token file {path}: {err.strerror or err}") from err
    if mode & 0o077:
        raise TokenError(
            f"the token file {path} can be read by other users (mode {mode:03o}); make it "
            f"private with `chmod 600 {path}` and start again"
        )


def check_token_strength(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"{where} is {len(token)} characters long; a token needs at least {MIN_TOKEN_CHARS} "
            f"(make one with: {MAKE_TOKEN_HINT})"
        )


def _read_token_file(path: Path) -> str:
    _check_private(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise TokenError(f"cannot read the token file {path}: {err.strerror or err}") from err
    if not token:
        raise TokenError(f"the token file {path} is empty; write a token into it or delete it")
    check_token_strength(token, f"the token in {path}")
    return token


def load_token(token: str | None, token_file: str | Path | None) -> TokenSource:
    """`--token` wins; else `--token-file` (created with a new token if missing); else the
    per-user default file (reused when present, created otherwise). A given token needs
    MIN_TOKEN_CHARS; an existing token file must be private to the user (POSIX: mode 600)."""
    if token is not None:
        if not token.strip():
            raise TokenError("--token is empty; give a non-empty token or leave the flag out")
        if token_file is not None:
            raise TokenError("give either --token or --token-file, not both")
        check_token_strength(token.strip(), "--token")
        return TokenSource(token.strip(), None, generated=False, explicit=True)
    path = Path(token_file).expanduser() if token_file is not None else default_token_path()
    if path.exists():
        return TokenSource(
            _read_token_file(path), path, generated=False, explicit=token_file is not None
        )
    new_token = secrets.token_urlsafe(32)
    try:
        _write_private(path, new_token)
    except FileExistsError:
        # Another server created it between our check and our write: use that one.
        return TokenSource(_read_token_file(path), path, generated=False, explicit=False)
    except OSError as err:
        raise TokenError(
            f"cannot write the generated token to {path}: {err.strerror or err}; "
            "pass --token-file with a writable path, or --token"
        ) from err
    return TokenSource(new_token, path, generated=True, explicit=False)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_matches(given: str, expected: str) -> bool:
    # Constant-time comparison, so response timing does not reveal how much of a guess matched.
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


async def require_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
) -> None:
    """FastAPI dependency: 401 without a bearer token, 403 with a wrong one."""
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "this route needs the header 'Authorization: Bearer <token>'; the token is in the file "
            "that 'instruct-edit serve' printed at start-up",
            "Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not token_matches(credentials.credentials, request.app.state.settings.token):
        raise ApiError(
            403, "the token is wrong; use the one the server was started with", "Authorization"
        )
