"""The evaluate command and its metrics, with a tiny random CLIP and a tiny random DINO ViT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.cli import main
from training.commands.evaluate import Sweep, explore_values, parse_sweep, parse_sweep_values
from training.metrics import (
    ClipMetrics,
    DinoMetrics,
    clip_directional_similarity,
    clip_image_similarity,
    l1_distance,
    to_model_pixels,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from tests.tiny_models.sd import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4,
        },
        projection_dim=16,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=37,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("dino") / "tiny-dino"
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def test_clip_sees_unit_range_pixels_with_clips_mean_and_std(tiny_clip: Path) -> None:
    from transformers import CLIPModel

    image = Image.linear_gradient("L").convert("RGB").resize((48, 40))
    ours = ClipMetrics(str(tiny_clip)).images([image])
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = to_model_pixels(image, 32, CLIP_MEAN, CLIP_STD)[None]
    assert pixels.min() < -1.5 and pixels.max() > 1.5  # [0,1] minus mean over std, not [-1,1]
    with torch.no_grad():
        expected = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    assert torch.allclose(ours, F.normalize(expected, dim=-1), atol=2e-3)


def test_similarity_formulas() -> None:
    inputs = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    outputs = F.normalize(torch.tensor([[1.0, 1.0, 0.0]]), dim=-1)
    assert clip_image_similarity(inputs, inputs).item() == pytest.approx(1.0)
    assert clip_image_similarity(inputs, outputs).item() == pytest.approx(2**-0.5)
    same_way = clip_directional_similarity(inputs, outputs, torch.zeros(1, 3), outputs - inputs)
    other_way = clip_directional_similarity(inputs, outputs, torch.zeros(1, 3), inputs - outputs)
    assert same_way.item() == pytest.approx(1.0) and other_way.item() == pytest.approx(-1.0)
    black, white = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (4, 4), "white")
    assert l1_distance(black, white) == pytest.approx(1.0) and l1_distance(black, black) == 0.0


def test_dino_embeddings_are_normalised_cls_features(tiny_dino: Path) -> None:
    dino = DinoMetrics(str(tiny_dino))
    a, b = Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")
    embeddings = dino.images([a, b, a])
    assert embeddings.shape[0] == 3
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(embeddings[0], embeddings[2]) and not torch.allclose(
        embeddings[0], embeddings[1]
    )


def test_evaluate_sweeps_models_and_guidance_into_tables_and_a_plot(
    tmp_path: Path, tiny_model_dir: Path, tiny_clip: Path, tiny_dino: Path, pairs_dir: Path
) -> None:
    from training.model_init import add_lora, save_lora
    from training.model_init import load_base as load

    base = load(tiny_model_dir)
    add_lora(base.unet, rank=2)
    with torch.no_grad():  # a LoRA that does something (fresh ones start as a no-op)
        for name, param in base.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    lora = save_lora(base.unet, tmp_path / "lora")

    out = tmp_path / "eval"
    code = main([
        "evaluate", "--data", str(pairs_dir), "--split", "all", "--limit", "2",
        "--model", str(tiny_model_dir), "--model", f"tuned={tiny_model_dir}+{lora}",
        "--image-guidance", "1.0", "1.6", "--steps", "2", "--resolution", "64",
        "--clip", str(tiny_clip), "--dino", str(tiny_dino), "--device", "cpu", "--dtype", "fp32",
        "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["model"], float(r["image_guidance"])) for r in rows] == [
        ("tiny-ip2p", 1.0),
        ("tiny-ip2p", 1.6),
        ("tuned", 1.0),
        ("tuned", 1.6),
    ]
    for row in rows:
        assert int(row["samples"]) == 2 and float(row["text_guidance"]) == 7.5
        for metric in ("clip_image", "clip_direction", "clip_i", "dino"):
            assert -1.0 <= float(row[metric]) <= 1.0
        assert 0.0 <= float(row["l1"]) <= 1.0
    assert rows[0]["clip_image"] != rows[2]["clip_image"]  # the LoRA changed the edits
    for row in rows:  # the family-generic columns, filled for InstructPix2Pix rows too
        assert (row["family"], row["sweep"]) == ("sd-ip2p", "image_guidance")
        assert float(row["value"]) == float(row["image_guidance"])
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["models"][1] == {
        "label": "tuned", "model": str(tiny_model_dir), "lora": str(lora), "family": "sd-ip2p",
        "sweep": "image_guidance", "values": [1.0, 1.6], "steps": 2, "resolution": 64,
    }  # fmt: skip
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.width > 200
    # The same command again is refused rather than overwriting the results.
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(pairs_dir),
                "--model",
                str(tiny_model_dir),
                "--output",
                str(out),
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def tiny_kontext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models.flux import save_tiny_kontext

    return save_tiny_kontext(tmp_path_factory.mktemp("models") / "tiny-kontext")


def test_evaluate_sweeps_each_familys_own_guidance(
    tmp_path: Path, tiny_model_dir: Path, tiny_kontext_dir: Path, tiny_clip: Path,
    tiny_dino: Path, pairs_dir: Path,
) -> None:  # fmt: skip
    out = tmp_path / "eval"
    code = main([
        "evaluate", "--data", str(pairs_dir), "--split", "all", "--limit", "1",
        "--model", str(tiny_model_dir), "--model", str(tiny_kontext_dir),
        "--image-guidance", "1.0", "1.6", "--steps", "2", "--resolution", "64",
        "--clip", str(tiny_clip), "--dino", str(tiny_dino), "--device", "cpu", "--dtype", "fp32",
        "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = [(r["model"], r["family"], r["sweep"], float(r["value"])) for r in rows]
    assert table == [
        ("tiny-ip2p", "sd-ip2p", "image_guidance", 1.0),
        ("tiny-ip2p", "sd-ip2p", "image_guidance", 1.6),
        # Kontext: its recommended guidance (2.5, the family default) ± its Explore step (1.0)
        ("tiny-kontext", "flux-kontext", "guidance", 1.5),
        ("tiny-kontext", "flux-kontext", "guidance", 2.5),
        ("tiny-kontext", "flux-kontext", "guidance", 3.5),
    ]
    for row in rows[:2]:  # InstructPix2Pix rows as before
        assert float(row["image_guidance"]) == float(row["value"])
        assert float(row["text_guidance"]) == 7.5
    for row in rows[2:]:  # the s_I / s_T columns are empty for other families
        assert row["image_guidance"] == "" and row["text_guidance"] == ""
    for row in rows:
        assert int(row["samples"]) == 1
        for metric in ("clip_image", "clip_direction", "clip_i", "dino"):
            assert -1.0 <= float(row[metric]) <= 1.0
    assert len({r["clip_image"] for r in rows[2:]}) > 1  # the guidance changed the Kontext edits
    report = json.loads((out / "results.json").read_text())
    kontext = report["settings"]["models"][1]
    assert (kontext["family"], kontext["sweep"], kontext["values"]) == (
        "flux-kontext",
        "guidance",
        [1.5, 2.5, 3.5],
    )
    assert (kontext["steps"], kontext["resolution"]) == (2, 64)
    assert report["results"][2]["image_guidance"] is None
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.width > 200


def test_evaluate_refuses_a_sweep_a_model_does_not_take(
    tmp_path: Path, tiny_model_dir: Path, tiny_kontext_dir: Path, pairs_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "eval"
    code = main([
        "evaluate", "--data", str(pairs_dir), "--model", str(tiny_kontext_dir),
        "--model", str(tiny_model_dir), "--sweep", "guidance=2,3", "--output", str(out),
    ])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "--sweep guidance" in error and "'tiny-ip2p'" in error
    assert "image_guidance" in error  # what it does take
    assert not out.exists()  # refused before any work
    assert main([
        "evaluate", "--data", str(pairs_dir), "--model", str(tiny_kontext_dir),
        "--sweep", "guidance=2,99", "--output", str(out),
    ]) == 2  # fmt: skip
    assert "--sweep guidance" in capsys.readouterr().err


def test_sweep_values_parse_and_default_around_the_recommendation() -> None:
    from engine.families import get_family

    kontext, qwen = get_family("flux-kontext"), get_family("qwen-image-edit")
    guidance = next(s for s in kontext.params if s.name == "guidance")
    assert parse_sweep("guidance=1.5, 3") == Sweep("guidance", ("1.5", "3"))
    assert parse_sweep_values(guidance, parse_sweep("guidance=1.5,3")) == (1.5, 3.0)
    assert explore_values(guidance, 2.5) == (1.5, 2.5, 3.5)
    assert explore_values(guidance, 0.5) == (0.0, 0.5, 1.5)  # clamped to the minimum
    assert explore_values(guidance, 10.0) == (9.0, 10.0)  # clamped, no repeats
    true_cfg = next(s for s in qwen.params if s.explore)
    assert true_cfg.name == "true_cfg_scale" and explore_values(true_cfg, 4.0) == (3.0, 4.0, 5.0)
    with pytest.raises(Exception, match="--sweep"):
        parse_sweep("guidance")
