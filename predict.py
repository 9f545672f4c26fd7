#!/usr/bin/env python
"""Transcribe handwritten line images with a trained TrOCR model.

    python predict.py runs/demo line.png more_lines/                  # path<TAB>text on stdout
    python predict.py runs/demo scans/ --output preds.jsonl           # {"path", "prediction"} per line
    python predict.py runs/demo --dataset data/iam-aachen --split test --output test.jsonl   # {"id", "prediction"}

MODEL is a run's output folder, one of its checkpoints or a Hub id. Folders are searched
recursively for png, jpg, jpeg, tif, tiff, bmp, gif and webp files, in sorted order.
Images go through the evaluation path of the recipe (one gray channel or RGB, bicubic
resize to the processor's size; the collator spreads a gray line over three channels and
applies the processor's normalization), then batched beam search with the
beams and maximum length of the model's generation_config unless --num_beams or
--max_length say otherwise. Unreadable files are named on stderr with the reason and
skipped; their count is printed at the end (and written to `<output>.skipped.json` with
--output). Each transcription is written as soon as it is made (to --output, checked writable
before the model loads, or to stdout, where a tab, newline, carriage return or backslash in a
path or a transcription is written as \\t, \\n, \\r or \\\\). Exit code 0, 1 when no image could
be read, 2 for bad input (one `error:` line on stderr).
"""

import argparse
import io
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from datasets import Image as ImageFeature
from datasets import load_dataset, load_from_disk
from PIL import Image
from tqdm import tqdm

from trocr_recipe.args import ModelArguments
from trocr_recipe.augment import resize_to_tensor, to_gray_or_rgb
from trocr_recipe.errors import ArgumentParser, BadInput, at_least, one_line, run_cli
from trocr_recipe.data import OcrCollator, image_size, line_ids
from trocr_recipe.generation import generate
from trocr_recipe.metrics import corpus_cer, corpus_wer, decode
from trocr_recipe.modeling import load_model, load_processor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
# What PIL raises on a file it cannot decode: not an image, truncated, corrupt chunks, an image
# larger than its decompression-bomb limit.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Characters that would break the path<TAB>text lines on stdout, and how they are written.
ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained model: a run's output folder, a checkpoint folder or a Hub id")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("--dataset", help="transcribe a dataset split instead: a save_to_disk folder or anything "
                        "datasets.load_dataset reads (Hub name, parquet folder, imagefolder)")
    parser.add_argument("--split", default="test", help="split of --dataset to transcribe (default: test)")
    parser.add_argument("--image_column", default="image", help="column of --dataset holding the images")
    parser.add_argument("--id_column", default="id", help="column of --dataset naming each line; row index if absent")
    parser.add_argument("--text_column", help="column of --dataset with the ground truth: the split's corpus CER and "
                        "WER are printed and each row gets its 'reference' (default: 'text', when the split has it; "
                        "a column given and missing is an error)")
    parser.add_argument("--output", help="write JSONL here ({'path' or 'id', 'prediction'} per image) instead of "
                        "path<TAB>text on stdout; skipped files go to <output>.skipped.json")
    parser.add_argument("--batch_size", type=int, default=16, help="images per generate call (default: 16)")
    parser.add_argument("--num_beams", type=int, help="beam width; default: the model's generation_config")
    parser.add_argument(
        "--max_length", type=int, help="longest output in tokens; default: the model's generation_config"
    )
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.dataset):
        parser.error("give either image files / folders or --dataset")
    at_least("--batch_size", args.batch_size, 1)
    if args.num_beams is not None:
        at_least("--num_beams", args.num_beams, 1)
    if args.max_length is not None:
        at_least("--max_length", args.max_length, 2)  # the start token and one more
    if args.output:
        check_output(Path(args.output))
    return args


