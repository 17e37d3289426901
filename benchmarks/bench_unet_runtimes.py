"""CPU runtimes for one InstructPix2Pix UNet call, compared by measurement (issue 13).

One UNet call is the cost of one denoising step: the full-size architecture (859.5 M
parameters, 8 input channels) with random weights, inputs sample (rows, 8, px/8, px/8),
timestep (rows,), text (rows, 77, 768); rows 3 = the three guidance branches (--rows 2: the
s_I = 1 path). Contenders (pick with --contenders a,b,c; a missing package prints
"not installed"):

    torch-fp32, torch-bf16                 eager PyTorch (fp32 is the quality reference)
    inductor-fp32, inductor-bf16           torch.compile (inductor; freezing and channels-last
                                           per --inductor-freezing / --channels-last)
    torchao-int8[-inductor]                torchao int8 dynamic activation + int8 weight
    torchao-int8wo[-inductor]              torchao int8 weight-only (Linear layers only: the
                                           convolutions stay fp32), eager and compiled
    ort-fp32, ort-int8                     ONNX Runtime CPU EP (int8: quantize_dynamic, MatMul)
    openvino-f32, openvino-bf16            OpenVINO, the engine's own export
    openvino-int8, openvino-int8-bf16      NNCF int8 (rest of the graph f32 / bf16)

Contenders are run in groups (torch, inductor, torchao-int8, torchao-int8wo, onnxruntime,
openvino), each in its own process so that one group's copies of the weights never share the
24 GiB with another's (one torchao group of 16 GiB saw eager PyTorch 5x slower in 2 of 3 runs);
torch-fp32 runs alternating with every group and each ratio is to the torch-fp32 median of the
same group (machine noise is 20-100 % between runs). Exports (ONNX, OpenVINO IR, the int8
models) are cached under --cache-dir (default $TMPDIR/ie-unet-runtimes) and reused.

    flock /tmp/team/heavy.lock python benchmarks/bench_unet_runtimes.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/bench_unet_runtimes.py      # an AVX2-only CPU emulated (labelled so)
    python benchmarks/bench_unet_runtimes.py --contenders torch-fp32,openvino-f32 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternate, print_table, rss_bytes

from engine.devices import cpu_name

# contender → the group (one process) it runs in; the order is the table's.
CONTENDERS: dict[str, str] = {
    "torch-fp32": "torch",
    "torch-bf16": "torch",
    "inductor-fp32": "inductor",
    "inductor-bf16": "inductor",
    "torchao-int8": "torchao-int8",
    "torchao-int8-inductor": "torchao-int8",
    "torchao-int8wo": "torchao-int8wo",
    "torchao-int8wo-inductor": "torchao-int8wo",
    "ort-fp32": "onnxruntime",
    "ort-int8": "onnxruntime",
    "openvino-f32": "openvino",
    "openvino-bf16": "openvino",
    "openvino-int8": "openvino",
    "openvino-int8-bf16": "openvino",
}
REFERENCE = "torch-fp32"
# Contenders compared with each other for the "fastest" lines (same number format class).
PRECISION_CLASSES = {
    "fp32": ["torch-fp32", "inductor-fp32", "ort-fp32", "openvino-f32"],
    "bf16": ["torch-bf16", "inductor-bf16", "openvino-bf16"],
    "int8": [n for n in CONTENDERS if "int8" in n],
}
# The packages each group needs (a missing one is reported, not raised).
GROUP_PACKAGES = {
    "torch": [],
    "inductor": [],
    "torchao-int8": ["torchao"],
    "torchao-int8wo": ["torchao"],
    "onnxruntime": ["onnxruntime", "onnx", "onnxscript"],
    "openvino": ["openvino", "nncf"],
}
# ISAs below which oneDNN has no native bf16 (ONEDNN_MAX_CPU_ISA values).
NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
GIB = 2**30


class NotInstalled(Exception):
    """A contender's package is missing: reported in the table, never a crash."""


def _missing(packages: list[str]) -> list[str]:
    import importlib.util

    return [p for p in packages if importlib.util.find_spec(p) is None]


