"""What the command-line entry points (`instruct-edit edit`, `instruct-edit serve`) show on the
terminal: the engine's own lines, not the libraries' notices.

torch, torchao, transformers and diffusers log notices at import and load time ("requires
torchvision", "Failed to load …so", deprecations) that say nothing a painter can act on and
bury the one `error:` line. The entry points call `quiet_libraries` first; library code never
does (a program embedding the engine keeps its own logging). `--debug` (or the environment
variable INSTRUCT_EDIT_DEBUG=1) keeps everything, tracebacks included.
"""

from __future__ import annotations

import logging
import os
import warnings

DEBUG_ENV = "INSTRUCT_EDIT_DEBUG"
# Loggers of the libraries the engine loads (their children inherit the level).
LIBRARY_LOGGERS = (
    "torch",
    "torchao",
    "transformers",
    "diffusers",
    "huggingface_hub",
    "accelerate",
    "peft",
    "bitsandbytes",
    "gguf",
    "openvino",
    "nncf",
)
# Read by transformers and diffusers when they configure their own loggers, at import.
VERBOSITY_ENV = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def quiet_libraries() -> None:
    """Only errors from the libraries' loggers, no Python warnings, no loading bars.

    Safe to call before or after the libraries are imported: the environment variables cover
    a later import, the logger levels an earlier one. The user's own TRANSFORMERS_VERBOSITY /
    DIFFUSERS_VERBOSITY win."""
    for name in VERBOSITY_ENV:
        os.environ.setdefault(name, "error")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Deprecation and "will change" notices from the libraries; nothing the engine itself
    # reports goes through warnings.
    warnings.simplefilter("ignore")


def quiet_loading_bars(keep_download_bars: bool) -> None:
    """No diffusers/transformers loading bars (the engine shows its own progress; a service
    reports loading in /v1/health). `keep_download_bars`: the hub's download bars stay (a
    download takes minutes; the terminal should show it is alive)."""
    try:
        import diffusers.utils.logging as diffusers_logging
        import huggingface_hub.utils as hub_utils
        import transformers.utils.logging as transformers_logging
    except ImportError:  # pragma: no cover - all come with the engine
        return
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # turns the hub's bars off too
    if keep_download_bars:
        hub_utils.enable_progress_bars()


def show_engine_notes() -> None:
    """The engine's own notes (e.g. "OpenVINO: converting the UNet … (first use only)") on
    stderr, one plain line each: they explain a wait the painter would otherwise not."""
    logger = logging.getLogger("instruct_edit")
    if not any(getattr(h, "_instruct_edit_notes", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._instruct_edit_notes = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
