#!/usr/bin/env bash
# Set up Instruct Edit on this machine and start it: a virtual environment with PyTorch for
# this machine's accelerator, the engine, the Krita plugin installed and enabled in the
# user's Krita profile, then the engine serving the default model (downloaded on first use).
# Usage: ./scripts/run.sh [instruct-edit serve arguments, e.g. --model DIR --port 7860]
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
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null || [ "$(uname -s)" = Darwin ]; then
    python -m pip install --quiet torch          # CUDA build on Linux/Windows, MPS on macOS
  else
    python -m pip install --quiet "torch==2.13.0" 2>/dev/null || python -m pip install --quiet torch \
      --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install --quiet -e .
if [ -f scripts/install_plugin.py ]; then
  python scripts/install_plugin.py
fi
exec instruct-edit serve "$@"
