"""`instruct-edit`: edit images from the command line, or serve the HTTP API.

`edit` takes the chosen model family's own flags (generated from its ParamSpecs); a flag the
family does not take is one `error:` line naming it (exit 2).

Errors a user can act on print one line and exit non-zero; no tracebacks for bad input, and
no third-party notices around it (`engine.console`); `--debug` (or INSTRUCT_EDIT_DEBUG=1)
shows both, and the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from engine import console
from engine.devices import MEMORY_PLAN_CHOICES, MEMORY_SAVING_ALIASES
from engine.errors import EngineError, InvalidInput
from engine.manifest import DEFAULT_MODEL, MANIFEST
from engine.request import MAX_RESOLUTION, MAX_STEPS, MAX_VARIANTS, EditParams

EDIT_EXAMPLES = """\
examples:
  instruct-edit edit dragon.png -i "make the dragon red" -o red.png
  instruct-edit edit photo.jpg -i "make it evening" -o out.png --variants 4 --seed 7
  instruct-edit edit sketch.png -i "turn it into a watercolour" -o wc.png \\
      --image-guidance 1.2 --text-guidance 9 --steps 30
  instruct-edit edit in.png -i "add snow" -o out.png --model ./my-model \\
      --lora ./my-style.safetensors:0.8
  instruct-edit edit in.png -i "make it a sunny day" -o out.png \\
      --model black-forest-labs/FLUX.1-Kontext-dev --guidance 2.5 --quantization bnb-4bit
  instruct-edit edit in.png -i "remove the cup" -o out.png --model Qwen/Qwen-Image-Edit-2511 \\
      --true-cfg 4 --negative-prompt "blurry"

Model parameters (the family of --model decides which apply; others are an error):
  InstructPix2Pix, SDXL InstructPix2Pix, CosXL: --text-guidance --image-guidance --scheduler
  FLUX.1 Kontext, FLUX.2 klein: --guidance      Qwen-Image-Edit: --true-cfg --negative-prompt