def native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) with the ISA cap in force."""
    flags: set[str] = set()
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    have = sorted(flags & {"avx512_bf16", "amx_bf16"})
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if not have:
        return False, "no native bf16 (no avx512_bf16/amx_bf16): bf16 is emulated"
    if cap in NO_BF16_ISAS:
        return False, f"bf16 capped off by ONEDNN_MAX_CPU_ISA={cap}: emulated"
    return True, f"native bf16 ({', '.join(have)})"


def ort_cap_note() -> str:
    """ONNX Runtime's own CPU kernels (MLAS) choose their ISA from CPUID and read none of the
    oneDNN/ATen/MKL caps: under an emulated AVX2 CPU its figures are still this CPU's (measured:
    its time and int8 error stay as uncapped while every oneDNN-based contender's change)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY"):
        return "; NOT CAPPED: MLAS ignores the ISA cap"
    return ""


def release_memory() -> None:
    """Give freed weights back to the OS, so the next contender's RSS is its own."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ------------------------------------------------------------------------------ contenders


class Bench:
    """The shared state of one group: the fp32 pipeline, the inputs and the caches."""

    def __init__(self, args: argparse.Namespace) -> None:
        from engine.runtimes.openvino import GRAPHS, weights_fingerprint

        if args.tiny:
            from tests.tiny_models.sd import build_tiny_pipeline as build
        else:
            from tests.tiny_models.sd import build_full_size_pipeline as build
        self.args = args
        self.threads = torch.get_num_threads()
        self.pipe = build(seed=0)
        # Only the UNet is measured: the VAE and text encoder would only take memory.
        self.pipe.vae = self.pipe.text_encoder = None
        self.spec = GRAPHS["unet"]
        self.graph = self.spec.build(self.pipe).eval()
        self.fingerprint = weights_fingerprint(self.pipe.unet)
        self.cache = Path(args.cache_dir)
        config = self.pipe.unet.config
        generator = torch.Generator().manual_seed(0)
        rows, side = args.rows, args.resolution // 8
        self.inputs = (
            torch.randn(rows, config.in_channels, side, side, generator=generator),
            torch.full((rows,), 500.0),
            torch.randn(rows, 77, config.cross_attention_dim, generator=generator),
        )

    def shape_key(self) -> str:
        return f"{self.args.rows}x{self.args.resolution}"

    def build(self, name: str) -> tuple[Callable[[], torch.Tensor], str]:
        """The contender's call (returns the fp32 output) and a note for the table."""
        builder = getattr(self, "_" + name.replace("-", "_"))
        return builder()

    # -------------------------------------------------------------- PyTorch

    def _torch_fp32(self) -> tuple[Callable[[], torch.Tensor], str]:
        return self._torch_call(self.graph, torch.float32), "eager"

    def _torch_bf16(self) -> tuple[Callable[[], torch.Tensor], str]:
        model = copy.deepcopy(self.graph).to(torch.bfloat16)
        return self._torch_call(model, torch.bfloat16), native_bf16()[1]

    def _torch_call(
        self, model: Callable[..., torch.Tensor], dtype: torch.dtype
    ) -> Callable[[], torch.Tensor]:
        inputs = tuple(t.to(dtype) for t in self.inputs)

        def call() -> torch.Tensor:
            with torch.no_grad():
                return model(*inputs).float()

        return call

    def _compiled(self, model: torch.nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        """torch.compile (inductor) with the chosen freezing and memory format. Compilation
        happens on the first call, under the config patch (freezing is read at compile time)."""
        import torch._inductor.config as inductor_config

        inputs = tuple(t.to(dtype) for t in self.inputs)
        if self.args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = (inputs[0].to(memory_format=torch.channels_last), *inputs[1:])
        compiled = torch.compile(model, dynamic=False)
        freezing = self.args.inductor_freezing == "on"

        def call() -> torch.Tensor:
            with torch.no_grad(), inductor_config.patch(freezing=freezing):
                return compiled(*inputs).float()

        return call

    def _inductor_note(self) -> str:
        return f"freezing {self.args.inductor_freezing}, " + (
            "channels-last" if self.args.channels_last else "contiguous"
        )

    def _inductor_fp32(self) -> tuple[Callable[[], torch.Tensor], str]:
        # channels-last converts the module's weights in place: never the reference's own.
        model = copy.deepcopy(self.graph) if self.args.channels_last else self.graph
        return self._compiled(model, torch.float32), self._inductor_note()

    def _inductor_bf16(self) -> tuple[Callable[[], torch.Tensor], str]:
        model = copy.deepcopy(self.graph).to(torch.bfloat16)
        note = f"{self._inductor_note()}; {native_bf16()[1]}"
        return self._compiled(model, torch.bfloat16), note

    # -------------------------------------------------------------- torchao

    def _torchao(self, weight_only: bool) -> torch.nn.Module:
        key = "wo" if weight_only else "dyn"
        cached = getattr(self, "_torchao_" + key, None)
        if cached is not None:  # the eager and compiled contenders share one quantized copy
            return cached
        if _missing(["torchao"]):
            raise NotInstalled("torchao")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import (
                Int8DynamicActivationInt8WeightConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )
        model = copy.deepcopy(self.graph)
        config = Int8WeightOnlyConfig() if weight_only else Int8DynamicActivationInt8WeightConfig()
        # The default filter quantizes nn.Linear only: the convolutions stay fp32.
        quantize_(model, config)
        setattr(self, "_torchao_" + key, model)
        return model

    def _torchao_int8(self) -> tuple[Callable[[], torch.Tensor], str]:
        return self._torch_call(self._torchao(False), torch.float32), "eager; Linear only"

    def _torchao_int8_inductor(self) -> tuple[Callable[[], torch.Tensor], str]:
        model = self._torchao(False)
        return self._compiled(model, torch.float32), f"Linear only; {self._inductor_note()}"

    def _torchao_int8wo(self) -> tuple[Callable[[], torch.Tensor], str]:
        return self._torch_call(self._torchao(True), torch.float32), "eager; Linear only"

    def _torchao_int8wo_inductor(self) -> tuple[Callable[[], torch.Tensor], str]:
        model = self._torchao(True)
        return self._compiled(model, torch.float32), f"Linear only; {self._inductor_note()}"

    # -------------------------------------------------------------- ONNX Runtime

    def _onnx_fp32(self) -> tuple[Path, str]:
        """The UNet exported to ONNX (static shapes; > 2 GB, so external data), cached."""
        folder = self.cache / "onnx" / f"{self.fingerprint}-{self.shape_key()}"
        path = folder / "unet.onnx"
        if path.is_file():
            return path, "cached export"
        started = time.perf_counter()
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    self.graph,
                    self.inputs,
                    str(scratch / "unet.onnx"),
                    input_names=["sample", "timestep", "text"],
                    output_names=["noise"],
                    dynamo=True,
                    external_data=True,
                )
            os.replace(scratch, folder)  # complete or absent, never half written
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return path, f"export {time.perf_counter() - started:.0f} s"

    def _ort_session(self, path: Path) -> Callable[[], torch.Tensor]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {
            name: tensor.numpy()
            for name, tensor in zip(["sample", "timestep", "text"], self.inputs, strict=True)
        }

        def call() -> torch.Tensor:
            return torch.from_numpy(session.run(None, feeds)[0])

        return call

    def _check_ort(self) -> None:
        missing = _missing(GROUP_PACKAGES["onnxruntime"])
        if missing:
            raise NotInstalled(", ".join(missing))

    def _ort_fp32(self) -> tuple[Callable[[], torch.Tensor], str]:
        self._check_ort()
        path, note = self._onnx_fp32()
        return self._ort_session(path), note + ort_cap_note()

    def _ort_int8(self) -> tuple[Callable[[], torch.Tensor], str]:
        self._check_ort()
        from onnxruntime.quantization import QuantType, quantize_dynamic

        source, note = self._onnx_fp32()
        folder = source.parent.with_name(source.parent.name + "-int8")
        path = folder / "unet.onnx"
        meta = folder / "made.json"
        if path.is_file() and meta.is_file():
            note = f"cached; quantize took {json.loads(meta.read_text())['seconds']:.0f} s"
        else:
            started = time.perf_counter()
            scratch = Path(tempfile.mkdtemp(prefix=".quantize-", dir=folder.parent))
            try:
                # MatMul only, like torchao's Linear-only int8: ConvInteger has no fast CPU kernel.
                quantize_dynamic(
                    source,
                    scratch / "unet.onnx",
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul"],
                    use_external_data_format=True,
                )
                seconds = time.perf_counter() - started
                (scratch / "made.json").write_text(json.dumps({"seconds": seconds}))
                os.replace(scratch, folder)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            note = f"{note}; quantize {seconds:.0f} s"
        return self._ort_session(path), note + "; MatMul only" + ort_cap_note()

    # -------------------------------------------------------------- OpenVINO

    def _ov_ir(self) -> tuple[Path, str]:
        """The engine's own UNet export (dynamic shapes, fp16 storage), cached."""
        from engine.runtimes.openvino import _export

        path = self.cache / "openvino" / self.fingerprint / "unet.xml"
        if path.is_file() and path.with_suffix(".bin").is_file():
            return path, "cached IR"
        started = time.perf_counter()
        _export(self.pipe, self.spec, path)
        return path, f"convert {time.perf_counter() - started:.0f} s"

    def _ov_compile(self, path: Path, precision: str) -> tuple[Callable[[], torch.Tensor], str]:
        import openvino as ov

        from engine.runtimes.openvino import OpenVINONetwork

        compiled = ov.Core().compile_model(
            str(path),
            "CPU",
            {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": self.threads},
        )
        # What OpenVINO actually runs (it may fall back from a hinted bf16).
        effective = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        network = OpenVINONetwork(compiled)
        # The IR stores weights in fp16 (the engine's choice): f32 differs from PyTorch by that.
        return (lambda: network(*self.inputs)), f"runs {effective}, fp16-stored IR"

    def _check_ov(self) -> None:
        missing = _missing(["openvino"])
        if missing:
            raise NotInstalled(", ".join(missing))

    def _openvino_f32(self) -> tuple[Callable[[], torch.Tensor], str]:
        self._check_ov()
        path, note = self._ov_ir()
        call, runs = self._ov_compile(path, "f32")
        return call, f"{note}; {runs}"

    def _openvino_bf16(self) -> tuple[Callable[[], torch.Tensor], str]:
        self._check_ov()
        path, note = self._ov_ir()
        call, runs = self._ov_compile(path, "bf16")
        return call, f"{note}; {runs}"

    def _ov_int8_ir(self) -> tuple[Path, str]:
        """NNCF post-training int8 of the IR, calibrated on random latents at timesteps spread
        over 999..0 with one fixed text embedding (random weights: no real data exists)."""
        missing = _missing(["nncf"])
        if missing:
            raise NotInstalled(", ".join(missing))
        import nncf
        import openvino as ov

        source, note = self._ov_ir()
        folder = source.parent / f"int8-{self.shape_key()}-{self.args.calibration}"
        path = folder / "unet.xml"
        meta = folder / "made.json"
        if path.is_file() and meta.is_file():
            return (
                path,
                f"{note}; cached, quantize took {json.loads(meta.read_text())['seconds']:.0f} s",
            )
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(1)
        sample, _, text = self.inputs
        items = [
            (
                torch.randn(sample.shape, generator=generator).numpy(),
                np.full((sample.shape[0],), t, np.float32),
                text.numpy(),
            )
            for t in np.linspace(999, 0, self.args.calibration)
        ]
        quantized = nncf.quantize(
            ov.Core().read_model(str(source)),
            nncf.Dataset(items),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(items),
            advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1),
        )
        seconds = time.perf_counter() - started
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".quantize-", dir=folder.parent))
        try:
            ov.save_model(quantized, scratch / "unet.xml")
            (scratch / "made.json").write_text(json.dumps({"seconds": seconds}))
            os.replace(scratch, folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return path, f"{note}; NNCF quantize {seconds:.0f} s ({len(items)} items)"

    def _openvino_int8(self) -> tuple[Callable[[], torch.Tensor], str]:
        self._check_ov()
        path, note = self._ov_int8_ir()
        call, runs = self._ov_compile(path, "f32")
        return call, f"{note}; rest {runs}"

    def _openvino_int8_bf16(self) -> tuple[Callable[[], torch.Tensor], str]:
        self._check_ov()
        path, note = self._ov_int8_ir()
        call, runs = self._ov_compile(path, "bf16")
        return call, f"{note}; rest {runs}"


# ------------------------------------------------------------------------------ one group


def run_group(group: str, names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build each contender of the group (timing its first call), then time them alternating
    with torch-fp32; returns one row per contender (torch-fp32 first)."""
    started = time.perf_counter()
    bench = Bench(args)
    print(f"[{group}] model built in {time.perf_counter() - started:.0f} s; "
          f"RSS {rss_bytes() / GIB:.1f} GiB", flush=True)  # fmt: skip
    names = [REFERENCE, *[n for n in names if n != REFERENCE]]
    rows: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name in names:
        row = rows[name] = {"name": name, "group": group}
        release_memory()
        before = rss_bytes()
        started = time.perf_counter()
        try:
            call, note = bench.build(name)
            call()
        except NotInstalled as missing:
            row["status"] = f"not installed ({missing})"
            print(f"[{group}] {name}: not installed ({missing})", flush=True)
            continue
        except Exception as error:
            # First and last lines: OpenVINO's errors open with a location, end with the cause.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
            message = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
            row["status"] = f"failed: {type(error).__name__}: {message}"
            print(f"[{group}] {name} failed:\n{traceback.format_exc()}", flush=True)
            release_memory()
            continue
        row["first_s"] = time.perf_counter() - started
        release_memory()
        row["held_gib"] = (rss_bytes() - before) / GIB
        row["note"] = note
        calls[name] = call
        print(f"[{group}] {name}: first call {row['first_s']:.1f} s ({note}); "
              f"+{row['held_gib']:.1f} GiB", flush=True)  # fmt: skip
    results = alternate(calls, args.repeats, warmup=False)
    reference = results[REFERENCE]["result"]
    for name, result in results.items():
        out = result["result"].float()
        rows[name].update(
            median_s=result["median_s"],
            times=result["times"],
            ratio=result["median_s"] / results[REFERENCE]["median_s"],
            rel_error=float((out - reference).abs().mean() / reference.abs().mean()),
            peak_gib=result["peak_rss"] / GIB,
            status="ok",
        )
    return list(rows.values())


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--resolution", type=int, default=256, help="image side in px (latents: /8)"
    )
    parser.add_argument("--rows", type=int, default=3, help="3 guidance branches; 2 for s_I = 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma-separated, from: " + ", ".join(CONTENDERS),
    )
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    parser.add_argument(
        "--cache-dir",
        default=str(Path(tempfile.gettempdir()) / "ie-unet-runtimes"),
        help="exports (ONNX, OpenVINO IR, int8 models) and inductor's cache",
    )
    parser.add_argument("--calibration", type=int, default=12, help="NNCF calibration items")
    parser.add_argument(
        "--inductor-freezing",
        choices=("on", "off"),
        default="on",
        help="torch._inductor.config.freezing for the compiled contenders",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="compiled contenders take channels-last weights and sample",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny test UNet (a smoke run)")
    parser.add_argument("--json", help="also write every row (with each call's time) here")
    parser.add_argument("--group", help=argparse.SUPPRESS)  # internal: run one group, JSON out
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    # Inductor's compiled code goes with the other artefacts, never into ~/.cache or the repo.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(args.cache_dir) / "inductor"))
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(
            f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}"
        )

    if args.group:  # a child process: one group, rows to a JSON file
        # Dynamo's notes on diffusers' lru_cache'd version checks are harmless and many.
        warnings.filterwarnings("ignore", message="Dynamo detected a call")
        rows = run_group(args.group, names, args)
        Path(args.result).write_text(json.dumps(rows))
        return

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so a running group is ended with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cap = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                      "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}  # fmt: skip
    print(
        f"CPU: {cpu_name()}; threads {torch.get_num_threads()}; "
        f"PyTorch ISA {torch.backends.cpu.get_cpu_capability()}; {native_bf16()[1]}"
        + (f"; ISA CAPPED: {' '.join(f'{k}={v}' for k, v in cap.items())}" if cap else "")
    )
    model = "tiny test UNet" if args.tiny else "sd-ip2p UNet full size (859.5 M, 8 in-channels)"
    print(f"{model}, random weights; one call: {args.rows} rows at {args.resolution} px "
          f"(latents {args.resolution // 8}²); {args.repeats} repeats alternating after the first call")  # fmt: skip

    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(CONTENDERS[name], []).append(name)
    if groups.get("torch") == [REFERENCE] and len(groups) > 1:
        del groups["torch"]  # torch-fp32 runs with every group: no group of its own needed
    listing = "; ".join(f"{group}: {', '.join(members)}" for group, members in groups.items())
    print(f"groups, one process each, torch-fp32 alternating in each: {listing}\n", flush=True)

    rows: list[dict[str, Any]] = []
    for group, members in groups.items():
        missing = _missing(GROUP_PACKAGES[group])
        if missing and group != "onnxruntime":  # onnxruntime's members report it themselves
            rows += [{"name": n, "group": group, "status": f"not installed ({', '.join(missing)})"}
                     for n in members]  # fmt: skip
            continue
        with tempfile.TemporaryDirectory() as scratch:
            result = Path(scratch) / "rows.json"
            command = [sys.executable, __file__, *sys.argv[1:], "--group", group,
                       "--result", str(result), "--contenders", ",".join(members)]  # fmt: skip
            child = subprocess.Popen(command)
            try:
                returncode = child.wait()
            except BaseException:  # Ctrl-C, a timeout's SIGTERM: the group's process goes too
                child.kill()
                child.wait()
                raise
            if returncode != 0 or not result.is_file():
                rows += [{"name": n, "group": group,
                          "status": f"failed: the group's process exited with {returncode}"}
                         for n in members]  # fmt: skip
                continue
            rows += json.loads(result.read_text())

    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    references = [r for r in rows if r["name"] == REFERENCE and r.get("status") == "ok"]
    table = []
    if references:
        medians = [r["median_s"] for r in references]
        first = [r["first_s"] for r in references]
        table.append([REFERENCE, f"{statistics.median(first):.1f}",
                      f"{statistics.median(medians):.2f}", "1.00", "0 (reference)",
                      f"{max(r['peak_gib'] for r in references):.1f}",
                      f"{statistics.median(r['held_gib'] for r in references):.1f}",
                      f"eager; median of {len(references)} groups "
                      f"({', '.join(f'{m:.2f}' for m in medians)})"])  # fmt: skip
    for row in rows:
        if row["name"] == REFERENCE:
            continue
        if row.get("status") != "ok":
            table.append([row["name"], "-", "-", "-", "-", "-", "-", row.get("status", "?")])
            continue
        table.append([row["name"], f"{row['first_s']:.1f}", f"{row['median_s']:.2f}",
                      f"{row['ratio']:.2f}", f"{row['rel_error']:.2e}", f"{row['peak_gib']:.1f}",
                      f"{row['held_gib']:.1f}", row["note"]])  # fmt: skip
    print()
    print_table(table, ["contender", "first call s", "median s/call", "ratio to torch-fp32",
                        "rel. error vs fp32", "peak RSS GiB", "held GiB", "notes"])  # fmt: skip
    print("\nfirst call: build/convert/compile + the first call; ratio: to torch-fp32 of the same "
          "group (process); rel. error: mean|Δ| / mean|ref| of the output noise; peak RSS: the "
          "group's process (torch-fp32's weights included); held: RSS added by the contender")  # fmt: skip
    # Ratios, not seconds, are compared across groups: each is to torch-fp32 timed alongside.
    for precision, members in PRECISION_CLASSES.items():
        measured = [r for r in rows if r["name"] in members and r.get("status") == "ok"]
        if measured:
            best = min(measured, key=lambda r: r["ratio"])
            print(f"fastest {precision}: {best['name']} ({best['ratio']:.2f}× torch-fp32's time)")


if __name__ == "__main__":
    main()