def check_output(path: Path) -> None:
    """--output and its skipped list can be written: found now, not after all inference."""
    for target in (path, Path(f"{path}.skipped.json")):
        if target.is_dir():
            raise BadInput(f"--output {path}: {target} is a folder; give a file name")
        if not target.parent.is_dir():
            raise BadInput(f"--output {path}: no folder {target.parent}; create it first")
        if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise BadInput(f"--output {path}: {target} cannot be written (permission denied)")


def image_files(inputs: list[str]) -> list[str]:
    """Files as given; folders expanded to their images, sorted. A missing path is kept so
    that it is reported as unreadable like any other bad input."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(str(p) for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            files.append(str(item))
    return files


def dataset_images(path: str, split: str, image_column: str, id_column: str, text_column: str | None):
    """Line ids, the undecoded images of one split (a corrupt image is skipped like a bad
    file instead of failing the whole read) and the ground truth by id, if the split has it."""
    raw = open_dataset(path)
    if split not in raw:
        raise SystemExit(f"{path}: no split '{split}'; it has: {', '.join(raw)}")
    lines = raw[split]
    for flag, column in (("--image_column", image_column), ("--text_column", text_column)):
        if column is not None and column not in lines.column_names:
            columns = ", ".join(lines.column_names)
            raise BadInput(f"--dataset {path}: split '{split}' has no column '{column}' ({flag}); its columns: "
                           f"{columns}")
    lines = lines.cast_column(image_column, ImageFeature(decode=False))
    sources = (io.BytesIO(cell["bytes"]) if cell["bytes"] else cell["path"] for cell in lines[image_column])
    ids = line_ids(lines, id_column)
    text_column = text_column or ("text" if "text" in lines.column_names else None)
    references = dict(zip(ids, lines[text_column])) if text_column else None
    return ids, sources, references


def open_dataset(path: str):
    """A save_to_disk folder or anything load_dataset reads; anything else one BadInput line."""
    if os.path.isfile(path):
        raise BadInput(f"--dataset {path}: a file; give a save_to_disk folder, a folder of parquet files or images, "
                       "or a Hub dataset")
    try:
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return load_from_disk(path)
        return load_dataset(path)
    except Exception as error:  # datasets raises a dozen types for a folder it cannot read
        where = "" if os.path.isdir(path) else "no such local folder, and as a Hub dataset: "
        raise BadInput(f"--dataset {path}: {where}cannot load it ({type(error).__name__}: {one_line(error)[:300]})") \
            from None


def report_scores(rows: list[dict], skipped: int, split: str) -> str:
    """The split's corpus CER and WER on the raw ground truth, as the runs score it."""
    references, predictions = [row["reference"] for row in rows], [row["prediction"] for row in rows]
    note = f", {skipped} unreadable line(s) not scored" if skipped else ""
    return (f"{split}: CER {corpus_cer(references, predictions):.2f} WER {corpus_wer(references, predictions):.2f} "
            f"on {len(rows)} line(s){note}")


def load_pixels(source, size: tuple[int, int]) -> torch.Tensor:
    """The evaluation transform of the recipe (data.ImageTransform without augmentation):
    any mode to one grayscale channel or RGB, bicubic resize, uint8; the collator spreads a
    gray line over three channels, the batch of its RGB copy. A path that is no regular file
    (a FIFO would block the read, a device never end) is unreadable."""
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise OSError(f"{'not a regular file' if os.path.exists(source) else 'no such file'}")
    with Image.open(source) as image:
        return resize_to_tensor(to_gray_or_rgb(image), size)


