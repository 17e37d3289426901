"""OpenVINO for the InstructPix2Pix UNet and VAE on CPUs.

The engine keeps its own denoising loop (three-way guidance, schedulers, previews, cancel);
OpenVINO only runs the networks. Measured on a 2-core EPYC (benchmarks/bench_cpu_runtimes.py)
a whole edit is 1.8× faster than PyTorch in fp32 (what CPUs without native bf16 run) and 1.3×
faster than PyTorch in bf16, and it holds up much better when the cores are busy.

Each network is converted once with dynamic batch and spatial sizes (one export serves every
working size), saved as OpenVINO IR under the cache folder keyed by a fingerprint of the
weights (config, tensor shapes, sums and samples of the values, active LoRAs), and compiled
with OpenVINO's own compiled-blob cache. A changed model or LoRA gets a new fingerprint, hence
a new export; stale exports are removed past a count.

`--runtime openvino-int8` also quantizes the UNet (weights and activations, NNCF post-training
quantization) after recording the engine's own denoising of a few drawn pictures
(engine/runtimes/calibration.py). Where the CPU has VNNI (AVX512-VNNI or AVX-VNNI: Ice Lake,
Alder Lake, Zen 4 and later) its UNet step is ~3× faster than f32; on plain AVX2 only ~1.35×.
A held-out picture checks the result: above `MAX_INT8_RELATIVE_ERROR` the float UNet is kept.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("instruct_edit.openvino")

# Export folders kept on disk (one per network's weights: a UNet's is ~1.7 GB in fp16 IR, a
# VAE's ~0.2 GB), least recently used removed first.
KEEP_EXPORTS = 6
# Compiled networks kept in memory (a LoRA switch back and forth should not recompile).
KEEP_COMPILED = 2
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# The int8 UNet is used only if its output on a held-out picture's steps stays this close to the
# float UNet's (mean |int8 − float| / mean |float|). The full-size architecture with random
# weights measures 0.045–0.048 (benchmarks/README.md); a real model that quantizes badly is kept
# in float rather than giving visibly worse edits.
MAX_INT8_RELATIVE_ERROR = 0.10
# NNCF holds the network about this many times over in f32 while it calibrates: 12.8 GiB peak
# for the 859.5 M-parameter SD-1.5 UNet (3.4 GB in f32), measured with bias correction off.
INT8_CALIBRATION_MEMORY_FACTOR = 3.8
INT8_RETRY_S = 600.0  # without the memory to calibrate: float UNet, and another try this much later


def available_memory() -> int | None:
    """Bytes of RAM the system can give without swapping (None: unknown)."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def default_cache_dir() -> Path:
    explicit = os.environ.get("INSTRUCT_EDIT_CACHE")
    if explicit:
        return Path(explicit).expanduser() / "openvino"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "instruct-edit" / "openvino"


def cpu_precision(dtype: torch.dtype) -> str:
    """OpenVINO's inference precision for the engine's dtype on this CPU: bf16 only where the
    CPU has it natively (else OpenVINO would emulate it slowly), fp16 is not a CPU format."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if dtype in (torch.bfloat16, torch.float16) and "BF16" in capabilities:
        return "bf16"
    return "f32"


# ------------------------------------------------------------------------------ fingerprint


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest that changes when the weights change: the config, every tensor's name and
    shape, its sum and a strided sample of its values. Cheap (~0.3 s for an SD UNet) and
    sensitive to LoRA merges and fine-tunes, which change whole matrices."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        # diffusers' `_use_default_values` is a list made from a set: its order follows the
        # process's string hash seed, so it would change the digest (and miss the export
        # cache) on every start. It names defaults only; the values themselves are hashed.
        settings = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if flat.numel() == 0 or not flat.is_floating_point():
            continue
        stride = max(1, flat.numel() // 64)
        sample = flat[::stride][:64].float().cpu().numpy()
        digest.update(sample.tobytes())
        digest.update(np.float64(flat.float().sum().item()).tobytes())
    return digest.hexdigest()[:24]


# ------------------------------------------------------------------------------ export


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]


class _EncoderGraph(torch.nn.Module):
    """Image → the posterior's mode (what InstructPix2Pix conditions on)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mode()


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


