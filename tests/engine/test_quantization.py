"""Quantized loading (engine.quantization) on tiny FLUX models, on the CPU where the backend runs.

- torchao int8 weight-only runs on the CPU: loaded through the family, weights really int8,
  results close to the unquantized model's.
- GGUF: a tiny Q8_0 transformer file is written here with the `gguf` package and loaded as a
  single file with the base folder as config.
- bitsandbytes: diffusers' bnb quantizer needs a CUDA/XPU device; on a machine without one the
  engine refuses it up front with an InvalidInput naming `quantization` (tested), and the real
  load is tested only where CUDA is present.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine import quantization as quant
from engine.errors import InvalidInput
from engine.families.base import RunInputs, StepHooks
from engine.families.flux2_klein import Flux2KleinFamily
from engine.families.flux_kontext import FluxKontextFamily
from tests.tiny_models.flux import save_tiny_klein, save_tiny_kontext

try:
    from engine.models import ModelSource
except ImportError:  # pragma: no cover
    from engine.sources import ModelSource  # type: ignore[no-redef]

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_CUDA = torch.cuda.is_available()
FAMILIES = {"kontext": FluxKontextFamily(), "klein": Flux2KleinFamily()}
SIZES = {"kontext": (48, 64), "klein": (64, 64)}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads per
    process made these tests ~10× slower (spinning workers); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Wider than the other tests' models, so that every Linear has ≥ 32 inputs (Q8_0 blocks).
    root = tmp_path_factory.mktemp("flux-quant")
    return {"kontext": save_tiny_kontext(root / "kontext", heads=2, head_dim=16),
            "klein": save_tiny_klein(root / "klein", heads=2, head_dim=16)}


@pytest.fixture(scope="module")
def plain(folders: dict[str, Path]) -> dict[str, Any]:
    """The unquantized pipelines and their edits, loaded once."""
    pipes = {name: load(name, ModelSource("folder", str(folder))) for name, folder in folders.items()}
    return {name: (pipe, edit(name, pipe)) for name, pipe in pipes.items()}


def edit(name: str, pipe: Any, seed: int = 0) -> np.ndarray:
    height, width = SIZES[name]
    image = np.random.default_rng(1).random((height, width, 3)).astype(np.float32)
    inputs = RunInputs(image, "make it red", 2, [seed], FAMILIES[name].resolve_options({}))
    return FAMILIES[name].run(pipe, inputs, StepHooks(step=lambda *a: None), torch.device("cpu"))[0]


def load(name: str, source: Any, quantization: str | None = None, config: str | None = None) -> Any:
    return FAMILIES[name].load(source, dtype=torch.float32, quantization=quantization, config=config)


# ---------------------------------------------------------------------------- names and errors
def test_names() -> None:
    assert quant.QUANTIZATIONS == ("none", "bnb-8bit", "bnb-4bit", "torchao-int8", "gguf")
    assert quant.check_quantization(None) == "none"
    assert quant.quantization_config(None, ("transformer",)) is None
    assert quant.quantization_config("none", ("transformer",)) is None
    with pytest.raises(InvalidInput) as err:
        quant.quantization_config("int3", ("transformer",))
    assert err.value.field == "quantization" and "torchao-int8" in str(err.value)


def test_a_missing_backend_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "_has_package", lambda package: False)
    for name, package in (("torchao-int8", "torchao"), ("bnb-4bit", "bitsandbytes"), ("gguf", "gguf")):
        with pytest.raises(InvalidInput) as err:
            quant.quantization_config(name, ("transformer",))
        assert err.value.field == "quantization" and f"pip install {package}" in str(err.value)
    assert quant.available_quantizations() == ("none",)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: bitsandbytes is usable")
@pytest.mark.parametrize("name", ["bnb-8bit", "bnb-4bit"])
def test_bitsandbytes_without_cuda_is_refused_before_loading(name: str, monkeypatch: pytest.MonkeyPatch,
                                                             folders: dict[str, Path]) -> None:
    monkeypatch.setattr(quant, "_has_package", lambda package: True)  # installed or not
    with pytest.raises(InvalidInput, match="CUDA") as err:
        load("kontext", ModelSource("folder", str(folders["kontext"])), name)
    assert err.value.field == "quantization"


@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="bitsandbytes quantization in diffusers needs "
                    "CUDA (and the bitsandbytes package); none here")
def test_bitsandbytes_4bit_loads_on_cuda(folders: dict[str, Path]) -> None:  # pragma: no cover
    pipe = FluxKontextFamily().load(ModelSource("folder", str(folders["kontext"])), dtype=torch.bfloat16,
                                    quantization="bnb-4bit")
    assert pipe.transformer.is_quantized and pipe.text_encoder_2.is_quantized


def test_pipeline_config_names_components_and_backend() -> None:
    if not HAS_TORCHAO:
        pytest.skip("torchao is not installed (pip install torchao)")
    config = quant.quantization_config("torchao-int8", ("transformer", "text_encoder_2"))
    import diffusers
    import transformers

    assert set(config.quant_mapping) == {"transformer", "text_encoder_2"}
    assert isinstance(config.quant_mapping["transformer"], diffusers.TorchAoConfig)
    assert isinstance(config.quant_mapping["text_encoder_2"], transformers.TorchAoConfig)


# ---------------------------------------------------------------------------- torchao on the CPU
@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install torchao)")
@pytest.mark.parametrize("name", ["kontext", "klein"])
def test_torchao_int8_weight_only_loads_and_edits_on_the_cpu(name: str, folders: dict[str, Path],
                                                             plain: dict[str, Any]) -> None:
    quantized = load(name, ModelSource("folder", str(folders[name])), "torchao-int8")
    family = FAMILIES[name]
    for component in family.quantizable:
        module = getattr(quantized, component)
        assert getattr(module, "is_quantized", False), component
        linear = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        assert "Int8" in type(linear.weight).__name__ or "Affine" in type(linear.weight).__name__
    assert not getattr(quantized.vae, "is_quantized", False)
    want, got = plain[name][1], edit(name, quantized)
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).mean() < 0.02  # int8 weights: close, not equal
    assert np.abs(got - want).max() > 0  # and really quantized


# ---------------------------------------------------------------------------- GGUF single files
def write_gguf(transformer: torch.nn.Module, path: Path) -> int:
    """The transformer's weights as a GGUF file (diffusers' key names): 2-D weights whose rows
    are whole 32-blocks as Q8_0, the rest F32. Returns how many tensors were quantized."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="flux")
    quantized = 0
    for key, tensor in transformer.state_dict().items():
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


@pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed (pip install gguf)")
@pytest.mark.parametrize("name", ["kontext", "klein"])
def test_a_gguf_transformer_loads_with_its_base_folder(name: str, folders: dict[str, Path],
                                                       plain: dict[str, Any], tmp_path: Path) -> None:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    path = tmp_path / f"{name}-Q8_0.gguf"
    assert write_gguf(plain[name][0].transformer, path) > 0
    pipe = load(name, ModelSource("single_file", str(path)), "gguf", config=str(folders[name]))
    kinds = {type(p) for p in pipe.transformer.parameters()}
    assert GGUFParameter in kinds
    want, got = plain[name][1], edit(name, pipe)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 0.02
    assert np.abs(got - want).max() > 0  # really the quantized weights
    if name == "kontext":  # the quantization may be left unset: the file decides
        again = load(name, ModelSource("single_file", str(path)), None, config=str(folders[name]))
        np.testing.assert_array_equal(edit(name, again), got)


def test_gguf_needs_a_gguf_file(folders: dict[str, Path]) -> None:
    with pytest.raises(InvalidInput, match=r"\.gguf") as err:
        load("kontext", ModelSource("folder", str(folders["kontext"])), "gguf")
    assert err.value.field == "quantization"
