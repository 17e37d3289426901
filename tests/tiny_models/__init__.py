"""Tiny random models built from each family's configs (no downloads), for tests and benchmarks.

Import as `tests.tiny_models.<family>` (tests/conftest.py puts the repository root on sys.path;
the benchmarks insert it themselves). sd: SD 1.5 InstructPix2Pix + the full-size architecture;
sdxl: SDXL InstructPix2Pix / CosXL; ldm: original-layout single-file writers. Other families
add their own module here (flux.py, qwen.py, …).
"""
