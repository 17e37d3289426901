"""The optional content filter of `generate-text`: a word list file or a Python callable.

A filter is a callable `allowed(text) -> bool`. It is given as either
- a word list: a text file, one word or phrase per line (`#` starts a comment), matched
  case-insensitively as whole words, so "ass" does not block "glass"; or
- a plugin: `package.module:function` or `path/to/file.py:function`, a function taking one
  string and returning True when the text may be kept (wrap a classifier model this way).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

from engine.errors import InvalidInput

ContentFilter = Callable[[str], bool]


class WordListFilter:
    """Rejects a text containing any listed word or phrase (whole words, any case)."""

    def __init__(self, words: list[str]) -> None:
        cleaned = sorted({w.strip().lower() for w in words if w.strip()}, key=len, reverse=True)
        if not cleaned:
            raise ValueError("the word list is empty")
        self.words = cleaned
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in cleaned)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @classmethod
    def from_file(cls, path: Path) -> WordListFilter:
        lines = path.read_text(encoding="utf-8").splitlines()
        return cls([line.split("#", 1)[0] for line in lines])

    def __call__(self, text: str) -> bool:
        return self._pattern.search(text) is None


def load_content_filter(spec: str) -> ContentFilter:
    """A filter from a word list path or a `module:function` / `file.py:function` spec."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".py":
            raise InvalidInput(
                f"--content-filter {spec}: name the function too, as {spec}:function_name",
                "content_filter",
            )
        try:
            return WordListFilter.from_file(path)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise InvalidInput(
                f"--content-filter {spec}: cannot use it as a word list ({err})", "content_filter"
            ) from err
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        raise InvalidInput(
            f"--content-filter {spec!r} is neither an existing word-list file nor a "
            "`module:function` / `file.py:function` plugin",
            "content_filter",
        )
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(
                "instruct_edit_content_filter", target
            )
            if module_spec is None or module_spec.loader is None or not Path(target).is_file():
                raise ImportError(f"no Python file {target}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        function = getattr(module, attribute)
    except (ImportError, AttributeError, OSError) as err:
        raise InvalidInput(
            f"--content-filter {spec!r}: cannot load it ({err})", "content_filter"
        ) from err
    if not callable(function):
        raise InvalidInput(f"--content-filter {spec!r} is not callable", "content_filter")
    return function
