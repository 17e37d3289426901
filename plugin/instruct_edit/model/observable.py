"""Observable: class-level properties that emit `changed(name, value)` when set to a new value.

Widgets subscribe through `bind()` helpers in ui/ and never poll the state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..qt import QObject, pyqtSignal


class Field:
    """A property stored on the instance; setting a different value emits `changed`."""

    def __init__(self, default: Any) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__.get(self.name, self.default)
        if isinstance(value, (list, dict)) and self.name not in instance.__dict__:
            value = type(value)(value)  # never hand out the shared default container
            instance.__dict__[self.name] = value
        return value

    def __set__(self, instance: Any, value: Any) -> None:
        old = instance.__dict__.get(self.name, self.default)
        instance.__dict__[self.name] = value
        if old != value or isinstance(value, (list, dict)):
            instance.changed.emit(self.name, value)


class Observable(QObject):
    changed = pyqtSignal(str, object)

    def on_change(self, name: str, callback: Callable[[Any], None], *, now: bool = True,
                  owner: QObject | None = None) -> None:
        """Call `callback(value)` whenever `name` changes (and once now, unless now=False).

        The state can outlive the widgets showing it (one state, a docker per window that
        Krita may destroy): the link ends when `owner` is destroyed, or when the callback
        touches a widget Qt has already deleted.
        """
        if name not in self.field_names():
            raise AttributeError(f"{type(self).__name__} has no observable field {name!r}")

        def relay(changed_name: str, value: Any) -> None:
            if changed_name != name:
                return
            try:
                callback(value)
            except RuntimeError as err:
                if "has been deleted" not in str(err):
                    raise
                self._unlink(relay)

        self.changed.connect(relay)
        if owner is not None:
            owner.destroyed.connect(lambda *_: self._unlink(relay))
        if now:
            callback(getattr(self, name))

    def _unlink(self, relay: Callable[..., None]) -> None:
        with contextlib.suppress(TypeError, RuntimeError):  # already unlinked
            self.changed.disconnect(relay)

    @classmethod
    def field_names(cls) -> list[str]:
        return [k for klass in cls.__mro__ for k, v in vars(klass).items() if isinstance(v, Field)]
