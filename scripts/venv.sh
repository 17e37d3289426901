# Sourced by run.sh and test.sh: create (once) and activate the project's virtual environment,
# then install PyTorch: `install_torch cpu` takes the CPU wheel, `install_torch auto` the
# build for this machine's accelerator. The CPU wheel goes in first so the project's
# `torch>=…` range is already met and pip never swaps in a multi-GB CUDA build.
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip

install_torch() {
  if python -c "import torch" 2>/dev/null; then
    return
  fi
  if [ "$1" = auto ] && { command -v nvidia-smi >/dev/null || [ "$(uname -s)" = Darwin ]; }; then
    python -m pip install --quiet torch    # CUDA build on Linux/Windows, MPS on macOS
  else
    python -m pip install --quiet "torch==2.13.0" 2>/dev/null || python -m pip install --quiet torch \
      --index-url https://download.pytorch.org/whl/cpu
  fi
}
