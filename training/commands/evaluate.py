"""Evaluate edit models with the paper's metrics, over a sweep of one guidance parameter.

Any model family the engine runs. The swept parameter ("axis") of a model:
- InstructPix2Pix families (they take `image_guidance`): s_I over --image-guidance (default
  1.0, 1.2, …, 2.2) at s_T --text-guidance (default 7.5), as in the paper's trade-off figure;
- other families: their first parameter with an Explore step (FLUX Kontext / klein:
  `guidance`, Qwen-Image-Edit: `true_cfg_scale`) at recommended − step, recommended,
  recommended + step (clamped to the parameter's range);
- `--sweep NAME=V1,V2,…` sets the axis of every model (each must take NAME).
Steps and working size default to each model's recommendation (catalogue entry, else its
family's defaults: 20 and 512 for InstructPix2Pix).

For every model and every value each sample is edited through the engine with seed = --seed
+ its index, and scored: CLIP image similarity (input vs output) and CLIP directional
similarity (needs input/output captions in the data), plus, against the data's edited image,
L1, CLIP-I and DINO. Writes results.csv, results.json and tradeoff.png (one line per model).

A model is a hub id, catalogue id or diffusers folder, optionally with a LoRA:
MODEL+LORA.safetensors; prefix NAME= to name it in the table and plot.

examples:
  instruct-edit-train evaluate --data generated_data --split test --limit 200 \\
      --model timbrooks/instruct-pix2pix --model mine=timbrooks/instruct-pix2pix+my_lora/pytorch_lora_weights.safetensors \\
      --output eval_out
  instruct-edit-train evaluate --data magicbrush_test --model osunlp/InstructPix2Pix-MagicBrush \\
      --image-guidance 1.5 --dino facebook/dino-vits16 --output eval_mb
  instruct-edit-train evaluate --data magicbrush_test --model black-forest-labs/FLUX.1-Kontext-dev \\
      --sweep guidance=1.5,2.5,3.5,4.5 --output eval_kontext
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from engine.editor import Editor
    from engine.families import Family, ParamSpec

HELP = (
    "score models with CLIP image/directional similarity, L1, CLIP-I and DINO over a guidance sweep"
)
PAPER_IMAGE_GUIDANCE = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
PAPER_TEXT_GUIDANCE = 7.5
METRICS = ("clip_image", "clip_direction", "l1", "clip_i", "dino")
FIELDS = (
    "model",
    "family",
    "sweep",
    "value",
    "image_guidance",
    "text_guidance",
    "samples",
    *METRICS,
)
SYMBOLS = {"image_guidance": "s_I", "text_guidance": "s_T"}  # the paper's names


@dataclass(frozen=True)
class ModelSpec:
    label: str
    model: str
    lora: str | None


@dataclass(frozen=True)
class Sweep:
    """`--sweep NAME=V1,V2,…` as typed (values parsed once the model's family is known)."""

    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Axis:
    """What one model is evaluated over: `name` at each of `values`, with `fixed` options."""

    name: str
    values: tuple[Any, ...]
    fixed: dict[str, Any]


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


def parse_sweep(text: str | None) -> Sweep | None:
    if text is None:
        return None
    name, _, values = text.partition("=")
    parts = tuple(v.strip() for v in values.split(",") if v.strip())
    if not name.strip() or not parts:
        raise InvalidInput(
            f"--sweep {text!r}: write NAME=V1,V2,… (e.g. guidance=1.5,2.5,3.5)", field="sweep"
        )
    return Sweep(name.strip(), parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, positional=False)
    parser.set_defaults(split="test")
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="[NAME=]MODEL[+LORA.safetensors]; repeat to compare (models of any family)",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for results.csv/json and tradeoff.png"
    )
    parser.add_argument(
        "--image-guidance",
        type=float,
        nargs="+",
        default=list(PAPER_IMAGE_GUIDANCE),
        help="InstructPix2Pix models: the s_I values swept (default: 1.0 … 2.2 step 0.2)",
    )
    parser.add_argument(
        "--text-guidance",
        type=float,
        default=PAPER_TEXT_GUIDANCE,
        help=f"InstructPix2Pix models: s_T (default {PAPER_TEXT_GUIDANCE})",
    )
    parser.add_argument(
        "--sweep",
        metavar="NAME=V1,V2,...",
        help="sweep this model parameter instead, for every model (e.g. guidance=1.5,2.5,3.5); "
        "default: s_I for InstructPix2Pix models, else the family's first explorable parameter "
        "at its recommended value ± one step",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default: each model's recommendation; 20 for InstructPix2Pix)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="working size (default: each model's recommendation; 512 for InstructPix2Pix)",
    )
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


# ------------------------------------------------------------------------------ the sweep axis


