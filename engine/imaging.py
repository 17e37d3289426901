"""Image policy: working size, alpha, masks and bringing the result back to the input's size.

Everything here is a pure function over PIL images / numpy arrays, so it is tested without
a model. Float arrays are H×W×C in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import InvalidInput

# The model sees transparent regions as white paper, so line art on a transparent layer
# stays visible to it; the original alpha is put back afterwards.
PAPER_WHITE = 1.0
MAX_INPUT_PIXELS = 16384 * 16384


def working_size_long_side(width: int, height: int, resolution: int, multiple: int = 8) -> tuple[int, int]:
    """InstructPix2Pix's rule: the long side becomes `resolution` (see `working_size`)."""
    return working_size(width, height, resolution, multiple)


def working_size_area(width: int, height: int, pixels: int, multiple: int = 16) -> tuple[int, int]:
    """The DiT families' rule: about `pixels` pixels at the input's aspect ratio.

    Each side is rounded to the nearest multiple of `multiple` (at least one multiple), as
    Qwen-Image's `calculate_dimensions` does; any aspect ratio works.
    """
    if width < 1 or height < 1:
        raise InvalidInput(f"the image is {width}×{height} pixels; it needs at least 1×1", "image")
    scale = (pixels / (width * height)) ** 0.5

    def snap(side: int) -> int:
        return max(multiple, round(side * scale / multiple) * multiple)

    return snap(width), snap(height)


def working_size(width: int, height: int, resolution: int, multiple: int = 8) -> tuple[int, int]:
    """Scale so the long side is `resolution`; both sides multiples of `multiple` (≥ one multiple).

    Any aspect ratio works: a 1×4096 line becomes 8×512 rather than failing.
    """
    if width < 1 or height < 1:
        raise InvalidInput(f"the image is {width}×{height} pixels; it needs at least 1×1", "image")
    scale = resolution / max(width, height)

    def snap(side: int) -> int:
        return max(multiple, round(side * scale / multiple) * multiple)

    return snap(width), snap(height)


@dataclass(frozen=True)
class PreparedImage:
    """The input split into what the model sees (RGB over white) and what it must not touch."""

    original: Image.Image  # RGB or RGBA, the caller's pixels
    rgb: np.ndarray  # H×W×3 float32, composited over white
    alpha: np.ndarray | None  # H×W float32 in [0, 1], or None for opaque images

    @property
    def size(self) -> tuple[int, int]:
        return self.original.size


def prepare_image(image: Image.Image) -> PreparedImage:
    """Normalise any PIL mode to RGB/RGBA and composite transparency over white paper."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInput(f"the image is {width}×{height} pixels; it needs at least 1×1", "image")
    if width * height > MAX_INPUT_PIXELS:
        raise InvalidInput(
            f"the image has {width * height} pixels; the limit is {MAX_INPUT_PIXELS}", "image"
        )
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    original = image.convert("RGBA" if has_alpha else "RGB")
    pixels = np.asarray(original, dtype=np.float32) / 255.0
    if not has_alpha:
        return PreparedImage(original, pixels, None)
    alpha = pixels[..., 3]
    rgb = pixels[..., :3] * alpha[..., None] + PAPER_WHITE * (1.0 - alpha[..., None])
    return PreparedImage(original, rgb, alpha)


def resize_float(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H×W×C float array to (width, height): antialiased bicubic, identity if equal."""
    width, height = size
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return pixels
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    # Antialiasing only matters (and is only supported) where a side shrinks.
    antialias = width < pixels.shape[1] or height < pixels.shape[0]
    out = F.interpolate(tensor, size=(height, width), mode="bicubic", antialias=antialias)
    return out[0].permute(1, 2, 0).numpy()


def resize_to_working_size(prepared: PreparedImage, size: tuple[int, int]) -> np.ndarray:
    return np.clip(resize_float(prepared.rgb, size), 0.0, 1.0)


def bring_back_to_input_size(
    input_full: np.ndarray,
    input_working: np.ndarray,
    result_working: np.ndarray,
    preserve_detail: bool,
) -> np.ndarray:
    """The edited RGB at the input's full size.

    With `preserve_detail`, the edit is applied as a change: input + upscale(result − input at
    working size). Where the edit changed nothing, the full-resolution input (its line art,
    its texture) comes back exactly, instead of a blurred upscale of the working-size image.
    """
    height, width = input_full.shape[:2]
    if result_working.shape[:2] == (height, width):
        return result_working
    if not preserve_detail:
        return np.clip(resize_float(result_working, (width, height)), 0.0, 1.0)
    change = resize_float(result_working - input_working, (width, height))
    return np.clip(input_full + change, 0.0, 1.0)


def prepare_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A grayscale mask (0 = keep, 255 = edit) as H×W float weights; sizes must match."""
    if mask.size != size:
        raise InvalidInput(
            f"the mask is {mask.size[0]}×{mask.size[1]} but the image is {size[0]}×{size[1]}; "
            "send a mask of the image's size",
            "mask",
        )
    if mask.mode in ("RGBA", "LA"):
        mask = mask.getchannel("A")
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


def finish(prepared: PreparedImage, edited_rgb: np.ndarray, mask: np.ndarray | None) -> Image.Image:
    """Blend by the mask, restore the original alpha, and return the caller's mode.

    Pixels the edit may not touch (mask 0, fully transparent) are copied byte for byte.
    """
    original = np.asarray(prepared.original)
    rgb = edited_rgb
    if mask is not None:
        rgb = prepared.rgb + mask[..., None] * (edited_rgb - prepared.rgb)
    if prepared.alpha is not None:
        alpha = prepared.alpha[..., None]
        # Undo the compositing over white so semi-transparent edges keep their colour.
        safe_alpha = np.maximum(alpha, 1e-6)
        rgb = (rgb - PAPER_WHITE * (1.0 - alpha)) / safe_alpha
    out_rgb = np.clip(np.rint(np.clip(rgb, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    keep = np.zeros(original.shape[:2], dtype=bool)
    if mask is not None:
        keep |= mask <= 0.0
    if prepared.alpha is None:
        out = np.where(keep[..., None], original, out_rgb)
        return Image.fromarray(out, "RGB")
    keep |= prepared.alpha <= 0.0
    out = np.concatenate([out_rgb, original[..., 3:4]], axis=-1)
    out = np.where(keep[..., None], original, out)
    return Image.fromarray(out, "RGBA")


def pil_to_model_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H×W×3 in [0, 1] → 1×3×H×W in [-1, 1], as the VAE expects."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None] * 2.0 - 1.0


def model_tensor_to_float(decoded: torch.Tensor) -> np.ndarray:
    """VAE output B×3×H×W in [-1, 1] → B×H×W×3 float32 in [0, 1] (diffusers' denormalisation)."""
    return (decoded / 2 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).cpu().numpy()


# Linear map from SD 1.x latents to RGB: a cheap preview without running the VAE decoder.
SD1_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latent_preview(
    latents: torch.Tensor,
    factors: tuple[tuple[float, ...], ...] = SD1_LATENT_RGB,
    bias: tuple[float, float, float] | None = None,
) -> Image.Image:
    """An RGB thumbnail (latent resolution) of the first sample's latents (C×H×W, channels
    mapped linearly by `factors` (C rows of R, G, B) plus `bias`)."""
    matrix = torch.tensor(factors, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), matrix)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, dtype=torch.float32)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(rgb, "RGB")
