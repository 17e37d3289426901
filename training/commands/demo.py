"""Prove on a CPU, in a few minutes, that training teaches a model to follow instructions.

Builds 32×32 coloured-shape pairs ("make it red" / "make it blue"), a tiny InstructPix2Pix from
scratch (a tiny VAE trained first, then a random UNet), trains the UNet with the `train`
command, and edits held-out shapes through the engine: it reports how often the named
colour dominates the shape, before and after training. Exit status 0 when the trained
model reaches --min-rate and beats the untrained one.

examples:
  instruct-edit-train demo                    # in a temporary folder, ~1.5–3 minutes on 2 cores
  instruct-edit-train demo --workdir demo_run --train-steps 1000
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
from pathlib import Path

from engine.errors import InvalidInput
from training.shapes_demo import run_demo

HELP = "train a tiny model on coloured shapes and show it learned (CPU, minutes)"


def _default(name: str) -> object:
    """run_demo's own default, so the command and the library never drift apart."""
    return inspect.signature(run_demo).parameters[name].default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", type=Path, help="keep data, models and logs here (default: a temporary folder)"
    )
    options = (
        ("--train-steps", int, "UNet training steps"),
        ("--vae-steps", int, "tiny-VAE training steps"),
        ("--pairs", int, "training pairs to generate"),
        ("--held-out", int, "held-out edits to score"),
        ("--lr", float, "UNet learning rate"),
        ("--batch-size", int, "UNet batch size"),
        ("--seed", int, "seed of the data, the models and the edits"),
    )
    for flag, kind, text in options:
        default = _default(flag[2:].replace("-", "_"))
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    parser.add_argument(
        "--min-rate", type=float, default=0.8, help="success rate to pass (default 0.8)"
    )


def run(args: argparse.Namespace) -> int:
    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            raise InvalidInput(
                f"--workdir {args.workdir} is not empty; give a new folder", field="workdir"
            )
        return _run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="instruct-edit-demo-") as folder:
        return _run(args, Path(folder))


def _run(args: argparse.Namespace, workdir: Path) -> int:
    result = run_demo(
        workdir,
        train_steps=args.train_steps,
        vae_steps=args.vae_steps,
        pairs=args.pairs,
        held_out=args.held_out,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    passed = result.trained_rate >= args.min_rate and result.trained_rate > result.untrained_rate
    print("PASS" if passed else "FAIL", f"(needs ≥ {args.min_rate:.0%} and better than untrained)")
    return 0 if passed else 1
