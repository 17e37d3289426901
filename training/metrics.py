"""The paper's edit metrics (CLIP image / directional similarity) and MagicBrush's (L1, CLIP-I, DINO).

- CLIP image similarity: cos(E_img(input), E_img(output)): how much of the input survives.
- CLIP directional similarity: cos(E_img(output) − E_img(input), E_txt(output caption) −
  E_txt(input caption)): whether the change goes the way the captions say.
- With a ground-truth edited image: L1 (mean absolute pixel difference in [0, 1]),
  CLIP-I = cos(E_img(output), E_img(truth)) and DINO = cos of DINO [CLS] features.

Images reach CLIP as the processor wants them: pixels scaled to [0, 1], then CLIP's own
mean/std (the paper's reference code fed [-1, 1], a bug we do not repeat). CLIP embeddings
come from the same `ClipSimilarity` the data-generation filter uses, so both agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import ModelNotFound

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"  # MagicBrush's DINO metric model
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClipMetrics:
    """CLIP image and directional similarity for batches of edits."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> None:
        from training.datagen.clip_filter import ClipSimilarity

        try:
            self.clip = ClipSimilarity(model, device=device)
        except OSError as err:
            raise ModelNotFound(
                f"cannot load the CLIP model {model!r}: {err}. Pass --clip with a transformers "
                "CLIP id (downloaded once) or a local folder",
                field="clip",
            ) from err

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return F.normalize(self.clip.image_embeddings([i.convert("RGB") for i in images]), dim=-1)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.clip.text_embeddings(list(texts)), dim=-1)


def clip_image_similarity(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Per edit: cosine of the (normalised) input and output image embeddings."""
    return F.cosine_similarity(inputs, outputs, dim=-1)


def clip_directional_similarity(
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    input_captions: torch.Tensor,
    output_captions: torch.Tensor,
) -> torch.Tensor:
    """Per edit: cosine of the image change and the caption change (each from normalised embeddings)."""
    return F.cosine_similarity(outputs - inputs, output_captions - input_captions, dim=-1)


def l1_distance(output: Image.Image, truth: Image.Image) -> float:
    """Mean absolute difference in [0, 1]; the truth is resized to the output's size if needed."""
    if truth.size != output.size:
        truth = truth.resize(output.size, Image.Resampling.BICUBIC)
    a = np.asarray(output.convert("RGB"), dtype=np.float32) / 255.0
    b = np.asarray(truth.convert("RGB"), dtype=np.float32) / 255.0
    return float(np.abs(a - b).mean())


class DinoMetrics:
    """DINO [CLS] embeddings (any transformers ViT/DINO/DINOv2 id or folder)."""

    def __init__(self, model: str = DEFAULT_DINO, device: str | torch.device = "cpu") -> None:
        from transformers import AutoConfig, AutoModel

        try:
            self.model = AutoModel.from_pretrained(model).to(device).eval()
        except (OSError, ValueError) as err:
            raise ModelNotFound(
                f"cannot load the DINO model {model!r}: {err}. Pass --dino with a transformers "
                "ViT/DINO id or a local folder, or --dino none to skip the DINO metric",
                field="dino",
            ) from err
        self.device = torch.device(device)
        config = AutoConfig.from_pretrained(model)
        self.size, self.mean, self.std = _vision_preprocessing(
            model, int(getattr(config, "image_size", 224))
        )

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([to_model_pixels(i, self.size, self.mean, self.std) for i in images])
        hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
        return F.normalize(hidden[:, 0].float(), dim=-1)


def _vision_preprocessing(model: str, default_size: int) -> tuple[int, tuple, tuple]:
    """Size, mean and std from the model's preprocessor_config.json, ImageNet's if it has none."""
    import json

    from transformers.utils import cached_file

    path = cached_file(
        model, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
    )
    if path is None:
        return default_size, IMAGENET_MEAN, IMAGENET_STD
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    size = config.get("crop_size") or config.get("size") or default_size
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default_size
    return (
        int(size),
        tuple(config.get("image_mean", IMAGENET_MEAN)),
        tuple(config.get("image_std", IMAGENET_STD)),
    )


def to_model_pixels(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Short side to `size` (bicubic), centre crop, [0, 1], then the model's mean/std."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    unit = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (unit - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
