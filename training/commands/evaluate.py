"""Evaluate edit models with the paper's metrics, over a sweep of image guidance.

For every model and every s_I (default 1.0, 1.2, …, 2.2 at s_T 7.5, as in the paper's
trade-off figure) each sample is edited through the engine with seed = --seed + its index,
and scored: CLIP image similarity (input vs output) and CLIP directional similarity (needs
input/output captions in the data), plus, against the data's edited image, L1, CLIP-I and
DINO. Writes results.csv, results.json and tradeoff.png (one line per model).

A model is a hub id or diffusers folder, optionally with a LoRA: MODEL+LORA.safetensors;
prefix NAME= to name it in the table and plot.

examples:
  instruct-edit-train evaluate --data generated_data --split test --limit 200 \\
      --model timbrooks/instruct-pix2pix --model mine=timbrooks/instruct-pix2pix+my_lora/pytorch_lora_weights.safetensors \\
      --output eval_out
  instruct-edit-train evaluate --data magicbrush_test --model osunlp/InstructPix2Pix-MagicBrush \\
      --image-guidance 1.5 --dino facebook/dino-vits16 --output eval_mb
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.errors import InvalidInput
from training.commands.check_data import add_data_arguments, columns_from
from training.data import PairRow, check_rows, drop_bad_rows, load_pairs
from training.metrics import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    ClipMetrics,
    DinoMetrics,
    clip_directional_similarity,
    clip_image_similarity,
    l1_distance,
)

HELP = "score models with CLIP image/directional similarity, L1, CLIP-I and DINO over an s_I sweep"
PAPER_IMAGE_GUIDANCE = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
METRICS = ("clip_image", "clip_direction", "l1", "clip_i", "dino")


@dataclass(frozen=True)
class ModelSpec:
    label: str
    model: str
    lora: str | None


def parse_model_spec(text: str) -> ModelSpec:
    label = None
    if "=" in text and "/" not in text.split("=", 1)[0]:
        label, text = text.split("=", 1)
    model, _, lora = text.partition("+")
    if not model:
        raise InvalidInput(
            f"--model {text!r}: give a model id or folder (optionally +LORA_FILE)", field="model"
        )
    if label is None:
        if lora:
            lora_path = Path(lora)
            label = (
                lora_path.parent.name
                if lora_path.name == "pytorch_lora_weights.safetensors"
                else lora_path.stem
            )
        else:
            label = Path(model).name or model
    return ModelSpec(label, model, lora or None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, positional=False)
    parser.set_defaults(split="test")
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="[NAME=]MODEL[+LORA.safetensors]; repeat to compare",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for results.csv/json and tradeoff.png"
    )
    parser.add_argument(
        "--image-guidance",
        type=float,
        nargs="+",
        default=list(PAPER_IMAGE_GUIDANCE),
        help="s_I values (default: 1.0 … 2.2 step 0.2)",
    )
    parser.add_argument("--text-guidance", type=float, default=7.5, help="s_T (default 7.5)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--resolution", type=int, default=512, help="working size (default 512)")
    parser.add_argument(
        "--limit", type=int, default=0, help="use the first N usable rows (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    parser.add_argument(
        "--clip", default=DEFAULT_CLIP, help=f"CLIP id or folder (default {DEFAULT_CLIP})"
    )
    parser.add_argument(
        "--dino",
        default=DEFAULT_DINO,
        help=f"DINO id or folder, or 'none' (default {DEFAULT_DINO})",
    )
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    parser.add_argument("--dtype", default="auto", help="auto|fp32|fp16|bf16")
    parser.add_argument("--save-images", action="store_true", help="also save every edited image")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace results already in --output"
    )


def run(args: argparse.Namespace) -> int:
    from engine.editor import Editor
    from engine.request import EditParams, LoraSpec

    specs = [parse_model_spec(text) for text in args.model]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise InvalidInput(
            f"two models share a name ({', '.join(labels)}); name them with NAME=MODEL",
            field="model",
        )
    output: Path = args.output
    if (output / "results.json").exists() and not args.overwrite:
        raise InvalidInput(
            f"{output / 'results.json'} exists; pass --overwrite or another --output",
            field="output",
        )

    pairs = load_pairs(args.data, format=args.format, columns=columns_from(args), split=args.split)
    bad = check_rows(pairs.rows)
    for problem in bad:
        print(f"skipping bad row: {problem}")
    rows = drop_bad_rows(pairs.rows, bad)
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise InvalidInput(f"no usable rows in {args.data} (split {args.split})", field="data")
    has_captions = all(r.input_caption and r.output_caption for r in rows)
    if not has_captions:
        print(
            "note: the data has no input/output captions, so CLIP directional similarity is not computed"
        )
    print(
        f"{len(rows)} samples × {len(args.image_guidance)} image-guidance values × {len(specs)} models"
    )

    clip = ClipMetrics(args.clip)
    dino = None if args.dino.lower() == "none" else DinoMetrics(args.dino)
    sources = [r.input_image.open() for r in rows if r.input_image is not None]
    truths = [r.edited_image.open() for r in rows if r.edited_image is not None]
    source_clip = clip.images(sources)
    truth_clip = clip.images(truths)
    truth_dino = dino.images(truths) if dino else None
    caption_in = clip.texts([r.input_caption or "" for r in rows]) if has_captions else None
    caption_out = clip.texts([r.output_caption or "" for r in rows]) if has_captions else None

    table: list[dict[str, Any]] = []
    for spec in specs:
        editor = Editor(spec.model, device=args.device, dtype=args.dtype)
        loras = (LoraSpec(spec.lora),) if spec.lora else ()
        for s_i in args.image_guidance:
            edited = []
            for index, (row, source) in enumerate(zip(rows, sources, strict=True)):
                params = EditParams(
                    row.instruction, steps=args.steps, seed=args.seed + index,
                    resolution=args.resolution, loras=loras,
                    options={"text_guidance": args.text_guidance, "image_guidance": s_i},
                )  # fmt: skip
                result = editor.edit(source, params)[0]
                edited.append(result)
                if args.save_images:
                    folder = output / "images" / spec.label / f"s_i-{s_i:.1f}"
                    folder.mkdir(parents=True, exist_ok=True)
                    result.save(folder / f"{index:05d}.png")
            table.append(score(spec.label, s_i, args.text_guidance, rows, edited, clip, dino,
                               source_clip, truth_clip, truth_dino, caption_in, caption_out))  # fmt: skip
            print(format_row(table[-1]))
        del editor

    output.mkdir(parents=True, exist_ok=True)
    write_tables(output, table, vars_for_json(args, specs, len(rows)))
    plot = plot_tradeoff(table, output / "tradeoff.png") if has_captions else None
    print(
        f"wrote {output / 'results.csv'}, {output / 'results.json'}" + (f", {plot}" if plot else "")
    )
    return 0


def score(
    label: str, s_i: float, s_t: float, rows: list[PairRow], edited: list[Image.Image],
    clip: ClipMetrics, dino: DinoMetrics | None, source_clip: Any, truth_clip: Any,
    truth_dino: Any, caption_in: Any, caption_out: Any,
) -> dict[str, Any]:  # fmt: skip
    edited_clip = clip.images(edited)
    row: dict[str, Any] = {
        "model": label,
        "image_guidance": s_i,
        "text_guidance": s_t,
        "samples": len(rows),
    }
    row["clip_image"] = float(clip_image_similarity(source_clip, edited_clip).mean())
    row["clip_direction"] = (
        float(clip_directional_similarity(source_clip, edited_clip, caption_in, caption_out).mean())
        if caption_in is not None
        else math.nan
    )
    truths = [r.edited_image.open() for r in rows if r.edited_image is not None]
    row["l1"] = float(
        np.mean([l1_distance(out, truth) for out, truth in zip(edited, truths, strict=True)])
    )
    row["clip_i"] = float(clip_image_similarity(truth_clip, edited_clip).mean())
    row["dino"] = (
        float(clip_image_similarity(truth_dino, dino.images(edited)).mean()) if dino else math.nan
    )
    return row


def format_row(row: dict[str, Any]) -> str:
    values = "  ".join(f"{m} {row[m]:.4f}" for m in METRICS if not math.isnan(row[m]))
    return f"{row['model']:>16}  s_I {row['image_guidance']:.1f}  {values}"


def vars_for_json(args: argparse.Namespace, specs: list[ModelSpec], samples: int) -> dict[str, Any]:
    return {
        "data": str(args.data), "split": args.split, "samples": samples,
        "models": [{"label": s.label, "model": s.model, "lora": s.lora} for s in specs],
        "text_guidance": args.text_guidance, "image_guidance": list(args.image_guidance),
        "steps": args.steps, "resolution": args.resolution, "seed": args.seed, "clip": args.clip, "dino": args.dino,
    }  # fmt: skip


def write_tables(output: Path, table: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    fields = ["model", "image_guidance", "text_guidance", "samples", *METRICS]
    with open(output / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in table:
            writer.writerow(
                {
                    k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k])
                    for k in fields
                }
            )
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in table
    ]
    (output / "results.json").write_text(
        json.dumps({"settings": settings, "results": clean}, indent=2) + "\n"
    )


def plot_tradeoff(table: list[dict[str, Any]], path: Path) -> Path:
    """The paper's figure: x = CLIP directional similarity, y = CLIP image similarity, a line per model."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in table:
        series.setdefault(row["model"], []).append(
            (row["clip_direction"], row["clip_image"], row["image_guidance"])
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pillow(series, path)
    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=120)
    for label, points in series.items():
        xs, ys, _ = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", label=label)
        for x, y, g in points:
            axes.annotate(f"{g:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("CLIP text-image direction similarity")
    axes.set_ylabel("CLIP image similarity")
    axes.set_title("Edit strength vs. consistency (labels: s_I)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _plot_with_pillow(series: dict[str, list[tuple[float, float, float]]], path: Path) -> Path:
    from PIL import ImageDraw

    width, height, margin = 640, 480, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [p[0] for points in series.values() for p in points]
    ys = [p[1] for points in series.values() for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1e-6
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-6

    def at(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
                height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin))  # fmt: skip

    draw.rectangle((margin, margin, width - margin, height - margin), outline="black")
    draw.text((width // 2 - 120, height - 30), "CLIP text-image direction similarity", fill="black")
    draw.text((5, 20), "CLIP image similarity (labels: s_I)", fill="black")
    draw.text((margin, height - margin + 5), f"{x0:.3f}", fill="black")
    draw.text((width - margin - 30, height - margin + 5), f"{x1:.3f}", fill="black")
    draw.text((5, height - margin - 10), f"{y0:.3f}", fill="black")
    draw.text((5, margin), f"{y1:.3f}", fill="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for number, (label, points) in enumerate(series.items()):
        colour = colours[number % len(colours)]
        corners = [at(x, y) for x, y, _ in points]
        if len(corners) > 1:
            draw.line(corners, fill=colour, width=2)
        for (px, py), (_, _, g) in zip(corners, points, strict=True):
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
            draw.text((px + 4, py - 12), f"{g:.1f}", fill=colour)
        draw.text((width - margin - 150, margin + 10 + 14 * number), label, fill=colour)
    image.save(path)
    return path
