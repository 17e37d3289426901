"""What int8 quantization of a UNet is calibrated on: the engine's own denoising of a few
synthetic pictures, recorded at the UNet's inputs.

Post-training quantization fixes one scale per activation from the values it sees here, so the
inputs must look like an edit's: latents noised along the scheduler's own trajectory, the image
latent of a picture, and the three guidance rows (instruction, "", zero image). Recording the real
loop gets all of that right without restating it. The pictures are drawn, not loaded (no data
ships with the engine): flat regions, gradients, hard edges and some grain, which are what
illustrations are made of.
"""

from __future__ import annotations

import numpy as np

# Instructions of the kinds painters give (colour, light, style, content); the text encoder is
# the model's own, so their embeddings are real ones.
CALIBRATION_INSTRUCTIONS = (
    "make it evening",
    "turn it into a watercolor painting",
    "make the dragon red",
    "add snow on the ground",
    "give it a cyberpunk style",
)
CALIBRATION_SIZE = 256  # px: activation ranges depend on content, not on size; 4× cheaper than 512
CALIBRATION_STEPS = 5  # steps per picture: spread over the whole noise range
CALIBRATION_PICTURES = 4  # 3 to calibrate on (15 UNet calls), 1 held out to check the result


def calibration_picture(index: int, size: int = CALIBRATION_SIZE) -> np.ndarray:
    """An H×W×3 float32 picture in [0, 1]: a sky gradient, a ground, a few shapes with hard
    edges and a little grain. Deterministic per index."""
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    top, bottom = rng.random(3), rng.random(3)
    picture = top * (1 - y[..., None]) + bottom * y[..., None]
    horizon = 0.45 + 0.3 * rng.random()
    picture[y > horizon] = rng.random(3) * 0.6
    for _ in range(3 + index % 3):
        cx, cy, r = rng.random(), rng.random(), 0.05 + 0.2 * rng.random()
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        picture[inside] = rng.random(3)
    picture += rng.normal(0.0, 0.02, picture.shape)
    return np.clip(picture, 0.0, 1.0).astype(np.float32)
