"""The editor: one loaded model turning (image, instruction) into edited images.

Family-agnostic: the model maths (loading, the family's parameters, its working-size rule, the
denoising call) is the family's (`engine.families`); the editor adds what every family needs
around it: image preparation (alpha over white paper), the working size, detail preservation
back at the input's size, masks, variants in chunks (variant k = seed + k, equal to a single
run), the out-of-memory ladder, the memory plan, LoRAs (diffusers' common API), progress with
previews and cancel within one step (`StepHooks`), and a lock (one edit at a time).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine import imaging
from engine.devices import (
    GIB,
    LARGE_WORKING_PIXELS,
    check_memory_plan,
    choose_memory_plan,
    device_memory,
    estimate_vram_gb,
    free_memory,
    is_out_of_memory,
    memory_report,
    next_memory_plan,
    resolve_device,
    resolve_dtype,
)
from engine.errors import EditCancelled, InvalidInput, OutOfMemory
from engine.families import (
    Family,
    apply_preset,
    catalogue_entry,
    detect_family,
    family_of_pipeline,
    get_family,
)
from engine.families.base import RunInputs, StepHooks
from engine.manifest import DEFAULT_MODEL
from engine.models import load_pipeline
from engine.request import EditParams, LoraSpec
from engine.runtimes import resolve_runtime
from engine.sources import (
    ModelSource,
    hub_file,
    lora_adapter_name,
    resolve_lora_path,
    resolve_model_source,
)


@dataclass(frozen=True)
class Progress:
    step: int  # steps done so far, 1-based
    total: int
    preview: Image.Image | None = None  # cheap latent preview of variant 0, when asked for
    # What the engine is doing before the steps start, when it takes long: converting a model
    # for the CPU runtime or calibrating its int8 UNet on first use. None during the steps.
    note: str | None = None


ProgressCallback = Callable[[Progress], None]
# Called with (variant index, the finished image) as each variant is done.
VariantCallback = Callable[[int, Image.Image], None]
# LoRA adapters kept loaded per editor; past this the least recently used is unloaded.
DEFAULT_MAX_LORAS_LOADED = 8


@dataclass(frozen=True)
class ResolvedEdit:
    """An edit's model-dependent values, defaults filled in and checked against the family."""

    steps: int
    resolution: int
    options: Mapping[str, Any]


