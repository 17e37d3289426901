"""Errors a user can act on. Each says what went wrong, which input, and what to do."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: `str(err)` is a one-line message fit for a painter or a terminal."""

    #: HTTP status the service answers with; the CLI exits non-zero whatever it is.
    status: int = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(EngineError):
    """A parameter or an image the caller sent is unusable."""

    status = 422


class ModelNotFound(EngineError):
    status = 404


class UnsafeModelFile(EngineError):
    """A pickle-based checkpoint (.ckpt/.bin/.pt) without the explicit allow flag."""

    status = 422


class EditCancelled(EngineError):
    status = 409

    def __init__(self, message: str = "the edit was cancelled") -> None:
        super().__init__(message)


class OutOfMemory(EngineError):
    status = 507