def known_family(model: str) -> Family | None:
    """The family of `model` when it can be told without loading it (catalogue id, local folder
    or file, hub id in the cache); None otherwise (the editor detects it when it loads)."""
    from engine.errors import EngineError
    from engine.families import catalogue_entry, detect_family, get_family
    from engine.sources import read_model_index, resolve_model_source

    try:
        entry = catalogue_entry(model)
        if entry is not None and entry.get("family"):
            return get_family(entry["family"])
        source = resolve_model_source(model)
        if source.kind == "hub" and read_model_index(source) is None:
            return None
        return detect_family(source)
    except EngineError:
        return None  # the editor reports it, with its own message, when it loads the model


def family_spec(family: Family, name: str) -> ParamSpec | None:
    return next((spec for spec in family.params if spec.name == name), None)


def takes_image_guidance(family: Family) -> bool:
    return family_spec(family, "image_guidance") is not None


def check_sweep_name(family: Family, sweep: Sweep, label: str) -> ParamSpec:
    spec = family_spec(family, sweep.name)
    if spec is None:
        takes = ", ".join(s.name for s in family.params) or "no model parameters"
        raise InvalidInput(
            f"--sweep {sweep.name}: model {label!r} ({family.label}) has no parameter "
            f"{sweep.name!r}; it takes {takes}",
            field="sweep",
        )
    return spec


def parse_sweep_values(spec: ParamSpec, sweep: Sweep) -> tuple[Any, ...]:
    values = []
    for text in sweep.values:
        try:
            if spec.kind == "float":
                value: Any = float(text)
            elif spec.kind == "int":
                value = int(text)
            elif spec.kind == "bool":
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value = lowered in ("true", "1", "yes")
            else:
                value = text
            values.append(spec.check(value))
        except (ValueError, InvalidInput) as err:
            reason = str(err) if isinstance(err, InvalidInput) else f"{text!r} is not a {spec.kind}"
            raise InvalidInput(f"--sweep {sweep.name}: {reason}", field="sweep") from err
    return tuple(values)


def explore_values(spec: ParamSpec, recommended: Any) -> tuple[Any, ...]:
    """recommended − step, recommended, recommended + step, clamped to the range, no repeats."""
    step = spec.explore or 0.0
    found: list[Any] = []
    for raw in (recommended - step, recommended, recommended + step):
        if spec.minimum is not None:
            raw = max(raw, spec.minimum)
        if spec.maximum is not None:
            raw = min(raw, spec.maximum)
        value = round(raw) if spec.kind == "int" else round(float(raw), 6)
        if value not in found:
            found.append(value)
    return tuple(found)


def choose_axis(editor: Editor, sweep: Sweep | None, args: argparse.Namespace, label: str) -> Axis:
    from engine.request import EditParams

    family = editor.family
    ip2p = takes_image_guidance(family)
    fixed: dict[str, Any] = {"text_guidance": args.text_guidance} if ip2p else {}
    if sweep is not None:
        spec = check_sweep_name(family, sweep, label)
        fixed.pop(sweep.name, None)
        return Axis(sweep.name, parse_sweep_values(spec, sweep), fixed)
    if ip2p:
        return Axis("image_guidance", tuple(float(v) for v in args.image_guidance), fixed)
    spec = next((s for s in family.params if s.explore and s.kind in ("float", "int")), None)
    if spec is None:
        raise InvalidInput(
            f"model {label!r} ({family.label}) has no parameter to sweep by default; "
            "name one with --sweep NAME=V1,V2,…",
            field="sweep",
        )
    recommended = editor.resolve(EditParams("")).options[spec.name]
    return Axis(spec.name, explore_values(spec, recommended), fixed)


# ------------------------------------------------------------------------------ the command


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
    sweep = parse_sweep(args.sweep)
    if sweep is not None:  # refuse a name a model does not take before any work
        for spec in specs:
            family = known_family(spec.model)
            if family is not None:
                parse_sweep_values(check_sweep_name(family, sweep, spec.label), sweep)
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
    print(f"{len(rows)} samples × {len(specs)} models")

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
    runs: list[dict[str, Any]] = []
    for spec in specs:
        editor = Editor(spec.model, device=args.device, dtype=args.dtype)
        axis = choose_axis(editor, sweep, args, spec.label)
        loras = (LoraSpec(spec.lora),) if spec.lora else ()
        shared = dict(steps=args.steps, resolution=args.resolution, loras=loras)
        resolved = editor.resolve(EditParams("", **shared, options=axis.fixed))
        runs.append({"label": spec.label, "model": spec.model, "lora": spec.lora,
                     "family": editor.family.id, "sweep": axis.name, "values": list(axis.values),
                     "steps": resolved.steps, "resolution": resolved.resolution})  # fmt: skip
        print(f"{spec.label}: {editor.family.label}, {axis.name} over "
              f"{', '.join(format_value(v) for v in axis.values)}, "
              f"{resolved.steps} steps at {resolved.resolution}")  # fmt: skip
        for value in axis.values:
            options = {**axis.fixed, axis.name: value}
            used = editor.resolve(EditParams("", **shared, options=options)).options
            edited = []
            for index, (row, source) in enumerate(zip(rows, sources, strict=True)):
                params = EditParams(
                    row.instruction, seed=args.seed + index, **shared, options=options
                )
                result = editor.edit(source, params)[0]
                edited.append(result)
                if args.save_images:
                    folder = output / "images" / spec.label / image_folder(axis.name, value)
                    folder.mkdir(parents=True, exist_ok=True)
                    result.save(folder / f"{index:05d}.png")
            row_out = {"model": spec.label, "family": editor.family.id, "sweep": axis.name,
                       "value": value, "image_guidance": used.get("image_guidance", math.nan),
                       "text_guidance": used.get("text_guidance", math.nan)}  # fmt: skip
            row_out.update(score(rows, edited, clip, dino, source_clip, truth_clip, truth_dino,
                                 caption_in, caption_out))  # fmt: skip
            table.append(row_out)
            print(format_row(table[-1]))
        del editor

    output.mkdir(parents=True, exist_ok=True)
    write_tables(output, table, vars_for_json(args, runs, len(rows)))
    plot = plot_tradeoff(table, output / "tradeoff.png") if has_captions else None
    print(
        f"wrote {output / 'results.csv'}, {output / 'results.json'}" + (f", {plot}" if plot else "")
    )
    return 0


