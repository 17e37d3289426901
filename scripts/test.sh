#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch) and run the whole test suite.
# Usage: ./scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
. scripts/venv.sh
install_torch cpu
python -m pip install --quiet -e ".[dev]"

ruff check .
export QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1
# The plugin's tests rerun themselves under PyQt5 (Krita 5) besides PyQt6 (Krita 6).
python -m pytest -q "$@"
