"""Choosing the device, the precision and the memory savers."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch

from engine.errors import InvalidInput

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEMORY_SAVING = ("auto", "off", "slicing", "offload")

# GPUs below this much memory run with model CPU offload (SD 1.5 in fp16 needs ~3.5 GiB).
SMALL_VRAM_BYTES = 6 * 1024**3
# Working sizes above this many pixels get VAE tiling and attention slicing.
LARGE_WORKING_PIXELS = 1024 * 1024


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU does bf16 matrix maths natively (AVX512-BF16 or AMX): ~4× over fp32."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA and MPS; on CPU bf16 where it is fast, else fp32."""
    if name == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise InvalidInput(f"dtype must be auto, {', '.join(DTYPES)} (got {name!r})", "dtype")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise InvalidInput("fp16 is not supported on the CPU; use bf16 or fp32", "dtype")
    return dtype


@dataclass(frozen=True)
class MemoryPlan:
    attention_slicing: bool
    vae_tiling: bool
    cpu_offload: bool


def plan_memory(mode: str, device: torch.device, working_pixels: int) -> MemoryPlan:
    """Which memory savers to switch on; `auto` decides from VRAM and the working size."""
    if mode not in MEMORY_SAVING:
        raise InvalidInput(f"memory_saving must be one of {', '.join(MEMORY_SAVING)}", "memory_saving")
    large = working_pixels > LARGE_WORKING_PIXELS
    if mode == "off":
        return MemoryPlan(False, False, False)
    if mode == "slicing":
        return MemoryPlan(True, True, False)
    if mode == "offload":
        return MemoryPlan(True, True, device.type == "cuda")
    small_vram = device.type == "cuda" and total_device_memory(device) < SMALL_VRAM_BYTES
    return MemoryPlan(attention_slicing=large or small_vram, vae_tiling=large, cpu_offload=small_vram)


def total_device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return 0


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA/MPS/host out-of-memory, or the engine's own OutOfMemory after its retries."""
    from engine.errors import OutOfMemory

    if isinstance(err, (torch.OutOfMemoryError, OutOfMemory, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
