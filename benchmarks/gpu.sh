#!/usr/bin/env bash
# Every GPU figure in one run (target: under 8 minutes on one data-centre GPU), written to
# benchmarks/results/gpu-<date>.md and printed. Each part has its own time limit, so one slow
# part cannot eat the others' time; a part that hits it says so in the table.
#
#   ./benchmarks/gpu.sh            # from the repository root, with the project's .venv active
#
# Parts (full-size architectures, random weights — the real compute, no download):
#   1. InstructPix2Pix 512², 20 steps, fp16: plain diffusers vs the engine (3 rows, s_I = 1),
#      and the engine with torch.compile (warm-up reported on its own line), peak CUDA memory.
#   2. SDXL InstructPix2Pix 768², 30 steps, fp16: the same.
#   3. FLUX.1 Kontext and FLUX.2 klein at 1 MP, recommended steps, each quantization.
#   4. Qwen-Image-Edit at 1 MP, recommended steps.
#   5. Fine-tuning: s/step and peak memory per family, LoRA rank 16, 512 px.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to measure (the README's GPU tables stay 'not run')" >&2
  exit 2
fi
mkdir -p benchmarks/results
out="benchmarks/results/gpu-$(date -u +%Y-%m-%dT%H%M).md"
export TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error HF_HUB_OFFLINE=1
{
  echo "# GPU figures, $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
  python -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')"
  echo
} | tee "$out"

part() {  # part TITLE SECONDS COMMAND...
  local title=$1 limit=$2; shift 2
  echo "## $title" | tee -a "$out"
  local started=$SECONDS
  timeout --signal=INT "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tee -a "$out"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 130 ]; then
    echo "(stopped at its ${limit} s limit: figures above are partial)" | tee -a "$out"
  elif [ "$rc" != 0 ]; then
    echo "(failed with exit status $rc)" | tee -a "$out"
  fi
  echo "($((SECONDS - started)) s)" | tee -a "$out"; echo | tee -a "$out"
}

part "InstructPix2Pix, 512², 20 steps, fp16" 100 \
  python benchmarks/bench_engine.py --device cuda --family sd-ip2p --repeats 3 --compile default
part "SDXL InstructPix2Pix, 768², 30 steps, fp16" 110 \
  python benchmarks/bench_engine.py --device cuda --family sdxl-ip2p --repeats 2 --compile default
part "FLUX.1 Kontext and FLUX.2 klein, 1 MP" 120 \
  python benchmarks/bench_families_flux.py --device cuda
part "Qwen-Image-Edit, 1 MP" 90 \
  python benchmarks/bench_family_qwen.py --device cuda
if [ -f benchmarks/bench_finetune.py ]; then
  part "Fine-tuning, LoRA rank 16, 512 px" 60 python benchmarks/bench_finetune.py --device cuda
fi
echo "written to $out"
