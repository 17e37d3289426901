"""The paper's text format for caption → (instruction, edited caption), and its strict parser.

Fine-tuning pairs (InstructPix2Pix, section 3.1.1 and its GPT-3 fine-tuning data):
    prompt      = caption + "\\n##\\n"
    completion  = instruction + "\\n%%\\n" + edited_caption + "\\nEND"
Generation stops at "\\nEND"; a completion that does not reach it is truncated, and one
that does not have exactly the two one-line fields is malformed. Both are rejected, never
guessed at: a half-parsed edit would teach the image model the wrong thing.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

PROMPT_SEPARATOR = "\n##\n"
FIELD_SEPARATOR = "\n%%\n"
END_MARKER = "\nEND"


def format_prompt(caption: str) -> str:
    return caption.strip() + PROMPT_SEPARATOR


def format_completion(edit: str, edited_caption: str) -> str:
    return edit.strip() + FIELD_SEPARATOR + edited_caption.strip() + END_MARKER


class ParseError(ValueError):
    """A completion that is not `edit \\n%%\\n edited caption \\nEND`; `.reason` says how."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # "truncated" or "malformed": what the counters are keyed by


@dataclass(frozen=True)
class ParsedEdit:
    edit: str
    output: str


def parse_completion(text: str) -> ParsedEdit:
    """Parse generated text (the part after the prompt) strictly.

    Accepted: optional leading whitespace, one non-empty line of instruction, "\\n%%\\n", one
    non-empty line of edited caption, "\\nEND", then anything (the sampler may run past END
    when several sequences are generated in one batch).
    """
    body = text.lstrip()
    end = body.find(END_MARKER)
    if end < 0:
        raise ParseError("truncated", f"no {END_MARKER!r} in {text[:120]!r}")
    body = body[:end]
    parts = body.split(FIELD_SEPARATOR)
    if len(parts) != 2:
        raise ParseError(
            "malformed",
            f"expected one {FIELD_SEPARATOR!r} between instruction and caption, found {len(parts) - 1}",
        )
    edit, output = (part.strip() for part in parts)
    if not edit or not output:
        raise ParseError("malformed", "empty instruction or edited caption")
    for name, value in (("instruction", edit), ("edited caption", output)):
        if "\n" in value:
            raise ParseError("malformed", f"the {name} spans several lines: {value[:80]!r}")
        if value.startswith(("##", "%%")) or value == "END":
            raise ParseError("malformed", f"the {name} is a format marker: {value[:80]!r}")
    return ParsedEdit(edit, output)


_SPACES = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Lower case, punctuation deleted (Unicode P* and ASCII symbols), spaces collapsed.

    The key for "equal ignoring case and punctuation" and for de-duplication.
    """
    kept = (
        char
        for char in text.casefold()
        if not unicodedata.category(char).startswith("P") and char not in string.punctuation
    )
    return _SPACES.sub(" ", "".join(kept)).strip()


def same_caption(a: str, b: str) -> bool:
    return normalize_caption(a) == normalize_caption(b)
