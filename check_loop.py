#!/usr/bin/env python
"""Checks a TrOCR training loop of your own: your model as your loop saved it, and one batch
as your loader gives it, for the mistakes that make "the loss goes down, the CER goes up".

In your loop, save one training batch and the texts of its lines:

    torch.save({"pixel_values": batch["pixel_values"], "labels": batch["labels"], "texts": texts}, "batch.pt")

then, with this project installed (pip install -e /path/to/trocr-recipe):

    python /path/to/trocr-recipe/check_loop.py --model YOUR_MODEL_DIR --batch batch.pt

It prints what it checked and every finding (the mistake, its evidence, what it causes, the
fix, and its section of docs/pitfalls.md). "texts" is optional; without it the labels are
not compared with the ground truth. To check your validation step as well, call
trocr_recipe.loopcheck.check_loop from Python with evaluate=your_step.

Exit status: 0 no error (warnings may be printed), 1 at least one error, 2 bad input (a
missing or unreadable file, a batch that is not a dict of pixel_values (B, C, H, W) and
labels (B, L), texts that are not one string per line, a model that does not load).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import TrOCRProcessor, VisionEncoderDecoderModel
from transformers.utils import logging as transformers_logging

import trocr_recipe
from trocr_recipe.checks import PITFALLS_DOC
from trocr_recipe.loopcheck import check_loop, format_findings, has_errors, validate_batch

BAD_INPUT = 2


class BadInput(Exception):
    """Input the checks cannot run on; the message names the file and what is wrong."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Checkpoint folder (or Hub id) of your VisionEncoderDecoderModel.")
    parser.add_argument(
        "--batch", required=True, type=Path,
        help='torch.save({"pixel_values": ..., "labels": ..., "texts": [...]}) of one batch of your loader.',
    )
    parser.add_argument("--processor", help="Folder or Hub id of your TrOCRProcessor; default: the --model one.")
    return parser.parse_args(argv)


def load_batch(path: Path) -> dict:
    """The saved batch, loaded with weights_only=True (tensors, lists, strings: no code runs)."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        batch = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a file it cannot read
        raise BadInput(
            f"{path}: torch.load(weights_only=True) cannot read it ({type(error).__name__}: {error}); save a dict of "
            "tensors, lists and strings only"
        ) from None
    try:
        validate_batch(batch, batch.get("texts") if isinstance(batch, dict) else None)
    except ValueError as error:
        raise BadInput(f"{path}: {error}") from None
    return batch


def load_model(model_name: str, processor_name: str | None):
    """Your model and processor, as from_pretrained gives them."""
    for flag, name in (("--model", model_name), ("--processor", processor_name)):
        if name and name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
            raise BadInput(f"{flag} {name}: no such folder")
    try:
        model = VisionEncoderDecoderModel.from_pretrained(model_name)
    except (OSError, ValueError, KeyError, TypeError) as error:
        where = "" if Path(model_name).is_dir() else "not a folder here, and from the Hub: "
        raise BadInput(f"--model {model_name}: {where}cannot load a VisionEncoderDecoderModel ({error})") from None
    source = processor_name or model_name
    try:
        processor = TrOCRProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"--processor {source}: cannot load a TrOCRProcessor ({error}); pass --processor") from None
    return model, processor


def docs_location() -> str:
    """docs/pitfalls.md of the installed project, as a path the user can open."""
    path = Path(trocr_recipe.__file__).resolve().parents[1] / PITFALLS_DOC
    return str(path) if path.is_file() else PITFALLS_DOC


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()
    try:
        batch = load_batch(args.batch)
        model, processor = load_model(args.model, args.processor)
        findings = check_loop(model, processor, batch)
    except BadInput as error:
        print(f"check_loop: {error}", file=sys.stderr)
        return BAD_INPUT
    print(f"Model {args.model}, processor {args.processor or args.model}, batch {args.batch}.")
    print(format_findings(findings))
    if findings:
        print(f"{PITFALLS_DOC} is at {docs_location()}")
    return 1 if has_errors(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