def read_images(names: list[str], sources: Iterable, size, progress: tqdm, skipped: list):
    """(name, pixels) per readable image; unreadable ones are named on stderr with the
    reason, counted on the progress bar and appended to `skipped` as (name, reason)."""
    for name, source in zip(names, sources):
        try:
            yield name, load_pixels(source, size)
        except UNREADABLE as error:
            reason = f"{type(error).__name__}: {error}"
            skipped.append((name, reason))
            progress.write(f"skipped {name}: {reason}", file=sys.stderr)
            progress.update()


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def transcribe(model, processor, images: Iterable[tuple[str, torch.Tensor]], batch_size: int, **generate_kwargs):
    """(name, text) per image: normalized by the recipe's collator, batched generate as the
    runs evaluate (trocr_recipe.generation: the sequences of model.generate), decoded without
    the tokenizer's clean-up (as the run scored its predictions)."""
    collator = OcrCollator.from_image_processor(processor.image_processor)
    for batch in batched(images, batch_size):
        names = [name for name, _ in batch]
        # The collator pads labels too; there are none to pad here.
        pixel_values = collator([{"pixel_values": pixels, "labels": []} for _, pixels in batch])["pixel_values"]
        with torch.inference_mode():
            generated = generate(model, pixel_values.to(model.device), **generate_kwargs)
        yield from zip(names, decode(processor.tokenizer, generated.cpu()))


def load_for_inference(name: str):
    """Model and processor as the recipe loads them (special tokens set on both configs)."""
    model_args = ModelArguments(model_name_or_path=name)
    processor = load_processor(model_args, "model")
    model, _ = load_model(model_args, processor.tokenizer, "model")  # each change to the checkpoint is logged
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), processor


class Outputs:
    """Each row written as soon as it is made: a JSONL line (flushed) to --output, or a
    path<TAB>text line on stdout above the progress bar; the skipped list and counts at the end."""

    def __init__(self, key: str, output: str | None, progress: tqdm):
        self.key, self.output, self.progress, self.count = key, output, progress, 0
        self.stream = open(output, "w", encoding="utf-8") if output else None

    def write(self, row: dict) -> None:
        if self.stream:
            self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.stream.flush()
        else:
            self.progress.write(f"{str(row[self.key]).translate(ESCAPES)}\t{row['prediction'].translate(ESCAPES)}",
                                file=sys.stdout)
        self.count += 1

    def close(self, skipped: list[tuple[str, str]]) -> None:
        if self.stream:
            self.stream.close()
            listed = [{self.key: name, "reason": reason} for name, reason in skipped]
            report = json.dumps({"count": len(skipped), "skipped": listed}, indent=2, ensure_ascii=False)
            Path(f"{self.output}.skipped.json").write_text(report + "\n", encoding="utf-8")
        where = f" (listed in {self.output}.skipped.json)" if self.output and skipped else ""
        print(f"transcribed {self.count} image(s), skipped {len(skipped)} unreadable{where}", file=sys.stderr)


def transcribe_all(argv=None) -> int:
    args = parse_args(argv)
    key = "id" if args.dataset else "path"
    references = None
    if args.dataset:
        names, sources, references = dataset_images(
            args.dataset, args.split, args.image_column, args.id_column, args.text_column
        )
    else:
        names = sources = image_files(args.inputs)
    model, processor = load_for_inference(args.model)
    overrides = {k: v for k, v in (("num_beams", args.num_beams), ("max_length", args.max_length)) if v is not None}

    scored, skipped = [], []
    with tqdm(total=len(names), unit="image", file=sys.stderr) as progress:
        outputs = Outputs(key, args.output, progress)
        try:
            images = read_images(names, sources, image_size(processor.image_processor), progress, skipped)
            for name, text in transcribe(model, processor, images, args.batch_size, **overrides):
                row = {key: name, "prediction": text} | ({"reference": references[name]} if references else {})
                outputs.write(row)
                scored.append(row)
                progress.update()
        finally:
            outputs.close(skipped)
    if references and scored:
        print(report_scores(scored, len(skipped), args.split), file=sys.stderr)
    if not scored:
        print("no image could be read", file=sys.stderr)
    return 0 if scored else 1


def main(argv=None) -> int:
    """The exit status: 0, 1 (no image could be read) or 2 (bad input, one `error:` line on stderr)."""
    return run_cli(transcribe_all, argv)


if __name__ == "__main__":
    sys.exit(main())
