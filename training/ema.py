"""EMA of the trained weights, with the paper's warm-up."""

from __future__ import annotations

from typing import Any

import torch


class EMA:
    """Exponential moving average with the paper's warm-up: decay_n = min(d, (1+n)/(10+n)).

    n counts the updates (optimiser steps) so far, including this one. Written out rather
    than diffusers' EMAModel, whose warm-up is off by one step from the paper's.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in parameters]
        self._backup: list[torch.Tensor] | None = None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, parameters: list[torch.nn.Parameter]) -> None:
        self.updates += 1
        decay = self.current_decay()
        for shadow, param in zip(self.shadow, parameters, strict=True):
            shadow.lerp_(param.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def swap_into(self, parameters: list[torch.nn.Parameter]) -> None:
        """Put the EMA weights into the model (keeping the live ones for `restore`)."""
        self._backup = [p.detach().clone() for p in parameters]
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow.to(param.dtype))

    @torch.no_grad()
    def restore(self, parameters: list[torch.nn.Parameter]) -> None:
        assert self._backup is not None
        for saved, param in zip(self._backup, parameters, strict=True):
            param.copy_(saved)
        self._backup = None

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a saved EMA onto the device the current shadows live on.

        accelerate loads custom checkpoint state with map_location="cpu": taken as it comes,
        the shadows of a GPU run would stay on the CPU and the first `update` after `--resume`
        would fail with a device mismatch.
        """
        saved = list(state["shadow"])
        if len(saved) != len(self.shadow) or any(
            s.shape != t.shape for s, t in zip(saved, self.shadow, strict=False)
        ):
            raise ValueError(
                f"the checkpoint's EMA holds {len(saved)} tensors that do not match the "
                f"{len(self.shadow)} trained parameters of this run; resume with the same model "
                "and LoRA settings"
            )
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.shadow = [
            s.to(device=t.device, dtype=torch.float32)
            for s, t in zip(saved, self.shadow, strict=True)
        ]