class Editor:
    """One loaded model, ready to edit. Edits are serialised by a lock (one at a time).

    `model`: a catalogue id, hub id, diffusers folder or single file (default: the catalogue's
    default model). `family`: a family id; None detects it. `memory_plan`: auto (chosen from
    free VRAM and the model's needs), full, offload-text, model-offload, sequential-offload
    (`memory_saving` is the older name: auto/off/slicing/offload).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        family: str | Family | None = None,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        memory_plan: str = "auto",
        memory_saving: str | None = None,
        quantization: str | None = None,
        model_config: str | None = None,
        pipeline: Any = None,
        max_loras_loaded: int = DEFAULT_MAX_LORAS_LOADED,
        runtime: str | None = None,
        compile: str = "off",
    ) -> None:
        self.device = resolve_device(device)
        self.max_loras_loaded = max(1, max_loras_loaded)
        self.allow_pickle = allow_pickle
        if memory_plan == "auto" and memory_saving is not None:
            memory_plan = memory_saving
        self.requested_plan = check_memory_plan(memory_plan)
        self.quantization = quantization if quantization not in (None, "none") else None
        self.model_name = str(model) if model is not None else None
        if pipeline is not None:
            self.entry = catalogue_entry(self.model_name)
            self.family = _as_family(family) or family_of_pipeline(pipeline)
            self.dtype = resolve_dtype(dtype, self.device, self.family.preferred_dtype)
            self.pipe = pipeline
        else:
            source, config, self.entry = resolve_source(model, model_config, allow_pickle)
            self.family = (_as_family(family)
                           or (get_family(self.entry["family"]) if self.entry else None)
                           or detect_family(source, config, allow_pickle))
            self.dtype = resolve_dtype(dtype, self.device, self.family.preferred_dtype)
            self.pipe = load_pipeline(source, self.family, self.dtype, self.quantization, config,
                                      allow_pickle=allow_pickle, entry=self.entry)
        self.pipe = self.family.prepare(self.pipe, self.dtype)
        # PyTorch or OpenVINO for the networks (engine/runtimes): decided once per loaded model.
        runtime = runtime or os.environ.get("INSTRUCT_EDIT_RUNTIME", "auto")
        self.runtime = resolve_runtime(runtime, self.device, self.family.id,
                                       quantization=self.quantization)
        # What runs the UNet/VAE instead of the pipeline's own modules (None: those).
        self._accelerator: Any = None
        if self.runtime in ("openvino", "openvino-int8"):
            from engine.runtimes.openvino import OpenVINORuntime, cpu_precision

            self._accelerator = OpenVINORuntime(cpu_precision(self.dtype),
                                                int8_unet=self.runtime == "openvino-int8")
        elif compile != "off":
            from engine.runtimes.compiled import CompiledRuntime

            self._accelerator = CompiledRuntime(compile, self.family.id)
        self._lora_key = ""  # the active LoRAs (files and strengths): part of the OpenVINO key
        self._lock = threading.Lock()
        self._loaded_loras: OrderedDict[str, str] = OrderedDict()  # adapter -> file, LRU first
        self.plan: str | None = None
        self._text_hooks: list[Any] = []
        self._denoiser_hook: Any = None
        self._savers_on = False
        self._apply_plan(self._initial_plan())

    @classmethod
    def from_pipeline(cls, pipe: Any, *, family: str | Family | None = None, device: str = "auto",
                      dtype: str = "auto", memory_plan: str = "auto", model: str | None = None,
                      runtime: str = "torch") -> Editor:
        """Wrap an already built pipeline; its family is detected from its class. Its networks
        run as given (PyTorch) unless another `runtime` is asked for."""
        return cls(model, pipeline=pipe, family=family, device=device, dtype=dtype,
                   memory_plan=memory_plan, runtime=runtime)

    # ---------------------------------------------------------------- public API
    def edit(
        self,
        image: Image.Image,
        params: EditParams,
        mask: Image.Image | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        preview_every: int = 0,
        on_variant: VariantCallback | None = None,
    ) -> list[Image.Image]:
        """Return `params.variants` edited images, each of the input's exact size.

        Variant k uses seed + k and equals a single edit with that seed. Raises EditCancelled
        within one step of `cancel` being set, InvalidInput for unusable images, masks or
        parameters, and OutOfMemory when even one variant at a time does not fit.

        Each variant is brought back to full size and made 8-bit as soon as the model has made
        it (its float copies live only meanwhile). With `on_variant`, each finished image is
        handed over then (`on_variant(k, image)`) and not kept: the list returned is empty, so
        a caller that stores or encodes variants never holds them all at once.
        """
        prepared = imaging.prepare_image(image)
        weights = imaging.prepare_mask(mask, prepared.size) if mask is not None else None
        params = apply_preset(params, self.entry)
        resolved = self.resolve(params)
        out: list[Image.Image] = []
        delivered = 0

        def deliver(finished: Image.Image) -> None:
            nonlocal delivered
            if on_variant is not None:
                on_variant(delivered, finished)
            else:
                out.append(finished)
            delivered += 1

        if params.is_empty:
            for _ in range(params.variants):
                deliver(prepared.original.copy())
            return out
        size = self.family.working_size(*prepared.size, resolved.resolution)
        working_input = imaging.resize_to_working_size(prepared, size)

        def bring_back(result: np.ndarray) -> None:
            full = imaging.bring_back_to_input_size(prepared.rgb, working_input, result, params.preserve_detail)
            finished = imaging.finish(prepared, full, weights)
            del full  # the float copy goes before the next variant's is made
            deliver(finished)

        with self._lock:
            # Streamed through bring_back; whatever comes back as a list too (none here).
            for result in self._edit_working(working_input, params, resolved, on_progress, cancel,
                                             preview_every, bring_back):
                bring_back(result)
        return out

    def edit_working_size(
        self,
        working_input: np.ndarray,
        params: EditParams,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        preview_every: int = 0,
    ) -> list[np.ndarray]:
        """The model part: H×W×3 floats in [0, 1] in, one such array per variant out."""
        params = apply_preset(params, self.entry)
        resolved = self.resolve(params)
        with self._lock:
            return self._edit_working(working_input, params, resolved, on_progress, cancel, preview_every)

    def resolve(self, params: EditParams) -> ResolvedEdit:
        """Steps, resolution and the family's options: the request's, else the catalogue entry's
        recommendation, else the family's defaults; each checked (InvalidInput naming the field)."""
        family = self.family
        recommended = (self.entry or {}).get("recommended") or {}
        steps = params.steps or recommended.get("steps") or family.steps.default
        if not family.steps.minimum <= steps <= family.steps.maximum:
            raise InvalidInput(
                f"steps must be a whole number from {family.steps.minimum} to {family.steps.maximum} "
                f"for {family.label} models (got {steps})", "steps")
        rule = family.resolution
        resolution = params.resolution or recommended.get("resolution") or rule.default
        if not rule.minimum <= resolution <= rule.maximum:
            raise InvalidInput(
                f"resolution must be from {rule.minimum} to {rule.maximum} for {family.label} models "
                f"(got {resolution})", "resolution")
        taken = {spec.name for spec in family.params}
        defaults = {k: v for k, v in (recommended.get("options") or {}).items() if k in taken}
        options = family.resolve_options({**defaults, **params.options})
        return ResolvedEdit(steps=int(steps), resolution=int(resolution), options=options)

    def memory_report(self) -> dict[str, Any]:
        """{device, plan, free_bytes, total_bytes, quantization} for `/v1/health`."""
        return memory_report(self.device, self.plan, self.quantization)

    # ---------------------------------------------------------------- variants & the ladder
    def _edit_working(
        self,
        working_input: np.ndarray,
        params: EditParams,
        resolved: ResolvedEdit,
        on_progress: ProgressCallback | None,
        cancel: threading.Event | None,
        preview_every: int,
        on_result: Callable[[np.ndarray], None] | None = None,
    ) -> list[np.ndarray]:
        """The variants at working size, chunk by chunk down the out-of-memory ladder. With
        `on_result`, each chunk's results are passed on as soon as the chunk is done, and not
        kept (the list returned is then empty)."""
        height, width = working_input.shape[:2]
        multiple = self.family.resolution.multiple
        if height % multiple or width % multiple:
            raise InvalidInput(f"working size {width}×{height} must be a multiple of {multiple}", "resolution")
        self._activate_loras(params.loras)
        self._apply_working_size_savers(width * height)
        seeds = [params.seed + k for k in range(params.variants)]
        chunk = len(seeds)
        results: list[np.ndarray] = []
        done = 0
        while done < len(seeds):
            todo = seeds[done : done + chunk]
            try:
                made = list(self._run(working_input, params.instruction, resolved, todo,
                                      on_progress, cancel, preview_every, done))
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                free_memory(self.device)
                if chunk > 1:
                    chunk = max(1, chunk // 2)
                elif not self._step_down_memory():
                    raise OutOfMemory(
                        f"out of memory at {width}×{height} even one variant at a time with every "
                        "memory saver on; lower the resolution or close other GPU programs",
                        "resolution",
                    ) from err
                continue
            done += len(made)
            if on_result is None:
                results.extend(made)
                continue
            while made:  # handed on one at a time, each dropped before the next is made
                on_result(made.pop(0))
        return results

    def _run(
        self,
        working_input: np.ndarray,
        instruction: str,
        resolved: ResolvedEdit,
        seeds: Sequence[int],
        on_progress: ProgressCallback | None,
        cancel: threading.Event | None,
        preview_every: int,
        done_before: int,
    ) -> list[np.ndarray]:
        """One chunk of variants through the family's denoising, with progress and cancel."""
        height, width = working_input.shape[:2]
        family, pipe = self.family, self.pipe

        def step(i: int, total: int, latents: torch.Tensor | None) -> None:
            if cancel is not None and cancel.is_set():
                raise EditCancelled()
            if on_progress is not None:
                want = preview_every > 0 and done_before == 0 and i % preview_every == 0
                preview = family.preview(pipe, latents, (width, height)) if want and latents is not None else None
                on_progress(Progress(step=i, total=total, preview=preview))
            if cancel is not None and cancel.is_set():  # set during the callback: stop now
                raise EditCancelled()

        if cancel is not None and cancel.is_set():
            raise EditCancelled()
        inputs = RunInputs(image=working_input, instruction=instruction, steps=resolved.steps,
                           seeds=list(seeds), options=dict(resolved.options))
        if self._accelerator is not None:
            def note(text: str) -> None:
                if on_progress is not None:
                    on_progress(Progress(step=0, total=resolved.steps, note=text))

            def calibrate(networks: Any, index: int) -> None:
                self._calibration_edit(networks, index, cancel)

            pipe.accelerated = self._accelerator.accelerate(pipe, self._lora_key,
                                                            calibrate=calibrate, listener=note)
        try:
            results = family.run(pipe, inputs, StepHooks(step=step), self._execution_device())
        finally:  # the pipeline may be shared (benchmarks, tests): leave it as it was
            if self._accelerator is not None:
                pipe.accelerated = None
        if cancel is not None and cancel.is_set():
            raise EditCancelled()
        return results

    def _calibration_edit(self, networks: Any, index: int,
                          cancel: threading.Event | None = None) -> None:
        """One short edit of drawn picture `index` through the family's own loop with these
        networks (the int8 runtime records the UNet's inputs: engine/runtimes/calibration.py).
        A cancelled edit stops it between steps; nothing is kept, the next edit starts again."""
        from engine.runtimes.calibration import (
            CALIBRATION_INSTRUCTIONS,
            CALIBRATION_SIZE,
            CALIBRATION_STEPS,
            calibration_picture,
        )

        instruction = CALIBRATION_INSTRUCTIONS[index % len(CALIBRATION_INSTRUCTIONS)]
        resolved = self.resolve(EditParams(instruction, steps=CALIBRATION_STEPS, seed=index))
        inputs = RunInputs(image=calibration_picture(index, CALIBRATION_SIZE), instruction=instruction,
                           steps=CALIBRATION_STEPS, seeds=[index], options=dict(resolved.options))
        pipe = self.pipe
        pipe.accelerated = networks
        try:
            def step(*_: Any) -> None:
                if cancel is not None and cancel.is_set():
                    raise EditCancelled()

            self.family.run(pipe, inputs, StepHooks(step=step), self._execution_device())
        finally:
            pipe.accelerated = None

    # ---------------------------------------------------------------- LoRAs
    def _activate_loras(self, loras: Sequence[LoraSpec]) -> None:
        if loras and not self.family.supports_loras:
            raise InvalidInput(f"{self.family.label} models take no LoRAs", "loras")
        if not loras:
            if self._loaded_loras:
                self.pipe.disable_lora()
            self._lora_key = ""
            return
        names, strengths, key = [], [], []
        for lora in loras:
            path = resolve_lora_path(lora.path, self.allow_pickle)
            name = lora_adapter_name(path)
            if name in self._loaded_loras:
                self._loaded_loras.move_to_end(name)
            else:
                try:
                    self.pipe.load_lora_weights(str(path), adapter_name=name)
                except (ValueError, OSError, KeyError, RuntimeError, AttributeError) as err:
                    raise InvalidInput(
                        f"could not load LoRA {path.name}: {str(err).splitlines()[0][:200]}", "loras"
                    ) from err
                self._loaded_loras[name] = str(path)
            names.append(name)
            strengths.append(lora.strength)
            stat = path.stat()
            key.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{lora.strength}")
        self._unload_old_loras(keep=set(names))
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=strengths)
        self._lora_key = "|".join(key)

    def _unload_old_loras(self, keep: set[str]) -> None:
        """Past `max_loras_loaded`, unload the least recently used adapters (never one this
        edit uses): a long-running service would otherwise keep every LoRA ever asked for."""
        for name in list(self._loaded_loras):
            if len(self._loaded_loras) <= self.max_loras_loaded:
                return
            if name in keep:
                continue
            self.pipe.delete_adapters(name)
            del self._loaded_loras[name]

    # ---------------------------------------------------------------- memory
    def _vram_table(self) -> dict[str, float]:
        entry = self.entry or {}
        table = dict(entry.get("vram_gb") or {})
        if self.quantization:
            table.update((entry.get("quantizations") or {}).get(self.quantization) or {})
        if table:
            return table
        sizes = {name: _module_bytes(module) for name, module in self.pipe.components.items()
                 if isinstance(module, torch.nn.Module)}
        return estimate_vram_gb(sizes, self.family.text_encoders)

    def _initial_plan(self) -> str:
        if self.device.type != "cuda":
            return "full"
        if self.requested_plan != "auto":
            return self.requested_plan
        free, _ = device_memory(self.device)
        return choose_memory_plan(self._vram_table(), free, self.device)

    def _apply_plan(self, plan: str, *, on_any_device: bool = False) -> None:
        """Put the pipeline's components where `plan` wants them (`on_any_device`: also on a
        CPU, where offloading saves nothing; the tests use it to run the plumbing)."""
        if plan == self.plan:
            return
        if self.device.type != "cuda" and not on_any_device:
            plan = "full"  # nothing to offload to
        self._clear_offload()
        pipe = self.pipe
        if plan == "full":
            pipe.to(self.device)
        elif plan == "offload-text":
            from accelerate import cpu_offload_with_hook

            for name, module in pipe.components.items():
                if not isinstance(module, torch.nn.Module):
                    continue
                if name in self.family.text_encoders:
                    module.to("cpu")
                    self._text_hooks.append(cpu_offload_with_hook(module, execution_device=self.device)[1])
                else:
                    module.to(self.device)
            denoiser = getattr(pipe, self.family.denoiser, None)
            if isinstance(denoiser, torch.nn.Module):
                self._denoiser_hook = denoiser.register_forward_pre_hook(self._offload_text_encoders)
        elif plan == "model-offload":
            pipe.enable_model_cpu_offload(device=self.device)
        elif plan == "sequential-offload":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:  # pragma: no cover - check_memory_plan guards the names
            raise InvalidInput(f"unknown memory plan {plan!r}", "memory_plan")
        self.plan = plan

    def _offload_text_encoders(self, *_: Any) -> None:
        """The denoiser is about to run: the text encoders' work is done, give their room back."""
        moved = False
        for hook in self._text_hooks:
            module = getattr(hook, "model", None)
            if module is not None and next(module.parameters()).device.type != "cpu":
                hook.offload()
                moved = True
        if moved:
            free_memory(self.device)

    def _clear_offload(self) -> None:
        if self._denoiser_hook is not None:
            self._denoiser_hook.remove()
            self._denoiser_hook = None
        if self.plan in ("offload-text", "model-offload") and hasattr(self.pipe, "remove_all_hooks"):
            self.pipe.remove_all_hooks()
        self._text_hooks = []

    def _apply_working_size_savers(self, working_pixels: int) -> None:
        vae = getattr(self.pipe, "vae", None)
        tiling = self._savers_on or working_pixels > LARGE_WORKING_PIXELS
        switch = getattr(vae, "enable_tiling" if tiling else "disable_tiling", None)
        if callable(switch):
            switch()

    def _step_down_memory(self) -> bool:
        """One rung down the out-of-memory ladder; False when there is none left."""
        if self.device.type != "cuda":
            return False
        if not self._savers_on:
            self._savers_on = True
            if hasattr(self.pipe, "enable_attention_slicing"):
                self.pipe.enable_attention_slicing()
            return True
        lighter = next_memory_plan(self.plan or "full")
        if lighter is None:
            return False
        self._apply_plan(lighter)
        return True

    def _execution_device(self) -> torch.device:
        if self.plan in ("model-offload", "sequential-offload"):
            return self.pipe._execution_device
        return self.device


def resolve_source(model: str | Path | None, model_config: str | None,
                   allow_pickle: bool) -> tuple[ModelSource, str | None, dict[str, Any] | None]:
    """(source, config, catalogue entry) of a model name: catalogue ids first (a single-file
    entry resolves to its file in the hub cache), then hub ids, folders and files."""
    name = str(model) if model is not None else DEFAULT_MODEL
    entry = catalogue_entry(name)
    if entry is not None:
        config = model_config or entry.get("config")
        single = entry.get("single_file")
        if single:
            return ModelSource("single_file", str(hub_file(single["repo"], single["file"]))), config, entry
        return resolve_model_source(entry["id"], allow_pickle), config, entry
    return resolve_model_source(name, allow_pickle), model_config, None


def _as_family(family: str | Family | None) -> Family | None:
    if family is None or isinstance(family, Family):
        return family
    return get_family(family)


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


__all__ = ["GIB", "Editor", "Progress", "ResolvedEdit", "resolve_source"]
