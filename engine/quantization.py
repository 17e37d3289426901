"""Quantized loading through diffusers' own backends, and the loader the DiT families share.

`quantization` names (the `--quantization` flag, the memory plan, `/v1/health`):

| name           | backend                                   | runs on                       |
|----------------|-------------------------------------------|-------------------------------|
| `none`         | –                                         | anywhere                      |
| `bnb-8bit`     | bitsandbytes LLM.int8 (`load_in_8bit`)    | CUDA / XPU (diffusers refuses the CPU) |
| `bnb-4bit`     | bitsandbytes NF4, compute in the dtype    | CUDA / XPU / MPS              |
| `torchao-int8` | torchao int8 weight-only                  | anywhere (CPU included)       |
| `gguf`         | a `.gguf` transformer single file         | anywhere (dequantised per layer) |

`quantization_config(name, components)` gives the `PipelineQuantizationConfig` that
`from_pretrained` takes (None for `none` and for `gguf`, whose quantisation lives in the file);
a backend that is missing or needs an accelerator this machine lacks is an InvalidInput naming
the `quantization` field, before anything is loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import EngineError, InvalidInput, ModelNotFound
from engine.sources import ModelSource, hub_fetch_allowed, pretrained

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, GGUFQuantizationConfig, PipelineQuantizationConfig

QUANTIZATIONS = ("none", "bnb-8bit", "bnb-4bit", "torchao-int8", "gguf")

# pip package per backend (the `quant` extra of pyproject.toml).
_PACKAGES = {"bnb-8bit": "bitsandbytes", "bnb-4bit": "bitsandbytes", "torchao-int8": "torchao",
             "gguf": "gguf"}
GGUF_SUFFIX = ".gguf"


def check_quantization(name: str | None) -> str:
    """The quantization's canonical name (None → "none"); InvalidInput for an unknown one."""
    if name is None or name == "":
        return "none"
    if name not in QUANTIZATIONS:
        raise InvalidInput(f"quantization must be one of {', '.join(QUANTIZATIONS)} (got {name!r})",
                           "quantization")
    return name


