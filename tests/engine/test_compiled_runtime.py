"""torch.compile of the UNet: a new working size or variant count reuses the compiled graph."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from engine.editor import Editor
from engine.errors import InvalidInput
from engine.request import EditParams
from engine.runtimes.compiled import CompiledRuntime
from tests.tiny_models.sd import build_tiny_pipeline


def test_new_sizes_and_variant_counts_reuse_the_graph_and_match_eager() -> None:
    compiles: list[int] = []

    def counting_backend(graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        compiles.append(len(graph.graph.nodes))
        return graph.forward

    torch._dynamo.reset()
    eager = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    compiled = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    compiled._accelerator = CompiledRuntime("default", "sd-ip2p", backend=counting_backend)
    params = EditParams("make it red", steps=2, seed=1,
                        options={"text_guidance": 7.5, "image_guidance": 1.5})  # fmt: skip
    rng = np.random.default_rng(0)
    first = rng.random((64, 64, 3)).astype(np.float32)
    got = compiled.edit_working_size(first, params)[0]
    np.testing.assert_allclose(got, eager.edit_working_size(first, params)[0], atol=1e-4)
    after_first = len(compiles)
    assert after_first >= 1
    # Other sizes and another variant count: no new graph.
    compiled.edit_working_size(rng.random((96, 64, 3)).astype(np.float32), params)
    compiled.edit_working_size(
        rng.random((64, 128, 3)).astype(np.float32),
        EditParams("make it red", steps=2, seed=1, variants=2, options=params.options),
    )
    assert len(compiles) == after_first
    torch._dynamo.reset()


def test_compile_refuses_what_it_cannot_do() -> None:
    with pytest.raises(InvalidInput, match="not one of"):
        CompiledRuntime("fastest", "sd-ip2p")
    with pytest.raises(InvalidInput, match="InstructPix2Pix families"):
        CompiledRuntime("default", "flux-kontext")
