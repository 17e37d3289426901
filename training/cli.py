"""`instruct-edit-train`: one subcommand per module; each module owns its arguments.

A command module exposes `HELP: str`, `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.cli import run_command

# name -> module; imported lazily so `--help` stays fast and one broken extra can't sink all.
COMMANDS: dict[str, str] = {
    "check-data": "training.commands.check_data",
    "train": "training.commands.train",
    "evaluate": "training.commands.evaluate",
    "demo": "training.commands.demo",
    "finetune-text": "training.datagen.commands.finetune_text",
    "generate-text": "training.datagen.commands.generate_text",
    "generate-images": "training.datagen.commands.generate_images",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instruct-edit-train",
        description="Fine-tune, evaluate and make training data for InstructPix2Pix-style models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("training"):
                continue  # not written yet
            raise
        command = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
