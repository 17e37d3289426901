"""`instruct-edit`: edit images from the command line, or serve the HTTP API.

Errors a user can act on print one line and exit non-zero; no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.errors import EngineError, InvalidInput
from engine.manifest import DEFAULT_MODEL, MANIFEST
from engine.request import MAX_RESOLUTION, MAX_STEPS, MAX_VARIANTS, SCHEDULERS, EditParams

EDIT_EXAMPLES = """\
examples:
  instruct-edit edit dragon.png -i "make the dragon red" -o red.png
  instruct-edit edit photo.jpg -i "make it evening" -o out.png --variants 4 --seed 7
  instruct-edit edit sketch.png -i "turn it into a watercolour" -o wc.png \\
      --image-guidance 1.2 --text-guidance 9 --steps 30
  instruct-edit edit in.png -i "add snow" -o out.png --model ./my-model \\
      --lora ./my-style.safetensors:0.8
"""


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"hub id, diffusers folder or .safetensors file (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
        help="precision: auto = fp16 on GPUs, bf16 on CPUs that do it fast, else fp32",
    )
    parser.add_argument(
        "--memory-saving", default="auto", choices=("auto", "off", "slicing", "offload"),
        help="attention slicing / VAE tiling / model CPU offload (auto decides from VRAM and size)",
    )
    parser.add_argument(
        "--model-config", default=None, metavar="DIR|ID",
        help="for a single-file checkpoint: the diffusers folder or hub id whose configs it uses "
             f"(default: {DEFAULT_MODEL} from the cache)",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="allow pickle-based .ckpt/.bin files, which can run code when loaded (trusted files only)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instruct-edit",
        description="Instruction-based image editing (InstructPix2Pix).",
    )
    parser.add_argument("--version", action="version", version=f"instruct-edit {MANIFEST['version']}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = sub.add_parser(
        "edit", help="edit an image file", epilog=EDIT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    edit.add_argument("input", type=Path, help="image to edit (PNG, JPEG, WebP, …)")
    edit.add_argument("-i", "--instruction", required=True, help='what to change, e.g. "make it evening"')
    edit.add_argument("-o", "--output", type=Path, required=True,
                      help="where to write; with --variants K: OUTPUT-0, OUTPUT-1, …")
    edit.add_argument("--mask", type=Path, help="grayscale mask of the input's size: 0 keeps, 255 edits")
    edit.add_argument("--steps", type=int, default=20, help=f"denoising steps, 1–{MAX_STEPS} (default 20)")
    edit.add_argument("--text-guidance", type=float, default=7.5,
                      help="s_T: how strongly to follow the instruction (default 7.5)")
    edit.add_argument("--image-guidance", type=float, default=1.5,
                      help="s_I: how closely to stay with the input; below 1 changes more (default 1.5)")
    edit.add_argument("--seed", type=int, default=0, help="random seed; variant k uses seed + k")
    edit.add_argument("--variants", type=int, default=1, help=f"number of results, 1–{MAX_VARIANTS}")
    edit.add_argument("--resolution", type=int, default=512,
                      help=f"working size: long side in pixels, 64–{MAX_RESOLUTION} (default 512)")
    edit.add_argument("--scheduler", default="default", choices=SCHEDULERS,
                      help="default = the model's own; dpm++ gives good results in fewer steps")
    edit.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                      help="LoRA adapter (.safetensors) with optional strength; repeatable")
    edit.add_argument("--no-preserve-detail", dest="preserve_detail", action="store_false",
                      help="upscale the working-size result instead of applying it as a change "
                           "on the full-resolution input")
    edit.add_argument("--overwrite", action="store_true", help="replace existing output files")
    edit.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_arguments(edit)
    edit.set_defaults(run=run_edit)

    serve = sub.add_parser("serve", help="run the HTTP engine the Krita plugin talks to")
    try:
        from engine.server.cli import add_serve_arguments, run_serve
    except ImportError:
        serve.set_defaults(run=_serve_missing)
    else:
        add_serve_arguments(serve)
        serve.set_defaults(run=run_serve)
    return parser


def _serve_missing(args: argparse.Namespace) -> int:
    raise EngineError("the HTTP service is not part of this installation")


def parse_lora(text: str) -> tuple[str, float]:
    path, sep, strength = text.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):  # not a bare Windows drive
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def output_paths(output: Path, variants: int) -> list[Path]:
    if variants == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(variants)]


def _check_output(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"):
            raise InvalidInput(f"output {path} needs an image extension (.png, .jpg, .webp, …)", "output")
        if path.exists() and not overwrite:
            raise InvalidInput(f"{path} already exists; choose another name or pass --overwrite", "output")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InvalidInput(f"cannot write {path}: folder {parent} does not exist", "output")
        if not os.access(parent, os.W_OK):
            raise InvalidInput(f"cannot write {path}: folder {parent} is not writable", "output")


def read_image(path: Path, what: str = "input"):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InvalidInput(f"{what} {path} does not exist", what)
    if path.stat().st_size == 0:
        raise InvalidInput(f"{what} {path} is an empty file", what)
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"{what} {path} is not a readable image ({err})", what) from err


def run_edit(args: argparse.Namespace) -> int:
    params = EditParams(
        instruction=args.instruction,
        text_guidance=args.text_guidance,
        image_guidance=args.image_guidance,
        steps=args.steps,
        seed=args.seed,
        variants=args.variants,
        resolution=args.resolution,
        model=args.model,
        loras=tuple(_lora_spec(text) for text in args.lora),
        scheduler=args.scheduler,
        preserve_detail=args.preserve_detail,
    )
    paths = output_paths(args.output, params.variants)
    _check_output(paths, args.overwrite)
    image = read_image(args.input)
    mask = read_image(args.mask, "mask") if args.mask else None

    # heavy import: only once the arguments are known good
    from engine.editor import Editor, Progress

    editor = Editor(
        args.model, device=args.device, dtype=args.dtype,
        allow_pickle=args.allow_pickle, memory_saving=args.memory_saving,
        model_config=args.model_config,
    )
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=params.steps, unit="step", desc="editing")

        def progress(p: Progress) -> None:
            bar.total = p.total
            bar.n = p.step
            bar.refresh()

    try:
        results = editor.edit(image, params, mask, on_progress=progress)
    finally:
        if not args.quiet:
            bar.close()
    for path, result in zip(paths, results, strict=True):
        if path.suffix.lower() in (".jpg", ".jpeg") and result.mode == "RGBA":
            result = result.convert("RGB")
        result.save(path)
        print(path)
    return 0


def _lora_spec(text: str):
    from engine.request import LoraSpec

    path, strength = parse_lora(text)
    return LoraSpec(path=path, strength=strength)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and run a subcommand; a user-facing error is one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except EngineError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
