#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch) and run the whole test suite.
# Usage: ./scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# The CPU wheel first, so the project's `torch>=…` range is already met and pip never
# swaps in a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0" 2>/dev/null || python -m pip install --quiet torch \
  --index-url https://download.pytorch.org/whl/cpu
python -m pip install --quiet -e ".[dev]"

ruff check .
export QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1
# The plugin's tests rerun themselves under PyQt5 (Krita 5) besides PyQt6 (Krita 6).
python -m pytest -q "$@"
