"""Check training data before training: every bad row is reported with where it is.

A row is bad when an image file is missing, an image is unreadable, corrupt or too large
(over Pillow's decompression-bomb limit of about 89 megapixels; it is refused before it is
decoded), the two images of a pair differ in size, the instruction is empty, or its line of
metadata.jsonl is not UTF-8 JSON. Nothing is written to the data folder. Exit status: 0 when
every row is usable, 1 when some are not, 2 when the data cannot be read at all.

examples:
  instruct-edit-train check-data my_pairs                 # folder with metadata.jsonl
  instruct-edit-train check-data generated_data --split all
  instruct-edit-train check-data saved_hf_dataset --input-column original_image \\
      --instruction-column edit_prompt --edited-column edited_image
"""

from __future__ import annotations

import argparse

from training.data import FORMATS, Columns, check_rows, drop_bad_rows, load_pairs

HELP = "check a training data folder or dataset and list every bad row"


def add_data_arguments(parser: argparse.ArgumentParser, *, positional: bool) -> None:
    """The data options `check-data` and `train` share."""
    where = "pairs folder (metadata.jsonl), the paper's generated layout (seeds.json), a saved Hugging Face dataset folder, or a dataset name"
    if positional:
        parser.add_argument("data", help=where)
    else:
        parser.add_argument("--data", required=True, help=where)
    parser.add_argument(
        "--format", choices=FORMATS, default="auto", help="data format (default: detected)"
    )
    parser.add_argument(
        "--split",
        default="train",
        help="split to read: train/val/test/all for the generated layout (0.9/0.05/0.05), a split name for a dataset (default train)",
    )
    parser.add_argument(
        "--input-column", default="input_image", help="key/column of the input image"
    )
    parser.add_argument(
        "--instruction-column", default="edit_prompt", help="key/column of the instruction"
    )
    parser.add_argument(
        "--edited-column", default="edited_image", help="key/column of the edited image"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="leave bad rows out instead of stopping"
    )


def columns_from(args: argparse.Namespace) -> Columns:
    return Columns(
        input_image=args.input_column,
        edit_prompt=args.instruction_column,
        edited_image=args.edited_column,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, positional=True)


def run(args: argparse.Namespace) -> int:
    pairs = load_pairs(args.data, format=args.format, columns=columns_from(args), split=args.split)
    print(f"{pairs.source}: {pairs.format} format, {len(pairs)} rows")
    bad = check_rows(pairs.rows)
    for problem in bad:
        print(f"bad row: {problem}")
    usable = len(drop_bad_rows(pairs.rows, bad))
    print(f"{usable} usable rows, {len(pairs) - usable} bad")
    if bad and not args.skip_bad:
        return 1
    return 0 if usable else 1
