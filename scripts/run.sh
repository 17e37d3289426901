#!/usr/bin/env bash
# Set up Instruct Edit on this machine and start it: a virtual environment with PyTorch for
# this machine's accelerator, the engine, the Krita plugin installed and enabled in the
# user's Krita profile, then the engine serving the default model (downloaded on first use).
# Usage: ./scripts/run.sh [instruct-edit serve arguments, e.g. --model DIR --port 7860]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
. scripts/venv.sh
install_torch auto
python -m pip install --quiet -e .
python scripts/install_plugin.py
# The painter's own engine on loopback: models picked in the docker download on first use.
exec instruct-edit serve --allow-downloads "$@"
