"""The CLIP filter: the paper's four similarities, its thresholds and the best-k selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.datagen.clip_filter import (
    ClipScores,
    ClipSimilarity,
    ClipThresholds,
    TopK,
    scores_from_embeddings,
    select_top_k,
)


def unit(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


def test_similarities_on_constructed_embeddings():
    # text_0 = x, text_1 = y; images lean towards their captions but share a "scene" axis z.
    text_0, text_1 = unit(1, 0, 0), unit(0, 1, 0)
    image_0, image_1 = unit(0.6, 0, 0.8), unit(0, 0.6, 0.8)
    scores = scores_from_embeddings(image_0, image_1, text_0, text_1)[0]
    assert scores.clip_sim_0 == pytest.approx(0.6)
    assert scores.clip_sim_1 == pytest.approx(0.6)
    # image_1 - image_0 = (-0.6, 0.6, 0) is parallel to text_1 - text_0 = (-1, 1, 0)
    assert scores.clip_sim_dir == pytest.approx(1.0)
    assert scores.clip_sim_image == pytest.approx(0.64)


def test_embeddings_are_normalised_before_the_direction():
    text_0, text_1 = unit(1, 0), unit(0, 1)
    # same directions as above but image_1 ten times longer: unnormalised, the difference
    # would point almost along image_1 alone.
    image_0, image_1 = unit(1, 0), unit(0, 10)
    scores = scores_from_embeddings(image_0, image_1, text_0, text_1)[0]
    assert scores.clip_sim_dir == pytest.approx(1.0)
    assert scores.clip_sim_image == pytest.approx(0.0, abs=1e-6)


def test_opposite_change_has_negative_direction():
    text_0, text_1 = unit(1, 0, 0), unit(0, 1, 0)
    image_0, image_1 = unit(0, 0.6, 0.8), unit(0.6, 0, 0.8)  # swapped: the edit goes backwards
    assert scores_from_embeddings(image_0, image_1, text_0, text_1)[
        0
    ].clip_sim_dir == pytest.approx(-1.0)


def test_batched_rows_are_scored_independently():
    torch.manual_seed(0)
    rows = [torch.randn(5, 8) for _ in range(4)]
    batched = scores_from_embeddings(*rows)
    for i, scores in enumerate(batched):
        alone = scores_from_embeddings(*(r[i : i + 1] for r in rows))[0]
        assert scores.as_dict() == pytest.approx(alone.as_dict(), abs=1e-6)


PASSING = ClipScores(0.2, 0.2, 0.2, 0.75)  # exactly on every default threshold


def test_thresholds_are_inclusive_and_each_one_can_reject():
    thresholds = ClipThresholds()
    assert (thresholds.image_caption, thresholds.direction, thresholds.image_image) == (
        0.2,
        0.2,
        0.75,
    )
    assert PASSING.passes(thresholds)
    just_below = 0.2 - 1e-6
    assert not ClipScores(just_below, 0.3, 0.3, 0.9).passes(thresholds)
    assert not ClipScores(0.3, just_below, 0.3, 0.9).passes(thresholds)
    assert not ClipScores(0.3, 0.3, just_below, 0.9).passes(thresholds)
    assert not ClipScores(0.3, 0.3, 0.3, 0.75 - 1e-6).passes(thresholds)
    # the reference script's looser image threshold lets that last one through
    assert ClipScores(0.3, 0.3, 0.3, 0.72).passes(ClipThresholds(image_image=0.7))


def test_thresholds_must_be_cosines():
    with pytest.raises(ValueError, match="image_image"):
        ClipThresholds(image_image=1.5)


def test_top_k_keeps_the_best_directions_that_pass():
    candidates = [
        ("a", ClipScores(0.3, 0.3, 0.25, 0.8)),
        ("b", ClipScores(0.3, 0.3, 0.90, 0.5)),  # best direction but images too different
        ("c", ClipScores(0.3, 0.3, 0.40, 0.8)),
        ("d", ClipScores(0.1, 0.3, 0.80, 0.8)),  # image 0 misses its caption
        ("e", ClipScores(0.3, 0.3, 0.35, 0.9)),
        ("f", ClipScores(0.3, 0.3, 0.21, 0.9)),
        ("g", ClipScores(0.3, 0.3, 0.60, 0.76)),
        ("h", ClipScores(0.3, 0.3, 0.19, 0.9)),  # direction below 0.2
    ]
    assert select_top_k(candidates, ClipThresholds(), k=4) == ["g", "c", "e", "a"]
    assert select_top_k(candidates, ClipThresholds(), k=10) == ["g", "c", "e", "a", "f"]
    top = TopK(2, ClipThresholds())
    for item, scores in candidates:
        top.offer(item, scores)
    assert (top.seen, top.passed, top.best()) == (8, 5, ["g", "c"])


def test_top_k_ties_keep_the_earlier_sample():
    same = ClipScores(0.3, 0.3, 0.5, 0.8)
    assert select_top_k(
        [("first", same), ("second", same), ("third", same)], ClipThresholds(), k=2
    ) == [
        "first",
        "second",
    ]


def test_clip_model_scores_match_its_embeddings(tiny_clip_dir):
    clip = ClipSimilarity(str(tiny_clip_dir))
    red = Image.new("RGB", (40, 32), (220, 30, 30))
    blue = Image.new("RGB", (40, 32), (30, 30, 220))
    text = clip.text_embeddings(["a red square", "a blue square"])
    assert text.shape == (2, clip.model.config.projection_dim)
    scores = clip.pair_scores(red, blue, text)
    images = clip.image_embeddings([red, blue])
    expected = scores_from_embeddings(images[0:1], images[1:2], text[0:1], text[1:2])[0]
    assert scores.as_dict() == pytest.approx(expected.as_dict(), abs=1e-5)
    # the same image twice is perfectly similar to itself, whatever the weights
    assert clip.pair_scores(red, red, text).clip_sim_image == pytest.approx(1.0, abs=1e-5)
    assert math.isfinite(scores.clip_sim_dir)
    assert F.cosine_similarity(images[0:1], images[1:2]).item() == pytest.approx(
        scores.clip_sim_image, abs=1e-5
    )


def test_missing_clip_model_names_the_option(tmp_path):
    with pytest.raises(OSError, match="--clip-model"):
        ClipSimilarity(str(tmp_path / "nowhere"))