"""

# Shorter spellings of family parameters on the command line.
FLAG_ALIASES = {"true_cfg_scale": ("--true-cfg",)}


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"catalogue id, hub id, diffusers folder or .safetensors file (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--preset", default=None, metavar="ID",
                        help="a catalogue preset of the model, e.g. lightning-8 for Qwen-Image-Edit "
                             "(its LoRAs, steps and parameters; your own flags win)")
    parser.add_argument("--family", default=None,
                        help="model family (default: detected from the model): " + ", ".join(_family_ids()))
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
        help="precision: auto = the family's GPU dtype (fp16/bf16), bf16 on CPUs that do it fast, else fp32",
    )
    parser.add_argument(
        "--runtime", default=None, choices=("auto", "torch", "openvino", "openvino-int8"),
        help="what runs the networks: auto = OpenVINO on a CPU for InstructPix2Pix models (faster than PyTorch there; the first use of a model converts it once, cached), else PyTorch; openvino-int8 also quantizes the UNet to int8 (about 3x faster again on CPUs with VNNI, small changes to the result; first use calibrates for a minute or two; needs nncf)",
    )
    parser.add_argument(
        "--compile", default="off", choices=("off", "default", "max-autotune", "reduce-overhead"),
        help="torch.compile the UNet of InstructPix2Pix models (GPU; one warm-up per model, every working size reuses it): default, max-autotune, reduce-overhead (CUDA graphs)",
    )
    parser.add_argument(
        "--memory-plan", default="auto", choices=MEMORY_PLAN_CHOICES,
        help="auto = the fastest that fits the free VRAM; offload-text moves the text encoders off "
             "the GPU after encoding; model-/sequential-offload are the last resorts",
    )
    parser.add_argument("--memory-saving", default=None, choices=tuple(MEMORY_SAVING_ALIASES),
                        help=argparse.SUPPRESS)  # the older name of --memory-plan
    parser.add_argument(
        "--quantization", default="none", choices=_quantizations(),
        help="load the large components quantized (bnb-*: CUDA; torchao-int8: any device; "
             "gguf: a .gguf transformer file as --model)",
    )
    parser.add_argument(
        "--model-config", default=None, metavar="DIR|ID",
        help="for a single-file checkpoint: the diffusers folder or hub id whose configs it uses "
             f"(default: the family's reference model, e.g. {DEFAULT_MODEL}, from the cache)",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="allow pickle-based .ckpt/.bin files, which can run code when loaded (trusted files only)",
    )


def _family_ids() -> list[str]:
    from engine.families import FAMILIES

    return sorted(FAMILIES)


def _quantizations() -> tuple[str, ...]:
    try:
        from engine.quantization import QUANTIZATIONS
    except ImportError:
        return ("none",)
    return tuple(QUANTIZATIONS)


def family_param_flags() -> dict[str, tuple[Any, list[str]]]:
    """{parameter name: (its ParamSpec, [family ids taking it])} over every available family."""
    from engine.families import FAMILIES

    flags: dict[str, tuple[Any, list[str]]] = {}
    for family in FAMILIES.values():
        for spec in family.params:
            if spec.name not in flags:
                flags[spec.name] = (spec, [])
            flags[spec.name][1].append(family.id)
    return flags


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_family_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model parameters", "each applies to the families named; default: the model's recommendation")
    for name, (spec, families) in family_param_flags().items():
        kwargs: dict[str, Any] = {"dest": f"param_{name}", "default": None}
        if spec.kind == "float":
            kwargs["type"] = float
        elif spec.kind == "int":
            kwargs["type"] = int
        elif spec.kind == "choice":
            kwargs["choices"] = spec.choices
        elif spec.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        limits = ""
        if spec.minimum is not None and spec.maximum is not None:
            limits = f", {spec.minimum:g}–{spec.maximum:g}"
        kwargs["help"] = f"{spec.help or spec.label} (default {spec.default!r}{limits}; {', '.join(families)})"
        group.add_argument(flag_of(name), *FLAG_ALIASES.get(name, ()), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instruct-edit",
        description="Instruction-based image editing: InstructPix2Pix, SDXL, FLUX Kontext/klein, Qwen-Image-Edit.",
    )
    parser.add_argument("--version", action="version", version=f"instruct-edit {MANIFEST['version']}")
    parser.add_argument(
        "--debug", action="store_true",
        help=f"show the libraries' notices and the traceback of an unexpected error "
             f"(or set {console.DEBUG_ENV}=1)",
    )
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
    edit.add_argument("--steps", type=int, default=None,
                      help=f"denoising steps, 1–{MAX_STEPS} (default: the model's recommendation)")
    edit.add_argument("--seed", type=int, default=0, help="random seed; variant k uses seed + k")
    edit.add_argument("--variants", type=int, default=1, help=f"number of results, 1–{MAX_VARIANTS}")
    edit.add_argument("--resolution", type=int, default=None,
                      help=f"working size, 64–{MAX_RESOLUTION}: the long side (InstructPix2Pix) or the side "
                           "of the equivalent square (DiT families: ~resolution² pixels); default: the model's")
    edit.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                      help="LoRA adapter (.safetensors) with optional strength; repeatable")
    edit.add_argument("--no-preserve-detail", dest="preserve_detail", action="store_false",
                      help="upscale the working-size result instead of applying it as a change "
                           "on the full-resolution input")
    edit.add_argument("--overwrite", action="store_true", help="replace existing output files")
    edit.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_family_arguments(edit)
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


def family_options(args: argparse.Namespace, family: Any) -> dict[str, Any]:
    """The family parameters given on the command line; a flag the family does not take → error."""
    taken = [spec.name for spec in family.params]
    options: dict[str, Any] = {}
    for name in family_param_flags():
        value = getattr(args, f"param_{name}", None)
        if value is None:
            continue
        if name not in taken:
            takes = ", ".join(flag_of(n) for n in taken) or "no model parameters"
            raise InvalidInput(f"{flag_of(name)} is not a parameter of {family.label} models; they take {takes}",
                               name)
        options[name] = value
    return options


def run_edit(args: argparse.Namespace) -> int:
    from engine.devices import check_memory_plan
    from engine.families import catalogue_entry, detect_family, get_family

    plan = check_memory_plan(args.memory_saving if args.memory_plan == "auto" and args.memory_saving
                             else args.memory_plan)
    common = dict(
        instruction=args.instruction,
        steps=args.steps,
        seed=args.seed,
        variants=args.variants,
        resolution=args.resolution,
        model=args.model,
        loras=tuple(_lora_spec(text) for text in args.lora),
        preserve_detail=args.preserve_detail,
    )
    EditParams(**common)  # the shared fields' checks first, before anything is looked up
    paths = output_paths(args.output, args.variants)
    _check_output(paths, args.overwrite)
    image = read_image(args.input)
    mask = read_image(args.mask, "mask") if args.mask else None
    # The family (and so the flags it takes) is known before any weights file is looked up.
    entry = catalogue_entry(args.model or DEFAULT_MODEL)
    if args.family:
        family = get_family(args.family)
    elif entry is not None:
        family = get_family(entry["family"])
    else:
        family = detect_family(args.model, args.model_config, args.allow_pickle)
    params = EditParams(**common, options=family_options(args, family))
    if args.preset:
        from engine.families import apply_preset

        params = apply_preset(params, entry, args.preset)
    family.resolve_options(params.options)  # ranges and choices, before loading weights

    # heavy import: only once the arguments are known good
    from engine.editor import Editor, Progress

    if not console.debug_requested(args.debug):
        console.quiet_loading_bars(keep_download_bars=not args.quiet)
    if not args.quiet:
        console.show_engine_notes()

    editor = Editor(
        args.model, family=family, device=args.device, dtype=args.dtype,
        allow_pickle=args.allow_pickle, memory_plan=plan, quantization=args.quantization,
        model_config=args.model_config, runtime=args.runtime, compile=args.compile,
    )
    progress = None
    bars: list[Any] = []  # drawn from the first step on: an edit refused before shows none
    if not args.quiet:
        from tqdm import tqdm

        def progress(p: Progress) -> None:
            if not bars:
                bars.append(tqdm(total=p.total, unit="step", desc="editing"))
            bar = bars[0]
            bar.total = p.total
            bar.n = p.step
            bar.refresh()

    try:
        results = editor.edit(image, params, mask, on_progress=progress)
    finally:
        for bar in bars:
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
    """Parse and run a subcommand; a user-facing error is one line on stderr and exit code 2,
    an unexpected one a line and exit code 1 (its traceback with --debug)."""
    args = parser.parse_args(argv)
    # `serve --log-level debug` asks for everything too.
    debug = console.debug_requested(
        getattr(args, "debug", False) or getattr(args, "log_level", None) == "debug"
    )
    if not debug:
        console.quiet_libraries()
    try:
        return int(args.run(args) or 0)
    except EngineError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        text = str(err).strip().splitlines()
        detail = f": {text[0][:300]}" if text else ""
        print(
            f"error: unexpected {type(err).__name__}{detail} (run again with --debug for the "
            "details, and please report it)",
            file=sys.stderr,
        )
        return 1


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
