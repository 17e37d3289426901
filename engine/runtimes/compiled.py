"""torch.compile for the InstructPix2Pix UNet on GPUs, without recompiles per working size.

A compiled UNet specialises on shapes; painters change the working size all the time
(selections, layers of every size) and the variant count. It is compiled with dynamic
shapes (batch, height, width), so one graph serves every size the engine makes (the guards dynamo
keeps are the UNet's own divisibility, which the family's working-size multiple always meets):
one warm-up per model, not one per size. Modes: `default` (inductor), `max-autotune` (slower
warm-up, faster kernels), `reduce-overhead` (CUDA graphs: pays at small working sizes where
kernel launches dominate; CUDA graphs are recorded per shape).

benchmarks/gpu.sh reports the warm-up separately. It runs on a CPU as well (the tests count
compilations with a recording backend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("instruct_edit.compiled")

COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")


class CompiledUNet:
    """The compiled UNet, called as the loop calls `pipe.unet`."""

    def __init__(self, unet: Any, compiled: Any) -> None:
        self.unet = unet
        self.compiled = compiled
        self.config = unet.config
        self.dtype = unet.dtype

    def __call__(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        # Without these marks dynamo still specialises on each new size (the UNet branches on
        # its input's shape); `maybe_`: a size the UNet needs static stays static, no error.
        for dim in (0, 2, 3):
            torch._dynamo.maybe_mark_dynamic(sample, dim)
        return self.compiled(sample, timestep, **kwargs)


@dataclass
class Compiled:
    key: str
    unet: CompiledUNet
    vae: Any


class CompiledRuntime:
    """One compiled UNet per loaded model (LoRA changes recompile: their weights are part of
    the graph's guards)."""

    def __init__(self, mode: str, family_id: str, backend: Any = "inductor") -> None:
        from engine.errors import InvalidInput

        if mode not in COMPILE_MODES or mode == "off":
            raise InvalidInput(
                f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES[1:])}", "compile"
            )
        if family_id not in ("sd-ip2p", "sdxl-ip2p"):
            raise InvalidInput(
                f"--compile is offered for the InstructPix2Pix families, not {family_id}", "compile"
            )
        self.mode = mode
        self.backend = backend
        self._compiled: Compiled | None = None

    def accelerate(
        self, pipe: Any, loras: str = "", calibrate: Any = None, listener: Any = None
    ) -> Compiled:
        if self._compiled is None or self._compiled.unet.unet is not pipe.unet:
            options: dict[str, Any] = {"backend": self.backend, "dynamic": True}
            if self.backend == "inductor" and self.mode != "default":
                options["mode"] = self.mode
            log.info("compiling the UNet (%s); the first edit of each size bucket waits", self.mode)
            compiled = torch.compile(pipe.unet, **options)
            self._compiled = Compiled(self.mode, CompiledUNet(pipe.unet, compiled), pipe.vae)
        return self._compiled
