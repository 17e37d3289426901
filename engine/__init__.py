"""Instruct Edit engine: InstructPix2Pix editing library, CLI and HTTP service."""

from engine.manifest import MANIFEST

__version__: str = MANIFEST["version"]
