"""The editor reproduces diffusers' StableDiffusionInstructPix2PixPipeline (fp32, same seed)."""

import threading

import numpy as np
import pytest
import torch

from engine.editor import Editor
from engine.errors import EditCancelled
from engine.request import EditParams
from tests.tiny_models.sd import build_tiny_pipeline

IP2P_DEFAULTS = {"text_guidance": 7.5, "image_guidance": 1.5}


def ip2p(instruction: str, steps: int, seed: int = 0, **options) -> EditParams:
    """EditParams with the InstructPix2Pix family's options (defaults spelled out)."""
    return EditParams(instruction, steps=steps, seed=seed, options={**IP2P_DEFAULTS, **options})


def diffusers_reference(image: np.ndarray, params: EditParams) -> np.ndarray:
    pipe = build_tiny_pipeline()  # same seed → same weights as the editor's fixture
    out = pipe(
        params.instruction,
        image=torch.from_numpy(image).permute(2, 0, 1)[None],  # [0, 1], as diffusers expects
        num_inference_steps=params.steps,
        guidance_scale=params.options["text_guidance"],
        image_guidance_scale=params.options["image_guidance"],
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
    )
    return out.images[0]


@pytest.mark.parametrize(("s_t", "s_i"), [(7.5, 1.5), (7.5, 1.0), (4.0, 2.2)])
def test_equals_diffusers_pipeline(editor: Editor, working_image: np.ndarray, s_t: float, s_i: float) -> None:
    params = ip2p("make it red", text_guidance=s_t, image_guidance=s_i, steps=4, seed=11)
    ours = editor.edit_working_size(working_image, params)[0]
    np.testing.assert_allclose(ours, diffusers_reference(working_image, params), atol=1e-5)


class UNetSpy:
    """Records every UNet call's batch and conditioning, and its output."""

    def __init__(self, editor: Editor) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        unet = editor.pipe.unet
        self._forward = unet.forward

        def spy(sample, timestep, encoder_hidden_states, **kwargs):
            out = self._forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
            self.calls.append({"sample": sample, "text": encoder_hidden_states, "out": out[0]})
            return out

        unet.forward = spy


def test_image_guidance_below_one_uses_all_three_branches(editor: Editor, working_image: np.ndarray) -> None:
    spy = UNetSpy(editor)
    captured: list[torch.Tensor] = []
    original_step = type(editor.pipe.scheduler).step

    def step(self, model_output, *args, **kwargs):
        captured.append(model_output)
        return original_step(self, model_output, *args, **kwargs)

    params = ip2p("make it red", text_guidance=7.5, image_guidance=0.5, steps=2, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(editor.pipe.scheduler), "step", step)
        ours = editor.edit_working_size(working_image, params)[0]
    call = spy.calls[0]
    assert call["sample"].shape[0] == 3  # [e_c, e_i, e_u]
    image_part = call["sample"][:, 4:]
    assert torch.equal(image_part[0], image_part[1]) and not image_part[0].eq(0).all()
    assert image_part[2].eq(0).all()  # null image = zero latent
    assert torch.equal(call["text"][1], call["text"][2]) and not torch.equal(call["text"][0], call["text"][1])
    e_c, e_i, e_u = call["out"].chunk(3)
    torch.testing.assert_close(captured[0], e_u + 7.5 * (e_c - e_i) + 0.5 * (e_i - e_u))
    # diffusers switches all guidance off below 1; we must not.
    assert np.abs(ours - diffusers_reference(working_image, params)).max() > 1e-3


def test_unit_image_guidance_skips_the_unconditional_branch(editor: Editor, working_image: np.ndarray) -> None:
    spy = UNetSpy(editor)
    editor.edit_working_size(working_image, ip2p("make it red", image_guidance=1.0, steps=2))
    assert [c["sample"].shape[0] for c in spy.calls] == [2, 2]


def test_variants_equal_single_runs(editor: Editor, working_image: np.ndarray) -> None:
    params = EditParams("make it blue", steps=3, seed=5, variants=3)
    batched = editor.edit_working_size(working_image, params)
    assert len(batched) == 3
    for k in range(3):
        single = editor.edit_working_size(working_image, params.for_variant(k))[0]
        np.testing.assert_allclose(batched[k], single, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3  # different seeds, different images


def test_same_request_same_output(editor: Editor, working_image: np.ndarray) -> None:
    params = EditParams("make it blue", steps=3, seed=2)
    first = editor.edit_working_size(working_image, params)[0]
    second = editor.edit_working_size(working_image, params)[0]
    assert np.array_equal(first, second)


def test_cancel_stops_within_one_step(editor: Editor, working_image: np.ndarray) -> None:
    spy = UNetSpy(editor)
    cancel = threading.Event()
    steps_seen: list[int] = []

    def on_progress(p) -> None:
        steps_seen.append(p.step)
        if p.step == 2:
            cancel.set()

    with pytest.raises(EditCancelled):
        editor.edit_working_size(
            working_image, EditParams("make it red", steps=10), on_progress=on_progress, cancel=cancel
        )
    assert steps_seen == [1, 2]
    assert len(spy.calls) == 2


def test_progress_reports_every_step_and_previews(editor: Editor, working_image: np.ndarray) -> None:
    seen = []
    editor.edit_working_size(
        working_image, EditParams("x y", steps=4), on_progress=seen.append, preview_every=2
    )
    assert [(p.step, p.total) for p in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    previews = [p.preview for p in seen]
    assert previews[0] is None and previews[1] is not None and previews[1].mode == "RGB"


def test_out_of_memory_retries_with_smaller_batches(editor: Editor, working_image: np.ndarray) -> None:
    params = EditParams("make it blue", steps=2, seed=5, variants=4)
    expected = editor.edit_working_size(working_image, params)
    original = editor._run
    batch_sizes: list[int] = []

    def run(working_input, instruction, resolved, seeds, *args):
        batch_sizes.append(len(seeds))
        if len(seeds) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return original(working_input, instruction, resolved, seeds, *args)

    editor._run = run
    got = editor.edit_working_size(working_image, params)
    assert batch_sizes == [4, 2, 1, 1, 1, 1]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_out_of_memory_with_one_variant_on_the_cpu_is_reported(editor: Editor, working_image: np.ndarray) -> None:
    from engine.errors import OutOfMemory

    def run(*args):
        raise MemoryError()

    editor._run = run
    with pytest.raises(OutOfMemory, match="even one variant at a time"):
        editor.edit_working_size(working_image, EditParams("x", steps=1))


def test_few_step_scheduler_option(editor: Editor, working_image: np.ndarray) -> None:
    default = editor.edit_working_size(working_image, EditParams("make it red", steps=4))[0]
    dpm = editor.edit_working_size(working_image, ip2p("make it red", steps=4, scheduler="dpm++"))[0]
    assert dpm.shape == default.shape and np.isfinite(dpm).all()
    assert np.abs(dpm - default).max() > 1e-3
