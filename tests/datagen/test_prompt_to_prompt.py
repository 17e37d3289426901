"""Prompt-to-Prompt pair generation: attention sharing, noise sharing, the p schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datagen_helpers import TINY_RESOLUTION, build_tiny_sd_pipeline

from training.datagen.prompt_to_prompt import (
    PairGenerator,
    SampleParams,
    SharedSelfAttentionProcessor,
    draw_sample_params,
    pair_seeds,
    shares_step,
)

STEPS = 4
CAPTIONS = ("a red car on a street", "a blue boat on a lake")


@pytest.fixture(scope="module")
def generator():
    with PairGenerator(
        build_tiny_sd_pipeline(sharp_self_attention=True),
        num_steps=STEPS,
        resolution=TINY_RESOLUTION,
    ) as gen:
        yield gen


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def single_image(generator: PairGenerator, caption: str, params: SampleParams) -> np.ndarray:
    """One independent generation of `caption` with the sample's seed (no pairing at all)."""
    generator.controller.sharing = False
    image = generator.pipeline(
        prompt=caption,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        num_inference_steps=STEPS,
        guidance_scale=params.cfg_scale,
        generator=torch.Generator("cpu").manual_seed(params.seed),
    ).images[0]
    return as_array(image)


def test_processors_only_on_self_attention(generator):
    processors = generator.pipeline.unet.attn_processors
    shared = [n for n, p in processors.items() if isinstance(p, SharedSelfAttentionProcessor)]
    assert shared and all(n.endswith("attn1.processor") for n in shared)
    assert len(shared) == sum(n.endswith("attn1.processor") for n in processors)
    assert not any(
        isinstance(p, SharedSelfAttentionProcessor) for n, p in processors.items() if "attn2" in n
    )


def test_close_restores_the_original_processors():
    pipeline = build_tiny_sd_pipeline()
    before = {n: type(p) for n, p in pipeline.unet.attn_processors.items()}
    with PairGenerator(pipeline, num_steps=2, resolution=TINY_RESOLUTION):
        assert any(
            isinstance(p, SharedSelfAttentionProcessor)
            for p in pipeline.unet.attn_processors.values()
        )
    assert {n: type(p) for n, p in pipeline.unet.attn_processors.items()} == before


def test_identical_captions_give_identical_images(generator):
    for p in (0.0, 0.5, 1.0):
        first, second = generator.generate((CAPTIONS[0], CAPTIONS[0]), SampleParams(7, p, 9.0))
        assert np.abs(as_array(first) - as_array(second)).max() <= 1


def test_p_zero_equals_two_independent_generations_with_one_seed(generator):
    params = SampleParams(seed=11, p2p_threshold=0.0, cfg_scale=8.0)
    first, second = generator.generate(CAPTIONS, params)
    alone_0 = single_image(generator, CAPTIONS[0], params)
    alone_1 = single_image(generator, CAPTIONS[1], params)
    assert np.abs(as_array(first) - alone_0).max() <= 2
    assert np.abs(as_array(second) - alone_1).max() <= 2
    # the two captions really produce different images, so the comparison above means something
    assert np.abs(alone_0 - alone_1).mean() > 1


def test_sharing_changes_the_second_image_only(generator):
    params = SampleParams(seed=11, p2p_threshold=0.9, cfg_scale=8.0)
    first, second = generator.generate(CAPTIONS, params)
    alone_0 = single_image(generator, CAPTIONS[0], params)
    alone_1 = single_image(generator, CAPTIONS[1], params)
    assert np.abs(as_array(first) - alone_0).max() <= 2  # the "before" image is untouched
    assert np.abs(as_array(second) - alone_1).mean() > 2  # the "after" image is changed…
    # …towards the first image: it keeps the first image's layout
    assert np.abs(as_array(second) - alone_0).mean() < 0.75 * np.abs(alone_1 - alone_0).mean()


