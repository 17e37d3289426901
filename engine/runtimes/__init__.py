"""Which runtime runs a family's networks: PyTorch (every device) or OpenVINO (CPUs).

`auto` picks OpenVINO on a CPU for families that support it when the package is installed
(faster than PyTorch's CPU kernels: 1.3× against bf16, 1.8× against fp32 in
benchmarks/bench_cpu_runtimes.py),
else PyTorch. The engine's own loop, guidance and scheduler run unchanged either way.
"""

from __future__ import annotations

import torch

from engine.errors import InvalidInput

RUNTIMES = ("auto", "torch", "openvino", "openvino-int8")
# Families whose networks have OpenVINO graphs (engine/runtimes/openvino.py).
OPENVINO_FAMILIES = ("sd-ip2p",)


def resolve_runtime(
    requested: str, device: torch.device, family_id: str, *, quantization: str | None = None
) -> str:
    """`torch`, `openvino` or `openvino-int8` for this device and family; an explicit choice
    that cannot work is an error naming the reason. `auto` never picks int8: it changes the
    result more than the float runtimes do (see engine/runtimes/openvino.py)."""
    from engine.runtimes.openvino import nncf_available, openvino_available

    if requested not in RUNTIMES:
        raise InvalidInput(f"runtime {requested!r} is not one of {', '.join(RUNTIMES)}", "runtime")
    if requested == "torch":
        return "torch"
    reasons = []
    if device.type != "cpu":
        reasons.append(f"OpenVINO runs here on the CPU only (the device is {device.type})")
    if family_id not in OPENVINO_FAMILIES:
        reasons.append(f"the {family_id} family has no OpenVINO graphs yet")
    if quantization:
        reasons.append(f"quantization {quantization} applies to PyTorch weights")
    if not openvino_available():
        reasons.append("the openvino package is not installed (pip install openvino)")
    if requested == "openvino-int8" and not nncf_available():
        reasons.append("int8 needs the nncf package (pip install 'instruct-edit[cpu-int8]')")
    if not reasons:
        return "openvino" if requested == "auto" else requested
    if requested != "auto":
        raise InvalidInput(
            f"--runtime {requested} cannot be used: " + "; ".join(reasons), "runtime"
        )
    return "torch"
