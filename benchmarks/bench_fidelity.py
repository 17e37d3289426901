"""How much of the picture an edit changes outside the edited area: before and after issue 9.

A detail-rich 4096² picture (1-px line art, small lettering-like glyphs, fine noise texture,
flat colour and gradients) is edited by a stand-in model that recolours one disc at the
working size (512 px long side) and returns every other working-size pixel unchanged. That
isolates what the tool itself does to pixels the instruction did not touch:

  before (plugin scales): the plugin scaled the region to the working size with Qt's smooth
      transformation, the engine edited at that size, the plugin scaled the answer back up;
  after (full resolution): the plugin sends the region at full resolution and the engine
      applies the working-size change to the full-resolution pixels (detail preservation).

A real model also alters untouched areas slightly (its VAE round trip); after the change that
alteration arrives as a blurred change on the sharp input instead of a blurred picture, so the
figures here are the tool's share of the drift, the part this project controls.

    python benchmarks/bench_fidelity.py [--size 4096] [--resolution 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from benchmarks._common import print_table  # noqa: E402
from engine import imaging  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def detail_rich_picture(size: int, seed: int = 0) -> np.ndarray:
    """H×W×3 uint8: gradients, flat areas, 1-px lines, glyph-like marks and fine noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    picture = np.stack([0.3 + 0.6 * x, 0.4 + 0.4 * y, 0.8 - 0.5 * x * y], axis=-1)
    picture[size // 2 :, : size // 2] = (0.85, 0.8, 0.7)  # a flat colour field
    texture = rng.normal(0.0, 0.04, (size, size, 1)).astype(np.float32)
    picture[: size // 2, size // 2 :] += texture[: size // 2, size // 2 :]
    out = np.clip(picture * 255.0, 0, 255).astype(np.uint8)
    for k in range(0, size, 37):  # 1-px hatching lines
        out[k, :] = 20
        out[:, (k * 3) % size] = 30
    glyphs = rng.random((size // 8, size // 8)) < 0.08  # 2-px "lettering" dots and bars
    marks = np.kron(glyphs, np.ones((8, 8), dtype=bool))
    marks &= (np.arange(size)[:, None] % 8 < 2) | (np.arange(size)[None, :] % 8 < 2)
    out[marks] = (10, 10, 60)
    return out


def vae_like(working: np.ndarray, seed: int = 1) -> np.ndarray:
    """What a VAE round trip does to untouched areas, roughly: a slight blur and noise."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    t = torch.from_numpy(np.ascontiguousarray(working)).permute(2, 0, 1)[:, None]
    kernel = torch.tensor([0.25, 0.5, 0.25])
    k2 = (kernel[:, None] * kernel[None, :])[None, None]
    blurred = F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), k2)[:, 0].permute(1, 2, 0).numpy()
    noise = rng.normal(0.0, 1.0 / 255.0, working.shape).astype(np.float32)
    return np.clip(blurred + noise, 0.0, 1.0)


def edit_disc(working: np.ndarray, drift: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The stand-in model: recolour a disc at the working size; everything else unchanged
    (or, with `drift`, changed the way a VAE round trip changes it)."""
    if drift:
        edited, disc = edit_disc(working)
        return np.where(disc[..., None], edited, vae_like(working)), disc
    h, w = working.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    disc = (x - w * 0.7) ** 2 + (y - h * 0.3) ** 2 < (min(w, h) * 0.12) ** 2
    edited = working.copy()
    edited[disc] = edited[disc] * 0.3 + np.array([0.7, 0.1, 0.1], dtype=np.float32)
    return np.clip(edited, 0.0, 1.0), disc


def qt_scaled(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """The old plugin path: QImage.scaled(…, SmoothTransformation), as the plugin did."""
    from instruct_edit.qt import QImage, Qt, image_bytes

    h, w = rgb.shape[:2]
    rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], axis=-1)
    image = QImage(rgba.tobytes(), w, h, w * 4, QImage.Format.Format_RGBA8888)
    out = image.scaled(width, height, Qt.AspectRatioMode.IgnoreAspectRatio,
                       Qt.TransformationMode.SmoothTransformation)
    out = out.convertToFormat(QImage.Format.Format_RGBA8888)
    data = np.frombuffer(image_bytes(out), np.uint8)
    return data.reshape(height, out.bytesPerLine() // 4, 4)[:, :width, :3].copy()


def outside_mask(disc_working: np.ndarray, size: tuple[int, int], margin: int) -> np.ndarray:
    """Full-size pixels farther than `margin` from the (upscaled) edited disc."""
    from PIL import Image, ImageFilter

    width, height = size
    disc = Image.fromarray(disc_working.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    grown = disc.filter(ImageFilter.MaxFilter(2 * margin + 1)) if margin else disc
    return np.asarray(grown) == 0


def drift(source: np.ndarray, result: np.ndarray, where: np.ndarray) -> list[str]:
    diff = np.abs(source.astype(np.int16) - result.astype(np.int16)).max(axis=-1)[where]
    return [f"{(diff > 0).mean() * 100:.1f} %", f"{diff.mean():.2f}", f"{int(diff.max())}",
            f"{(diff > 8).mean() * 100:.1f} %"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "plugin"))
    from instruct_edit.qt import QApplication


    _app = QApplication.instance() or QApplication([])
    source = detail_rich_picture(args.size)
    full = source.astype(np.float32) / 255.0
    work_w, work_h = imaging.working_size(args.size, args.size, args.resolution, multiple=8)

    margin = max(8, args.size // args.resolution * 4)
    rows = []
    for drift_model in (False, True):
        # Before: the plugin scaled to the working size and back (Qt smooth transformation).
        small = qt_scaled(source, work_w, work_h)
        edited_small, disc = edit_disc(small.astype(np.float32) / 255.0, drift_model)
        before = qt_scaled(np.rint(edited_small * 255).astype(np.uint8), args.size, args.size)
        # After: full resolution in, the working-size change applied on the full-resolution input.
        working = np.clip(imaging.resize_float(full, (work_w, work_h)), 0.0, 1.0)
        edited_working, disc = edit_disc(working, drift_model)
        after_rgb = imaging.bring_back_to_input_size(full, working, edited_working, True)
        after = np.clip(np.rint(after_rgb * 255.0), 0, 255).astype(np.uint8)
        outside = outside_mask(disc, (args.size, args.size), margin)
        model = "VAE-like drift" if drift_model else "exact outside"
        rows.append([model, "before: plugin scales (old)", *drift(source, before, outside)])
        rows.append([model, "after: full resolution + detail", *drift(source, after, outside)])
    header = ["stand-in model", "path", "pixels changed outside", "mean |Δ| (0-255)", "max |Δ|",
              "|Δ| > 8"]
    print(f"# Change outside the edited area, {args.size}² detail-rich picture, working size "
          f"{work_w}×{work_h}, margin {margin} px around the edit ({cpu_name()})\n")
    print_table(rows, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
