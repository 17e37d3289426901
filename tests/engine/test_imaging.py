"""Working size, alpha, masks and detail preservation, through the editor and as pure functions."""

import numpy as np
import pytest
from PIL import Image

from engine import imaging
from engine.editor import Editor
from engine.errors import InvalidInput
from engine.request import EditParams


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [((1024, 512), 512, (512, 256)), ((33, 17), 64, (64, 32)), ((1, 4096), 512, (8, 512)),
     ((4096, 3), 256, (256, 8)), ((500, 500), 64, (64, 64))],
)
def test_working_size(size: tuple[int, int], resolution: int, expected: tuple[int, int]) -> None:
    got = imaging.working_size(*size, resolution)
    assert got == expected
    assert got[0] % 8 == 0 and got[1] % 8 == 0


@pytest.mark.parametrize("size", [(33, 17), (1, 300), (400, 3), (257, 1), (64, 64), (130, 70)])
def test_any_size_round_trips_to_the_input_size(editor: Editor, size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (120, 30, 200))
    results = editor.edit(image, EditParams("make it red", steps=2, resolution=64, variants=2))
    assert [r.size for r in results] == [size, size]
    assert all(r.mode == "RGB" for r in results)


def test_alpha_is_preserved_exactly(editor: Editor) -> None:
    rgba = np.zeros((40, 60, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 40, 10)
    rgba[:, :20, 3] = 0  # fully transparent
    rgba[:, 20:40, 3] = 128  # half
    rgba[:, 40:, 3] = 255  # opaque
    rgba[:, :20, :3] = (1, 2, 3)  # hidden colour must survive untouched
    result = editor.edit(Image.fromarray(rgba, "RGBA"), EditParams("make it blue", steps=2, resolution=64))[0]
    out = np.asarray(result)
    assert result.mode == "RGBA"
    assert np.array_equal(out[..., 3], rgba[..., 3])
    assert np.array_equal(out[:, :20], rgba[:, :20])
    assert not np.array_equal(out[:, 40:, :3], rgba[:, 40:, :3])  # the edit did something


def test_mask_restricts_the_edit(editor: Editor) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:30, 20:50] = 255
    mask[30:34, 20:50] = 100  # soft edge
    result = np.asarray(
        editor.edit(image, EditParams("make it red", steps=2, resolution=64), Image.fromarray(mask, "L"))[0]
    )
    source = np.asarray(image)
    outside = mask == 0
    assert np.array_equal(result[outside], source[outside])
    assert not np.array_equal(result[10:30, 20:50], source[10:30, 20:50])


def test_mask_of_the_wrong_size_is_refused(editor: Editor) -> None:
    with pytest.raises(InvalidInput, match="mask is 10×10 but the image is 20×20") as err:
        editor.edit(Image.new("RGB", (20, 20)), EditParams("x"), Image.new("L", (10, 10)))
    assert err.value.field == "mask"


def test_empty_instruction_returns_the_input_unchanged(editor: Editor) -> None:
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 50, 4), dtype=np.uint8), "RGBA")
    results = editor.edit(image, EditParams("   ", variants=2))
    assert len(results) == 2
    assert all(np.array_equal(np.asarray(r), np.asarray(image)) for r in results)


def test_zero_sized_image_is_refused(editor: Editor) -> None:
    with pytest.raises(InvalidInput, match="0×5"):
        editor.edit(Image.new("RGB", (0, 5)), EditParams("x"))


def line_art(size: int) -> np.ndarray:
    art = np.ones((size, size, 3), dtype=np.float32)
    art[::16, :] = 0.0  # 1-pixel lines that any downscale-upscale would blur
    art[:, 7::32] = 0.0
    return art


def test_unchanged_working_result_gives_back_the_full_input_exactly() -> None:
    full = line_art(1024)
    working = imaging.resize_float(full, (256, 256))
    back = imaging.bring_back_to_input_size(full, working, working.copy(), preserve_detail=True)
    assert np.array_equal(back, full)
    blurred = imaging.bring_back_to_input_size(full, working, working.copy(), preserve_detail=False)
    assert np.abs(blurred - full).max() > 0.3  # what an editor without it would return


def test_detail_preserved_through_the_editor_for_a_recolouring(editor: Editor) -> None:
    """A stand-in model that only recolours: lines at full resolution must survive it."""
    art = (line_art(1024) * 255).astype(np.uint8)

    def recolour(working_input, params, resolved, *args):
        assert working_input.shape == (256, 256, 3)  # the family's working size
        tinted = working_input.copy()
        tinted[..., 0] = np.clip(tinted[..., 0] + 0.2, 0, 1)
        return [tinted]

    editor._edit_working = recolour  # the model part, replaced by a stand-in
    result = np.asarray(editor.edit(Image.fromarray(art), EditParams("make it warmer", resolution=256))[0])
    lines = art[..., 1] == 0
    # the lines stay 1 pixel wide and dark; the paper between them stays paper
    assert result[lines][:, 1].max() <= 2
    assert result[~lines][:, 1].min() >= 250
    assert abs(int(np.median(result[~lines][:, 0])) - 255) <= 1  # red channel saturated on paper


def test_bad_mode_images_are_normalised() -> None:
    prepared = imaging.prepare_image(Image.new("LA", (4, 4), (100, 0)))
    assert prepared.original.mode == "RGBA"
    assert np.allclose(prepared.rgb, 1.0)  # transparent → white paper for the model
    assert imaging.prepare_image(Image.new("L", (4, 4), 7)).original.mode == "RGB"
