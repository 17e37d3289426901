"""Choosing the device, the precision and the memory plan; freeing and reporting memory.

Memory plans, lightest VRAM use last:

- `full`: every component resident on the device (fastest).
- `offload-text`: the text encoders sit in CPU RAM and visit the device only to encode the
  instruction; the denoiser and the VAE stay resident (the DiT families' text encoders are
  4–8 B parameters: that room goes to the denoiser's activations at 1 MP).
- `model-offload`: diffusers' model CPU offload: one whole component on the device at a time.
- `sequential-offload`: diffusers' sequential offload: layer by layer (slowest, ~1–2 GB).

On a CPU (or MPS) every plan is `full`: there is nothing to offload to.
"""

from __future__ import annotations

import functools
import gc
import platform
from collections.abc import Mapping
from typing import Any

import torch

from engine.errors import InvalidInput

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEMORY_PLANS = ("full", "offload-text", "model-offload", "sequential-offload")
MEMORY_PLAN_CHOICES = ("auto", *MEMORY_PLANS)
# The older `--memory-saving` names, still accepted.
MEMORY_SAVING_ALIASES = {"auto": "auto", "off": "full", "slicing": "full", "offload": "model-offload"}
GIB = 1024**3
# Head room kept free above a plan's published need (CUDA context, fragmentation, the VAE at
# the largest working size).
VRAM_MARGIN_BYTES = int(0.75 * GIB)
# Working sizes above this many pixels decode with VAE tiling.
LARGE_WORKING_PIXELS = 1536 * 1536


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags in Linux's /proc/cpuinfo spelling (avx2, avx512_bf16,
    avx512_vnni, avx_vnni, amx_bf16 …). /proc/cpuinfo where there is one; elsewhere (Windows,
    macOS) PyTorch's cpuinfo-based report, whose names are mapped to the same spelling."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags") and ":" in line:
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        capabilities = torch.cpu.get_capabilities()  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return frozenset()
    renamed = {"avx512_f": "avx512f", "avx512_bw": "avx512bw", "amx_tile": "amx_tile"}
    return frozenset(renamed.get(name, name) for name, on in capabilities.items() if on is True)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU does bf16 matrix maths natively (AVX512-BF16 or AMX): ~4× over fp32."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_name() -> str:
    """The CPU's model name (for benchmark tables), with its fast-maths flags."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    flags = flags or set(cpu_flags())
    fast = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                            "avx_vnni", "amx_bf16"))
    return f"{name} ({', '.join(fast) or 'no AVX2'})"


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InvalidInput(f"device must be one of {', '.join(DEVICES)} or cuda:N (got {name!r})", "device")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(
            "device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu, or install "
            "a CUDA build of PyTorch",
            "device",
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise InvalidInput("device mps was asked for but is not available here; use --device cpu", "device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, preferred: torch.dtype | None = None) -> torch.dtype:
    """`auto`: `preferred` (a family's, e.g. bf16 for the DiT families) or fp16 on CUDA and MPS;
    on CPU bf16 where it is fast, else fp32."""
    if name == "auto":
        if device.type in ("cuda", "mps"):
            if preferred == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                return torch.float16
            return preferred or torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise InvalidInput(f"dtype must be auto, {', '.join(DTYPES)} (got {name!r})", "dtype")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise InvalidInput("fp16 is not supported on the CPU; use bf16 or fp32", "dtype")
    return dtype


def check_memory_plan(name: str | None) -> str:
    """A plan name (or `auto`), with the older `--memory-saving` names mapped; InvalidInput else."""
    if name is None:
        return "auto"
    name = MEMORY_SAVING_ALIASES.get(name, name)
    if name not in MEMORY_PLAN_CHOICES:
        raise InvalidInput(
            f"memory plan must be one of {', '.join(MEMORY_PLAN_CHOICES)} (got {name!r})", "memory_plan"
        )
    return name


def choose_memory_plan(
    vram_gb: Mapping[str, float] | None, free_bytes: int | None, device: torch.device | None = None
) -> str:
    """The fastest plan whose published need (GB, per plan) fits into `free_bytes` with margin.

    `vram_gb` is a catalogue entry's table (or `estimate_vram_gb`); a plan it does not list is
    skipped. Nothing fits → `sequential-offload`. A CPU/MPS device → `full`.
    """
    if device is not None and device.type != "cuda":
        return "full"
    if not vram_gb or free_bytes is None:
        return "full"
    for plan in MEMORY_PLANS:
        need = vram_gb.get(plan)
        if need is not None and need * GIB + VRAM_MARGIN_BYTES <= free_bytes:
            return plan
    return "sequential-offload"


def next_memory_plan(plan: str) -> str | None:
    """The next lighter plan on the out-of-memory ladder (None after sequential offload)."""
    index = MEMORY_PLANS.index(plan)
    return MEMORY_PLANS[index + 1] if index + 1 < len(MEMORY_PLANS) else None


def estimate_vram_gb(component_bytes: Mapping[str, int], text_encoders: tuple[str, ...],
                     activation_gb: float = 1.5) -> dict[str, float]:
    """A plan table for a model the catalogue does not know, from its components' sizes.

    Weights resident per plan plus `activation_gb` for the denoiser's activations at the
    family's default working size; rounded up to 0.1 GB.
    """
    total = sum(component_bytes.values()) / GIB
    text = sum(component_bytes.get(name, 0) for name in text_encoders) / GIB
    largest = max(component_bytes.values(), default=0) / GIB
    plans = {
        "full": total + activation_gb,
        "offload-text": max(total - text, text) + activation_gb,
        "model-offload": largest + activation_gb,
        "sequential-offload": activation_gb + 0.5,
    }
    return {plan: round(gb + 0.05, 1) for plan, gb in plans.items()}


def device_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(free, total) bytes of the device's memory; host RAM for the CPU; None where unknown."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    if device.type == "mps":
        try:
            total = int(torch.mps.recommended_max_memory())
            return total - int(torch.mps.driver_allocated_memory()), total
        except (AttributeError, RuntimeError):
            return None, None
    try:
        values = {}
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
        return values.get("MemAvailable"), values.get("MemTotal")
    except (OSError, ValueError, IndexError):
        return None, None


def memory_report(device: torch.device | str, plan: str | None = None,
                  quantization: str | None = None) -> dict[str, Any]:
    """What `/v1/health` shows per device: {device, plan, free_bytes, total_bytes, quantization}."""
    device = torch.device(device) if isinstance(device, str) else device
    free, total = device_memory(device)
    return {
        "device": str(device),
        "plan": plan,
        "free_bytes": free,
        "total_bytes": total,
        "quantization": quantization or "none",
    }


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA/MPS/host out-of-memory, or the engine's own OutOfMemory after its retries."""
    from engine.errors import OutOfMemory

    if isinstance(err, (torch.OutOfMemoryError, OutOfMemory, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage and give cached accelerator memory back (every accelerator when None).

    Best effort: never raises (it runs on error paths)."""
    gc.collect()
    try:
        kind = torch.device(device).type if device is not None else None
        if kind in (None, "cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if kind in (None, "mps") and torch.backends.mps.is_available():
            torch.mps.empty_cache()
    except Exception:  # freeing memory is best effort
        pass