def image_folder(name: str, value: Any) -> str:
    if name == "image_guidance":
        return f"s_i-{value:.1f}"  # as before
    return f"{name}-{format_value(value)}"


def score(
    rows: list[PairRow], edited: list[Image.Image], clip: ClipMetrics, dino: DinoMetrics | None,
    source_clip: Any, truth_clip: Any, truth_dino: Any, caption_in: Any, caption_out: Any,
) -> dict[str, Any]:  # fmt: skip
    edited_clip = clip.images(edited)
    row: dict[str, Any] = {"samples": len(rows)}
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


def format_value(value: Any) -> str:
    """A swept value for labels: one decimal where that is exact (the paper's s_I labels)."""
    if isinstance(value, float):
        return f"{value:.1f}" if round(value, 1) == value else f"{value:g}"
    return str(value)


def axis_name(name: str) -> str:
    return SYMBOLS.get(name, name)


def format_row(row: dict[str, Any]) -> str:
    values = "  ".join(f"{m} {row[m]:.4f}" for m in METRICS if not _missing(row[m]))
    return f"{row['model']:>16}  {axis_name(row['sweep'])} {format_value(row['value'])}  {values}"


def vars_for_json(
    args: argparse.Namespace, runs: list[dict[str, Any]], samples: int
) -> dict[str, Any]:
    return {
        "data": str(args.data), "split": args.split, "samples": samples, "models": runs,
        "text_guidance": args.text_guidance, "image_guidance": list(args.image_guidance),
        "sweep": args.sweep, "steps": args.steps, "resolution": args.resolution, "seed": args.seed,
        "clip": args.clip, "dino": args.dino,
    }  # fmt: skip


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_tables(output: Path, table: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    with open(output / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(FIELDS))
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if _missing(row[k]) else row[k]) for k in FIELDS})
    clean = [{k: (None if _missing(row[k]) else row[k]) for k in FIELDS} for row in table]
    (output / "results.json").write_text(
        json.dumps({"settings": settings, "results": clean}, indent=2) + "\n"
    )


def plot_tradeoff(table: list[dict[str, Any]], path: Path) -> Path:
    """The paper's figure: x = CLIP directional similarity, y = CLIP image similarity, a line per
    model, points labelled with the swept value. When every model sweeps s_I it is drawn as
    before (legend: the models; title: labels s_I); otherwise each legend entry names the
    model's swept parameter."""
    series: dict[str, list[tuple[float, float, Any]]] = {}
    swept: dict[str, str] = {}
    for row in table:
        series.setdefault(row["model"], []).append(
            (row["clip_direction"], row["clip_image"], row["value"])
        )
        swept[row["model"]] = row["sweep"]
    names = set(swept.values())
    if names == {"image_guidance"}:
        legend = {label: label for label in series}
        title_labels = "s_I"
    else:
        legend = {label: f"{label} ({axis_name(swept[label])})" for label in series}
        title_labels = axis_name(names.pop()) if len(names) == 1 else "swept value"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pillow(series, legend, title_labels, path)
    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=120)
    for label, points in series.items():
        xs, ys, _ = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", label=legend[label])
        for x, y, g in points:
            axes.annotate(
                format_value(g), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    axes.set_xlabel("CLIP text-image direction similarity")
    axes.set_ylabel("CLIP image similarity")
    axes.set_title(f"Edit strength vs. consistency (labels: {title_labels})")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _plot_with_pillow(
    series: dict[str, list[tuple[float, float, Any]]], legend: dict[str, str], title_labels: str,
    path: Path,
) -> Path:  # fmt: skip
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
    draw.text((5, 20), f"CLIP image similarity (labels: {title_labels})", fill="black")
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
            draw.text((px + 4, py - 12), format_value(g), fill=colour)
        draw.text((width - margin - 150, margin + 10 + 14 * number), legend[label], fill=colour)
    image.save(path)
    return path