@dataclass(frozen=True)
class _GraphSpec:
    name: str
    build: Callable[[Any], torch.nn.Module]
    example: Callable[[Any], tuple[torch.Tensor, ...]]
    shapes: Callable[[Any], list[list[int]]]  # -1 = dynamic


def _unet_example(pipe: Any) -> tuple[torch.Tensor, ...]:
    unet = pipe.unet
    channels = unet.config.in_channels
    width = unet.config.cross_attention_dim
    return (
        torch.randn(2, channels, 16, 16),
        torch.tensor([500.0, 500.0]),
        torch.randn(2, 77, width),
    )


GRAPHS = {
    "unet": _GraphSpec(
        "unet",
        lambda pipe: _UNetGraph(pipe.unet),
        _unet_example,
        lambda pipe: [
            [-1, pipe.unet.config.in_channels, -1, -1],
            [-1],
            [-1, -1, pipe.unet.config.cross_attention_dim],
        ],
    ),
    "vae_encoder": _GraphSpec(
        "vae_encoder",
        lambda pipe: _EncoderGraph(pipe.vae),
        lambda pipe: (torch.randn(1, 3, 64, 64),),
        lambda pipe: [[-1, 3, -1, -1]],
    ),
    "vae_decoder": _GraphSpec(
        "vae_decoder",
        lambda pipe: _DecoderGraph(pipe.vae),
        lambda pipe: (torch.randn(1, pipe.vae.config.latent_channels, 8, 8),),
        lambda pipe: [[-1, pipe.vae.config.latent_channels, -1, -1]],
    ),
}
# Which module's weights a graph depends on (its fingerprint's source).
GRAPH_MODULE = {"unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}


def _export(pipe: Any, spec: _GraphSpec, target: Path) -> None:
    """Convert one network to OpenVINO IR at `target` (written to a temporary folder first, so
    an interrupted export never leaves a half file that looks complete)."""
    import openvino as ov

    module = spec.build(pipe)
    source = getattr(pipe, GRAPH_MODULE[spec.name])
    original = (source.dtype, source.device)
    # Trace in fp32 on the CPU: OpenVINO chooses its own precision at compile time.
    source.to(device="cpu", dtype=torch.float32)
    try:
        # The tracer's warnings are about shape checks it freezes (asserts on channel counts,
        # a >= 64 batch branch): none of them changes the graph for the shapes the engine uses.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(
                module.eval(),
                example_input=spec.example(pipe),
                input=[ov.PartialShape(shape) for shape in spec.shapes(pipe)],
            )
    finally:
        source.to(device=original[1], dtype=original[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        # fp16 storage halves the disk use; the weights are widened again at compile time and
        # the difference stays far below the runtime's own precision (see the quality test).
        ov.save_model(model, scratch / target.name, compress_to_fp16=True)
        for produced in scratch.iterdir():
            os.replace(produced, target.parent / produced.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------ runtime


class OpenVINONetwork:
    """A compiled network called like the torch module it replaces (tensors in, tensors out)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self._requests = threading.local()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        arrays = [np.ascontiguousarray(t.detach().float().cpu().numpy()) for t in inputs]
        result = request.infer(arrays)
        # Copy: the request reuses its output buffer on the next call.
        return torch.from_numpy(np.array(result[0], copy=True))


class UNetOnOpenVINO:
    """Duck-types the calls the InstructPix2Pix loop makes on `pipe.unet`."""

    def __init__(self, network: OpenVINONetwork, unet: Any) -> None:
        self.network = network
        self.config = unet.config
        self.dtype = unet.dtype

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = False,
        **unused: Any,
    ) -> tuple[torch.Tensor]:
        if unused.get("added_cond_kwargs"):
            raise NotImplementedError("the OpenVINO UNet graph takes no added conditions (SDXL)")
        steps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        out = self.network(sample, steps, encoder_hidden_states)
        return (out.to(device=sample.device, dtype=sample.dtype),)


class _Posterior:
    def __init__(self, mode: torch.Tensor) -> None:
        self._mode = mode

    def mode(self) -> torch.Tensor:
        return self._mode


class _Encoded:
    def __init__(self, mode: torch.Tensor) -> None:
        self.latent_dist = _Posterior(mode)


class VaeOnOpenVINO:
    """Duck-types `vae.encode(x).latent_dist.mode()` and `vae.decode(z, return_dict=False)[0]`."""

    def __init__(self, encoder: OpenVINONetwork, decoder: OpenVINONetwork, vae: Any) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.config = vae.config
        self.dtype = vae.dtype

    def encode(self, image: torch.Tensor) -> _Encoded:
        return _Encoded(self.encoder(image).to(device=image.device, dtype=image.dtype))

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (self.decoder(latents).to(device=latents.device, dtype=latents.dtype),)


class UNetRecorder:
    """Calls the float UNet and keeps what went in and came out: the int8 calibration data and
    the reference it is checked against."""

    def __init__(self, unet: UNetOnOpenVINO) -> None:
        self.unet = unet
        self.config = unet.config
        self.dtype = unet.dtype
        self.calls: list[tuple[list[np.ndarray], np.ndarray]] = []

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = False,
        **unused: Any,
    ) -> tuple[torch.Tensor]:
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **unused)
        steps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        inputs = [
            t.detach().float().cpu().numpy().copy() for t in (sample, steps, encoder_hidden_states)
        ]
        self.calls.append((inputs, out[0].float().cpu().numpy().copy()))
        return out


@dataclass
class Accelerated:
    """The networks of one set of weights, compiled for this CPU."""

    key: str
    unet: UNetOnOpenVINO | UNetRecorder
    vae: VaeOnOpenVINO
    # int8 runtime: the UNet's measured relative error on held-out steps (None: float UNet)
    int8_error: float | None = None
    # int8 runtime, float UNet for now (too little free memory to calibrate): when to try again
    retry_after: float | None = None


# Runs calibration picture `index` through the pipeline's own denoising with these networks.
Calibrate = Callable[[Accelerated, int], None]


class OpenVINORuntime:
    """Exports, caches and compiles the UNet and VAE of an InstructPix2Pix pipeline."""

    def __init__(
        self,
        precision: str,
        *,
        int8_unet: bool = False,
        cache_dir: Path | None = None,
        threads: int | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.precision = precision  # of the float networks (and of the int8 UNet's float parts)
        self.int8_unet = int8_unet
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.threads = threads or torch.get_num_threads()
        self.report = report or log.info
        self._compiled: OrderedDict[str, Accelerated] = OrderedDict()
        # Told, in a painter's words, what a long first use is doing (the edit's progress note).
        self._listener: Callable[[str], None] | None = None
        self._base_prints: dict[int, tuple[torch.nn.Module, str]] = {}
        self._lock = threading.Lock()

    def _fingerprint(self, pipe: Any, module_name: str, extra: str) -> str:
        module = getattr(pipe, module_name)
        # The base weights never change while loaded (LoRAs are named in `extra`): hash once
        # per module object.
        known = self._base_prints.get(id(module))
        if known is None or known[0] is not module:
            # The module is kept with its print, so its id cannot be reused by another one.
            known = self._base_prints[id(module)] = (module, weights_fingerprint(module))
        return hashlib.sha256(f"{known[1]}|{extra}".encode()).hexdigest()[:24]

    def accelerate(
        self,
        pipe: Any,
        loras: str = "",
        calibrate: Calibrate | None = None,
        listener: Callable[[str], None] | None = None,
    ) -> Accelerated:
        """The compiled networks for the pipeline's current weights (`loras` names the active
        adapters and strengths, which change the UNet's effective weights). The int8 runtime
        needs `calibrate` the first time it meets a set of weights. `listener` hears what a
        long first use is doing."""
        with self._lock:
            self._listener = listener
            try:
                return self._accelerate(pipe, loras, calibrate)
            finally:
                self._listener = None

    def _note(self, text: str) -> None:
        if self._listener is not None:
            self._listener(text)

    def _accelerate(self, pipe: Any, loras: str, calibrate: Calibrate | None) -> Accelerated:
        unet_key = self._fingerprint(pipe, "unet", loras)
        vae_key = self._fingerprint(pipe, "vae", "")
        key = f"{unet_key}-{vae_key}-{self.precision}" + ("-int8" if self.int8_unet else "")
        found = self._compiled.get(key)
        if found is not None and (
            found.retry_after is None or time.monotonic() < found.retry_after
        ):
            self._compiled.move_to_end(key)
            return found
        if found is not None:
            del self._compiled[key], found  # try int8 again: its memory may be free now
        vae = VaeOnOpenVINO(
            self._network(pipe, "vae_encoder", vae_key),
            self._network(pipe, "vae_decoder", vae_key),
            pipe.vae,
        )
        if self.int8_unet:
            accelerated = self._with_int8_unet(pipe, key, unet_key, vae, calibrate)
        else:
            accelerated = Accelerated(
                key, UNetOnOpenVINO(self._network(pipe, "unet", unet_key), pipe.unet), vae
            )
        self._prune(keep={self.cache_dir / unet_key, self.cache_dir / vae_key})
        self._compiled[key] = accelerated
        while len(self._compiled) > KEEP_COMPILED:
            self._compiled.popitem(last=False)
        return accelerated

    def _network(self, pipe: Any, name: str, fingerprint: str) -> OpenVINONetwork:
        return self._compile(self._exported(pipe, name, fingerprint))

    def _exported(self, pipe: Any, name: str, fingerprint: str) -> Path:
        """The IR of network `name` for these weights, converted on first use."""
        folder = self.cache_dir / fingerprint
        path = folder / f"{name}.xml"
        if not (path.is_file() and path.with_suffix(".bin").is_file()):
            started = time.perf_counter()
            self._note("Converting the model for this CPU (first use only, about a minute)…")
            self.report(
                f"OpenVINO: converting the {name.replace('_', ' ')} for this model "
                "(first use only; cached in " + str(self.cache_dir) + ")"
            )
            _export(pipe, GRAPHS[name], path)
            self.report(
                f"OpenVINO: {name.replace('_', ' ')} converted in "
                f"{time.perf_counter() - started:.0f} s"
            )
        else:
            os.utime(folder)  # most recently used: pruned last
        return path

    def _compile(self, path: Path) -> OpenVINONetwork:
        config = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "INFERENCE_NUM_THREADS": self.threads,
            "CACHE_DIR": str(self.cache_dir / "compiled"),
        }
        return OpenVINONetwork(self.core.compile_model(str(path), "CPU", config))

    # -------------------------------------------------------------------------- int8 UNet

    def _with_int8_unet(
        self,
        pipe: Any,
        key: str,
        fingerprint: str,
        vae: VaeOnOpenVINO,
        calibrate: Calibrate | None,
    ) -> Accelerated:
        """The networks with the int8 UNet (quantized on first use) if it passed its check,
        else with the float one. Only one UNet is compiled at a time: each holds its own copy
        of the weights (3.4 GB in f32)."""
        source = self._exported(pipe, "unet", fingerprint)
        path, verdict = source.with_name("unet_int8.xml"), source.with_name("unet_int8.json")
        if not (path.is_file() and path.with_suffix(".bin").is_file() and verdict.is_file()):
            if calibrate is None:
                raise RuntimeError("the int8 UNet has to be calibrated: pass `calibrate`")
            # fp16 storage: the f32 network is twice the file.
            needed = 2 * source.with_suffix(".bin").stat().st_size * INT8_CALIBRATION_MEMORY_FACTOR
            free = available_memory()
            if free is not None and free < needed:
                # Not now: nothing is written, so a later edit with more memory free tries again.
                gib = f"{needed / 2**30:.0f} GB"
                self._note(
                    f"Not enough free memory to calibrate int8 (needs about {gib}): "
                    "using the float model for now…"
                )
                self.report(
                    f"OpenVINO: calibrating the int8 UNet needs about {gib} of free memory, "
                    f"{free / 2**30:.1f} GB are free: using the float UNet this time (close other "
                    "programs, or use --runtime openvino)"
                )
                unet = UNetOnOpenVINO(self._compile(source), pipe.unet)
                return Accelerated(key, unet, vae, retry_after=time.monotonic() + INT8_RETRY_S)
            self._quantize_unet(pipe, source, path, verdict, vae, calibrate)
        error = float(json.loads(verdict.read_text(encoding="utf-8"))["relative_error"])
        if error > MAX_INT8_RELATIVE_ERROR:
            self.report(
                f"OpenVINO: this model's int8 UNet changed the UNet's output by {error:.1%} on "
                f"held-out steps (more than {MAX_INT8_RELATIVE_ERROR:.0%}): keeping the float UNet"
            )
            return Accelerated(key, UNetOnOpenVINO(self._compile(source), pipe.unet), vae)
        unet = UNetOnOpenVINO(self._compile(path), pipe.unet)
        return Accelerated(key, unet, vae, int8_error=error)

    def _quantize_unet(
        self,
        pipe: Any,
        source: Path,
        target: Path,
        verdict: Path,
        vae: VaeOnOpenVINO,
        calibrate: Calibrate,
    ) -> None:
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )

        from engine.runtimes.calibration import CALIBRATION_PICTURES

        started = time.perf_counter()
        self.report(
            "OpenVINO: quantizing the UNet to int8 for this model (first use only): recording "
            f"{CALIBRATION_PICTURES} short edits of drawn pictures, then calibrating"
        )
        recorder = UNetRecorder(UNetOnOpenVINO(self._compile(source), pipe.unet))
        recording = Accelerated("calibration", recorder, vae)
        per_picture = []
        for index in range(CALIBRATION_PICTURES):
            self._note(
                "Calibrating int8 for this model (first use only): "
                f"test edit {index + 1} of {CALIBRATION_PICTURES}…"
            )
            recorder.calls = []
            calibrate(recording, index)
            per_picture.append(recorder.calls)
        calibration = [inputs for calls in per_picture[:-1] for inputs, _ in calls]
        held_out = per_picture[-1]
        del recorder, recording  # the float UNet's weights go before NNCF makes its own copies
        gc.collect()
        self._note("Quantizing the model to int8 (first use only, a minute or two)…")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = nncf.quantize(
                self.core.read_model(str(source)),
                nncf.Dataset(calibration),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(calibration),
                # Seven-bit weights: without VNNI (plain AVX2) the CPU's int8 dot product
                # saturates on full-range weights (relative error 18 % instead of 5 %, measured).
                advanced_parameters=AdvancedQuantizationParameters(
                    overflow_fix=nncf.OverflowFix.ENABLE,
                    # Bias correction: no better (4.79 % either way on the full-size UNet),
                    # 1.6× slower and 0.8 GB more memory, measured.
                    disable_bias_correction=True,
                    smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
                ),
            )
        # The check: the int8 UNet against the float one on the steps of a picture it was not
        # calibrated on.
        compiled = self.core.compile_model(
            quantized,
            "CPU",
            {"INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": self.threads},
        )
        request = compiled.create_infer_request()
        changed = total = 0.0
        for inputs, reference in held_out:
            out = np.asarray(request.infer(inputs)[0], dtype=np.float32)
            changed += float(np.abs(out - reference).mean())
            total += float(np.abs(reference).mean())
        error = changed / max(total, 1e-12)
        scratch = Path(tempfile.mkdtemp(prefix=".int8-", dir=target.parent))
        try:
            ov.save_model(quantized, scratch / target.name)
            (scratch / verdict.name).write_text(
                json.dumps(
                    {
                        "relative_error": error,
                        "calibration_calls": len(calibration),
                        "held_out_calls": len(held_out),
                    }
                ),
                encoding="utf-8",
            )
            # The verdict last: its presence says the export is complete.
            for name in (target.name, target.with_suffix(".bin").name, verdict.name):
                os.replace(scratch / name, target.parent / name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.report(
            f"OpenVINO: UNet quantized to int8 in {time.perf_counter() - started:.0f} s "
            f"(held-out steps changed by {error:.1%})"
        )

    def _prune(self, keep: set[Path]) -> None:
        exports = [
            p
            for p in self.cache_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name != "compiled"
        ]
        exports.sort(key=lambda p: p.stat().st_mtime)
        for stale in exports[:-KEEP_EXPORTS]:
            if stale not in keep:
                shutil.rmtree(stale, ignore_errors=True)