def test_self_attention_maps_shared_during_first_p_steps_only(generator):
    params = SampleParams(seed=3, p2p_threshold=0.5, cfg_scale=8.0)  # 4 steps: steps 0 and 1 share
    controller = generator.controller
    controller.record, controller.records = True, []
    try:
        generator.generate(CAPTIONS, params)
    finally:
        controller.record = False
    records = controller.records
    layers = {r.layer for r in records}
    assert layers and all(layer.endswith("attn1") for layer in layers)
    assert sorted({r.step for r in records}) == list(range(STEPS))
    assert len(records) == len(layers) * STEPS
    for record in records:
        maps = record.probabilities  # rows [uncond 0, uncond 1, cond 0, cond 1]
        assert maps.shape[0] == 4
        expected_shared = shares_step(record.step, STEPS, params.p2p_threshold)
        assert record.shared == expected_shared
        if expected_shared:
            assert torch.equal(maps[1], maps[0]) and torch.equal(maps[3], maps[2])
        else:
            assert (maps[1] - maps[0]).abs().max() > 1e-5
            assert (maps[3] - maps[2]).abs().max() > 1e-5
    assert {r.step for r in records if r.shared} == {0, 1}


def test_fast_attention_path_equals_explicit_probabilities(generator):
    params = SampleParams(seed=5, p2p_threshold=0.7, cfg_scale=8.0)
    fast = generator.generate(CAPTIONS, params)
    generator.controller.record = True
    try:
        explicit = generator.generate(CAPTIONS, params)
    finally:
        generator.controller.record, generator.controller.records = False, []
    for a, b in zip(fast, explicit, strict=True):
        assert np.abs(as_array(a) - as_array(b)).max() <= 2


def test_both_images_get_the_same_initial_and_ancestral_noise(generator, monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as sd_module
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_module

    drawn: list[torch.Tensor] = []

    def recording(original):
        def wrapper(*args, **kwargs):
            tensor = original(*args, **kwargs)
            drawn.append(tensor.detach().clone())
            return tensor

        return wrapper

    monkeypatch.setattr(sd_module, "randn_tensor", recording(sd_module.randn_tensor))
    monkeypatch.setattr(euler_module, "randn_tensor", recording(euler_module.randn_tensor))
    generator.generate(CAPTIONS, SampleParams(seed=9, p2p_threshold=0.3, cfg_scale=8.0))
    assert len(drawn) == 1 + STEPS  # initial latents + one ancestral draw per step
    for noise in drawn:
        assert noise.shape[0] == 2
        assert torch.equal(noise[0], noise[1])
        assert noise[0].abs().sum() > 0


def test_share_rule_follows_the_reference_sampler():
    assert not any(shares_step(i, 10, 0.0) for i in range(10))
    assert [shares_step(i, 10, 1.0) for i in range(10)] == [True] * 9 + [False]
    assert [shares_step(i, 5, 0.5) for i in range(5)] == [True, True, False, False, False]
    assert [shares_step(i, 100, 0.1) for i in range(100)].count(True) == 10
    assert shares_step(0, 1, 0.2) and not shares_step(0, 1, 0.0)


def test_sample_params_and_seeds_are_reproducible_and_in_range():
    seeds = pair_seeds(0, 12, 100)
    assert seeds == pair_seeds(0, 12, 100) and len(set(seeds)) == 100
    assert seeds != pair_seeds(0, 13, 100) and seeds != pair_seeds(1, 12, 100)
    params = [draw_sample_params(s) for s in seeds]
    assert all(0.1 <= p.p2p_threshold <= 0.9 and 7.5 <= p.cfg_scale <= 15 for p in params)
    assert draw_sample_params(seeds[0]) == params[0]
    spread = np.std([p.p2p_threshold for p in params])
    assert spread > 0.15  # uniform over (0.1, 0.9) has std ≈ 0.23


def test_bad_resolution_is_refused():
    with pytest.raises(ValueError, match="resolution"):
        PairGenerator(build_tiny_sd_pipeline(), num_steps=2, resolution=31)
