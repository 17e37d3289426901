"""Names for result groups and layers.

A layer's name carries what tells it apart from its siblings: the instruction, the model's
own parameters by their short names (from the engine's ParamSpecs), and the seed, e.g.
`make it red · s_T 7.5 s_I 1.5 · seed 3` or `make it red · guidance 2.5 · seed 3`.
"""

from __future__ import annotations

from ..provenance import describe, provenance  # noqa: F401  (the controller's names for them)
from ..request import EditRequest

GROUP_NAME_CHARS = 60
LAYER_INSTRUCTION_CHARS = 40


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def group_name(instruction: str) -> str:
    """The group holding an edit's variants is named after the instruction (shortened)."""
    return _shorten(instruction, GROUP_NAME_CHARS) or "Instruct Edit"


def layer_name(request: EditRequest, variant: int) -> str:
    """One variant's layer: instruction · the family's parameters · seed."""
    parts = [_shorten(request.instruction, LAYER_INSTRUCTION_CHARS) or "Instruct Edit",
             request.describe_options(), f"seed {request.seed + variant}"]
    return " · ".join(part for part in parts if part)