def _has_package(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _require_backend(name: str) -> None:
    package = _PACKAGES[name]
    if not _has_package(package):
        raise InvalidInput(
            f"quantization {name} needs the {package} package, which is not installed: "
            f"`pip install {package}` (or `pip install instruct-edit[quant]`)",
            "quantization",
        )
    if name.startswith("bnb-"):
        has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
        if name == "bnb-4bit":
            has_accelerator = has_accelerator or torch.backends.mps.is_available()
        if not has_accelerator:
            raise InvalidInput(
                f"quantization {name} (bitsandbytes) needs a CUDA GPU, and this machine has none; "
                "use torchao-int8 or a .gguf file on the CPU",
                "quantization",
            )


def available_quantizations() -> tuple[str, ...]:
    """The quantizations that would load on this machine (for the memory plan and /v1/health)."""
    usable = ["none"]
    for name in QUANTIZATIONS[1:]:
        try:
            _require_backend(name)
        except InvalidInput:
            continue
        usable.append(name)
    return tuple(usable)


def _backend_and_kwargs(name: str, compute_dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
    if name == "bnb-8bit":
        return "bitsandbytes_8bit", {"load_in_8bit": True}
    if name == "bnb-4bit":
        return "bitsandbytes_4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_compute_dtype": compute_dtype}
    from torchao.quantization import Int8WeightOnlyConfig

    return "torchao", {"quant_type": Int8WeightOnlyConfig()}


def is_transformers_component(component: str) -> bool:
    """Text encoders are transformers models; the denoiser and the VAE are diffusers models."""
    return component.startswith("text_encoder")


def quantization_config(name: str | None, components: tuple[str, ...], *,
                        compute_dtype: torch.dtype = torch.bfloat16) -> PipelineQuantizationConfig | None:
    """diffusers' pipeline-level config quantizing `components` (None: load unquantized).

    Built as a `quant_mapping` of one config per component, from the library that component
    belongs to: diffusers refuses a plain `quant_backend` for torchao because its and
    transformers' TorchAoConfig take different arguments. `gguf` also gives None: a GGUF file
    quantizes only the transformer it holds (`gguf_config`); the rest loads as usual.
    """
    name = check_quantization(name)
    if name in ("none", "gguf") or not components:
        if name == "gguf":
            _require_backend(name)
        return None
    _require_backend(name)
    import diffusers
    import transformers

    _, kwargs = _backend_and_kwargs(name, compute_dtype)
    config_class = "TorchAoConfig" if name == "torchao-int8" else "BitsAndBytesConfig"
    mapping = {}
    for component in components:
        library = transformers if is_transformers_component(component) else diffusers
        mapping[component] = getattr(library, config_class)(**kwargs)
    return diffusers.PipelineQuantizationConfig(quant_mapping=mapping)


def model_quantization_config(name: str | None, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """The diffusers model-level config for one diffusers model (a single-file transformer)."""
    name = check_quantization(name)
    if name == "none":
        return None
    if name == "gguf":
        return gguf_config(compute_dtype)
    _require_backend(name)
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    _, kwargs = _backend_and_kwargs(name, compute_dtype)
    return TorchAoConfig(**kwargs) if name == "torchao-int8" else BitsAndBytesConfig(**kwargs)


def gguf_config(compute_dtype: torch.dtype) -> GGUFQuantizationConfig:
    _require_backend("gguf")
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=compute_dtype)


# ---------------------------------------------------------------------------- loading
def _from_pretrained(cls: Any, location: str, kind: str, **kwargs: Any) -> Any:
    """Folder: local files only. Hub id: the cache first, then a download when allowed
    (engine.sources.pretrained, with its pickle and download policy)."""
    folder = kind == "folder" or Path(location).is_dir()
    return pretrained(cls, ModelSource("folder" if folder else "hub", location), **kwargs)


def load_dit_pipeline(pipeline_cls: Any, transformer_cls: Any, source: Any, *, dtype: torch.dtype,
                      quantization: str | None, config: str | None,
                      components: tuple[str, ...]) -> DiffusionPipeline:
    """A DiT edit pipeline (FLUX.1 Kontext, FLUX.2 klein, …) on the CPU in `dtype`.

    `source` (engine.models.ModelSource): a diffusers folder or hub id loads whole, with
    `quantization` applied to `components`. A single file (`.safetensors` or `.gguf`) is the
    transformer alone, as these models are distributed; its config and the other components
    come from `config` (the base model's hub id or folder). A `.gguf` file carries its own
    quantization (`quantization` may be "gguf" or unset).
    """
    name = check_quantization(quantization)
    location = str(source.location)
    is_gguf = source.kind == "single_file" and location.lower().endswith(GGUF_SUFFIX)
    if name == "gguf" and not is_gguf:
        raise InvalidInput(
            "quantization gguf needs a .gguf transformer file as the model (and the base model "
            "as its config)", "quantization")
    if is_gguf:
        name = "gguf"
    try:
        if source.kind != "single_file":
            qconfig = quantization_config(name, components, compute_dtype=dtype)
            extra = {"quantization_config": qconfig} if qconfig is not None else {}
            return _from_pretrained(pipeline_cls, location, source.kind, dtype=dtype, **extra)
        if not config:
            raise InvalidInput(
                f"{Path(location).name} is a single transformer file: pass the base model (hub id or "
                "folder) as its config, for the transformer's config and the text encoders and VAE",
                "model")
        base_is_folder = Path(config).expanduser().is_dir()
        transformer = transformer_cls.from_single_file(
            location, config=config, subfolder="transformer", torch_dtype=dtype,
            quantization_config=model_quantization_config(name, dtype),
            local_files_only=base_is_folder or not hub_fetch_allowed(),
        )
        others = tuple(c for c in components if c != "transformer")
        qconfig = quantization_config(name if name != "gguf" else "none", others, compute_dtype=dtype)
        extra = {"quantization_config": qconfig} if qconfig is not None else {}
        return _from_pretrained(pipeline_cls, str(Path(config).expanduser()) if base_is_folder else config,
                                "folder" if base_is_folder else "hub", dtype=dtype,
                                transformer=transformer, **extra)
    except EngineError:
        raise
    except (OSError, ValueError) as err:
        raise ModelNotFound(_failure_message(source, config, err), "model") from err


def _failure_message(source: Any, config: str | None, err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    first = lines[0][:300] if lines else type(err).__name__
    if source.kind == "hub":
        return (f"model {source.location!r} is not in the local Hugging Face cache and could not be "
                f"downloaded ({type(err).__name__}: {first}). On a machine with internet run "
                f"`hf download {source.location}`, or pass a local diffusers folder")
    if source.kind == "single_file":
        return (f"could not load the transformer file {source.location} with the base model "
                f"{config!r}: {first}")
    return f"could not load the model folder {source.location}: {first}"
