"""The paper's CLIP filter for generated pairs: three similarities, thresholds, best k.

For a pair (image_0, image_1) with captions (caption_0, caption_1), on L2-normalised CLIP
embeddings (as the reference `ClipSimilarity` does):
- `clip_sim_0` = cos(image_0, caption_0) and `clip_sim_1` = cos(image_1, caption_1): each
  image shows its caption;
- `clip_sim_dir` = cos(image_1 − image_0, caption_1 − caption_0): the change between the
  images goes the way the change between the captions does;
- `clip_sim_image` = cos(image_0, image_1): the two images are still the same scene.
A sample passes when both image–caption similarities and the directional similarity reach
0.2 and the image–image similarity reaches 0.75 (the paper's config; the reference script's
default is 0.7). Survivors are ranked by directional similarity and at most k = 4 are kept.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
T = TypeVar("T")


@dataclass(frozen=True)
class ClipThresholds:
    image_caption: float = 0.2
    direction: float = 0.2
    image_image: float = 0.75

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"CLIP threshold {name} must be a cosine in [-1, 1], got {value}")


@dataclass(frozen=True)
class ClipScores:
    clip_sim_0: float
    clip_sim_1: float
    clip_sim_dir: float
    clip_sim_image: float

    def passes(self, thresholds: ClipThresholds) -> bool:
        return (
            self.clip_sim_0 >= thresholds.image_caption
            and self.clip_sim_1 >= thresholds.image_caption
            and self.clip_sim_dir >= thresholds.direction
            and self.clip_sim_image >= thresholds.image_image
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def scores_from_embeddings(
    image_0: torch.Tensor, image_1: torch.Tensor, text_0: torch.Tensor, text_1: torch.Tensor
) -> list[ClipScores]:
    """The four similarities per row of (batch, dim) embeddings (normalised here)."""
    image_0, image_1 = F.normalize(image_0.float(), dim=-1), F.normalize(image_1.float(), dim=-1)
    text_0, text_1 = F.normalize(text_0.float(), dim=-1), F.normalize(text_1.float(), dim=-1)
    sim_0 = F.cosine_similarity(image_0, text_0, dim=-1)
    sim_1 = F.cosine_similarity(image_1, text_1, dim=-1)
    sim_dir = F.cosine_similarity(image_1 - image_0, text_1 - text_0, dim=-1)
    sim_image = F.cosine_similarity(image_0, image_1, dim=-1)
    return [
        ClipScores(float(a), float(b), float(c), float(d))
        for a, b, c, d in zip(sim_0, sim_1, sim_dir, sim_image, strict=True)
    ]


class TopK(Generic[T]):
    """Keeps the k passing items with the highest directional similarity, in O(k) memory.

    Ties keep the earlier item (the insertion counter breaks them), so a run is repeatable.
    """

    def __init__(self, k: int, thresholds: ClipThresholds) -> None:
        if k < 1:
            raise ValueError(f"keep at least one sample per pair (k >= 1), got {k}")
        self.k = k
        self.thresholds = thresholds
        self.seen = 0
        self.passed = 0
        self._heap: list[tuple[float, int, T]] = []

    def offer(self, item: T, scores: ClipScores) -> bool:
        """Consider one sample; returns whether it passed the thresholds."""
        order = self.seen
        self.seen += 1
        if not scores.passes(self.thresholds):
            return False
        self.passed += 1
        entry = (scores.clip_sim_dir, -order, item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)
        return True

    def best(self) -> list[T]:
        """The kept items, best directional similarity first."""
        return [item for _, _, item in sorted(self._heap, key=lambda e: e[:2], reverse=True)]


def select_top_k(
    candidates: Sequence[tuple[T, ClipScores]], thresholds: ClipThresholds, k: int = 4
) -> list[T]:
    top: TopK[T] = TopK(k, thresholds)
    for item, scores in candidates:
        top.offer(item, scores)
    return top.best()


class ClipSimilarity:
    """CLIP embeddings of images and captions (any transformers CLIP id or folder)."""

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model, dtype=dtype).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except OSError as err:
            raise OSError(
                f"cannot load the CLIP model {model!r} ({err}); pass --clip-model with a "
                "transformers CLIP id or a local folder that holds one"
            ) from err
        try:
            self.processor = CLIPImageProcessor.from_pretrained(model)
        except OSError:
            # A folder without preprocessor_config.json: CLIP's standard preprocessing.
            size = self.model.config.vision_config.image_size
            self.processor = CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.device)
        return _features(self.model.get_text_features(**tokens)).float()

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return _features(
            self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        ).float()

    def pair_scores(
        self, image_0: Image.Image, image_1: Image.Image, text_embeddings: torch.Tensor
    ) -> ClipScores:
        """Scores of one pair; `text_embeddings` = `text_embeddings([caption_0, caption_1])`."""
        images = self.image_embeddings([image_0, image_1])
        return scores_from_embeddings(
            images[0:1], images[1:2], text_embeddings[0:1], text_embeddings[1:2]
        )[0]


def _features(output: torch.Tensor | object) -> torch.Tensor:
    # transformers 5 may return a model output object instead of the bare projected tensor.
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"unexpected CLIP feature output {type(output).__name__}")
