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

Exit status: 0 no error (warnings may be printed), 1 at least one error, 2 bad input, named
in one `error:` line on stderr (a missing or unreadable file, a batch that is not a dict of
pixel_values (B, C, H, W) and labels (B, L), texts that are not one string per line, an
empty batch or empty labels, pixel values NaN or infinite, label ids outside the decoder's
vocabulary besides -100, a model that does not load or whose folder maps a class to its own
code: no code from a model folder is ever run).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import TrOCRProcessor, VisionEncoderDecoderModel
from transformers.utils import logging as transformers_logging

import trocr_recipe
from trocr_recipe.checks import PITFALLS_DOC
from trocr_recipe.errors import BAD_INPUT, ArgumentParser, BadInput, run_cli
from trocr_recipe.loopcheck import IGNORE_INDEX, check_loop, format_findings, has_errors, validate_batch
from trocr_recipe.modeling import pretrained

__all__ = ["BAD_INPUT", "BadInput", "main"]


def parse_args(argv=None):
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
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
        raise BadInput(f"{path}: " + ("a folder, not a file" if path.is_dir() else "no such file") + "; give the file "
                       "torch.save wrote")
    try:
        batch = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a file it cannot read
        raise BadInput(
            f"{path}: torch.load(weights_only=True) cannot read it ({type(error).__name__}: {error}); save a dict of "
            "tensors, lists and strings only"
        ) from None
    try:
        validate_batch(batch, batch.get("texts") if isinstance(batch, dict) else None)
    except (ValueError, TypeError, RuntimeError) as error:  # torch.as_tensor of labels raises all three
        raise BadInput(f"{path}: {error}") from None
    return batch


def check_values(path: Path, batch: dict, model) -> None:
    """What the checks cannot judge, named at the door: an empty batch or empty labels, pixel
    values that are not finite, label ids outside the decoder's vocabulary (besides -100)."""
    pixel_values, labels = batch["pixel_values"], torch.as_tensor(batch["labels"])
    if pixel_values.numel() == 0 or labels.shape[0] == 0:
        raise BadInput(f"{path}: an empty batch (pixel_values {tuple(pixel_values.shape)}, labels "
                       f"{tuple(labels.shape)}); save a batch of at least one line")
    if labels.shape[1] == 0:
        raise BadInput(f"{path}: labels of length 0 {tuple(labels.shape)}; save the labels your loss is computed on")
    bad = (~torch.isfinite(pixel_values)).sum().item()
    if bad:
        raise BadInput(f"{path}: {bad} pixel value(s) NaN or infinite; the loader's images or normalization are "
                       "broken: fix them before checking the loop")
    table = model.decoder.get_input_embeddings().num_embeddings
    outside = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= table))]
    if outside.numel():
        kind = "negative (only -100 is ignored by the loss)" if outside.min() < 0 else "not in the vocabulary"
        raise BadInput(f"{path}: {outside.numel()} label id(s) {kind}: {sorted(set(outside.tolist()))[:5]}, the "
                       f"decoder's vocabulary is 0..{table - 1}; labels must be the tokenizer's ids, or -100")


def load_model(model_name: str, processor_name: str | None):
    """Your model and processor as you saved them (not corrected: the checks look at them),
    never running code from their folders."""
    model = pretrained(VisionEncoderDecoderModel, model_name, "--model")
    processor = pretrained(TrOCRProcessor, processor_name or model_name, "--processor" if processor_name else "--model")
    return model, processor


def docs_location() -> str:
    """docs/pitfalls.md of the installed project, as a path the user can open."""
    path = Path(trocr_recipe.__file__).resolve().parents[1] / PITFALLS_DOC
    return str(path) if path.is_file() else PITFALLS_DOC


def check(argv=None) -> int:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()
    batch = load_batch(args.batch)
    model, processor = load_model(args.model, args.processor)
    check_values(args.batch, batch, model)
    findings = check_loop(model, processor, batch)
    print(f"Model {args.model}, processor {args.processor or args.model}, batch {args.batch}.")
    print(format_findings(findings))
    if findings:
        print(f"{PITFALLS_DOC} is at {docs_location()}")
    return 1 if has_errors(findings) else 0


def main(argv=None) -> int:
    """The exit status: 0, 1 (a mistake found) or 2 (bad input, one `error:` line on stderr)."""
    return run_cli(check, argv)


if __name__ == "__main__":
    sys.exit(main())
