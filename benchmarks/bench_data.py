#!/usr/bin/env python
"""Training-input throughput: lines per second through decode, augmentation, resize,
normalization and collation, on IAM-like line images (grayscale PNG, about 1,700x120).

    python benchmarks/bench_data.py                     # the figure of benchmarks/README.md
    python benchmarks/bench_data.py --no_augment        # the evaluation input path
    python benchmarks/bench_data.py --quick             # smoke test

Compared, interleaved, with the same images, batch size, sampler order and number of
dataloader workers (0, then 1):

- baseline: the tutorial pattern, a torch Dataset whose __getitem__ opens the PNG file,
  converts it to RGB, applies the same augmentation (trocr_recipe.augment.augment) and calls
  `processor(images=image, return_tensors="pt").pixel_values`: one float tensor per line,
  stacked by the default collate;
- ours: the recipe's path, a `datasets` Image column from a save_to_disk folder, transformed
  on the fly by `with_image_transforms` (ImageTransform: decode, RGB, augment, bicubic
  resize, uint8) and normalized on the batch by `OcrCollator`;
- ours+gray (left out by --no_proposed): a local copy of that path with the changes
  proposed in benchmarks/README.md (grayscale lines augmented and resized as one channel,
  3x3 dilation / erosion by numpy, normalization in place), checked to give bit-identical
  batches.

The processor is a real-size ViTImageProcessor (384x384, mean and std 0.5, bicubic), built
offline. Also timed: decoding alone (PNG decode + RGB), the floor of any path. The last
line is `bench_data ratio=X.XX`: baseline time over ours, the smaller of the two worker
settings.
"""

import argparse
import cProfile
import io
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_common_args, describe_images, iam_like_lines, interleaved, make_processor, median, print_table, progress,
    ratio_line, setup, synchronize,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, DatasetDict, Features, Sequence, Value, load_from_disk  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from trocr_recipe import augment as recipe_augment  # noqa: E402
from trocr_recipe.data import OcrCollator, image_size, with_image_transforms  # noqa: E402


def stand_in_labels(text: str) -> list[int]:
    """Label ids for the collator (tokenization is a one-off `.map`, not part of the loop)."""
    return list(text.encode("utf-8")) + [2]


# --------------------------------------------------------------------------------------
# Baseline: the tutorial pattern.
# --------------------------------------------------------------------------------------
class TutorialDataset(torch.utils.data.Dataset):
    """What most fine-tuning notebooks do: open the file in __getitem__, the processor per
    line, float pixel values out, labels padded to a fixed length with -100."""

    def __init__(self, paths, texts, processor, augment: bool, max_target_length: int = 128):
        self.paths, self.processor, self.augment = paths, processor, augment
        self.size = image_size(processor)
        self.labels = []
        for text in texts:
            ids = stand_in_labels(text)[:max_target_length]
            self.labels.append(ids + [-100] * (max_target_length - len(ids)))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index]).convert("RGB")
        if self.augment:
            image = recipe_augment.augment(image, self.size, random)
        pixel_values = self.processor(images=image, return_tensors="pt").pixel_values
        return {"pixel_values": pixel_values.squeeze(0), "labels": torch.tensor(self.labels[index])}


# --------------------------------------------------------------------------------------
# Proposed change, as a local copy (trocr_recipe is not edited by this benchmark).
# --------------------------------------------------------------------------------------
def _fill(image, value: int):
    return value if image.mode == "L" else (value,) * 3


def _morphology(image, reduce):
    """3x3 max (dilate) or min (erode) with edge pixels repeated: what PIL's MaxFilter(3) /
    MinFilter(3) compute (they expand the image by its edge pixels), as two separable
    passes in numpy instead of a 9-value sort per pixel and channel."""
    array = np.asarray(image)
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (array.ndim - 2)
    padded = np.pad(array, pad, mode="edge")
    rows = reduce(reduce(padded[:-2], padded[1:-1]), padded[2:])
    return Image.fromarray(reduce(reduce(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:]), image.mode)


def _rotate(image, rng, size):
    return image.rotate(rng.uniform(-10, 10), resample=Image.NEAREST, expand=True, fillcolor=_fill(image, 255))


def _dilate(image, rng, size):
    return _morphology(image, np.maximum)


def _erode(image, rng, size):
    return _morphology(image, np.minimum)


def _underline(image, rng, size):
    gray = image if image.mode == "L" else image.convert("L")
    ink = np.nonzero(np.asarray(gray) < 50)
    if ink[0].size == 0:
        return image
    bottom, left, right = int(ink[0].max()), int(ink[1].min()), int(ink[1].max())
    image = image.copy()
    ImageDraw.Draw(image).rectangle((left, max(0, bottom - 2), right, bottom), fill=_fill(image, 0))
    return image


# Same names, same order, same random draws as trocr_recipe.augment.AUGMENTATIONS.
GRAY_AUGMENTATIONS = dict(recipe_augment.AUGMENTATIONS, rotate=_rotate, dilate=_dilate, erode=_erode,
                          underline=_underline)
assert list(GRAY_AUGMENTATIONS) == list(recipe_augment.AUGMENTATIONS)


def to_gray_or_rgb(image: Image.Image) -> Image.Image:
    """Grayscale lines stay one channel ("1", "L", 16-bit, float); the rest as to_rgb."""
    if image.mode in ("1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = recipe_augment.to_rgb(image) if image.mode != "L" else image
        return image.convert("L") if image.mode != "L" else image  # to_rgb's gray RGB -> L is exact
    return recipe_augment.to_rgb(image)


class GrayImageTransform:
    """ImageTransform with the proposed change: a grayscale line is augmented and resized as
    one channel (a third of the pixels), returned as a 1xHxW uint8 tensor."""

    def __init__(self, image_column, size, train):
        self.image_column, self.size, self.train = image_column, size, train

    def __call__(self, batch):
        pixels = []
        for image in batch[self.image_column]:
            image = to_gray_or_rgb(image)
            if self.train:
                image = GRAY_AUGMENTATIONS[random.choice(list(GRAY_AUGMENTATIONS))](image, random, self.size)
            height, width = self.size
            image = image.resize((width, height), Image.BICUBIC)
            array = np.array(image, dtype=np.uint8)  # a copy torch may own
            pixels.append(torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()))
        return {"pixel_values": pixels, "labels": batch["labels"]}


class GrayOcrCollator(OcrCollator):
    """OcrCollator normalizing in place (one float buffer instead of four, the same
    arithmetic in the same order, so the same bits), and broadcasting a one-channel line
    into the three channels during the normalization instead of copying it beforehand."""

    def __call__(self, features):
        channels = max(feature["pixel_values"].shape[0] for feature in features)
        pixels = torch.stack([feature["pixel_values"].expand(channels, -1, -1) for feature in features])
        mean = torch.tensor(self.image_mean).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std).view(1, -1, 1, 1)
        pixels = pixels.float().mul_(self.rescale_factor)
        pixels = pixels.sub_(mean) if pixels.shape[1] == mean.shape[1] else pixels - mean  # 1 -> 3 channels
        longest = max(len(feature["labels"]) for feature in features)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            labels[row, : len(feature["labels"])] = torch.as_tensor(feature["labels"])
        return {"pixel_values": pixels.div_(std), "labels": labels}


# --------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------
def seconds_per_line(loader, device) -> float:
    """Wall time per line after the first batch (worker start-up and the first batch
    excluded), each batch moved to the device as a training step would."""
    batches = iter(loader)
    next(batches)
    start, lines = time.perf_counter(), 0
    for batch in batches:
        batch["pixel_values"].to(device, non_blocking=True)
        lines += len(batch["labels"])
    synchronize(device)
    return (time.perf_counter() - start) / max(lines, 1)


def decode_seconds_per_line(blobs) -> float:
    start = time.perf_counter()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB")
    return (time.perf_counter() - start) / len(blobs)


def check_identical(ours, proposed, collator, gray_collator, count: int, seed: int) -> bool:
    """The proposed path gives the same normalized batch as the recipe's, bit for bit,
    with the augmentation drawn from the same random state."""
    indices = list(range(min(count, len(ours))))
    random.seed(seed)
    a = collator([ours[i] for i in indices])
    random.seed(seed)
    b = gray_collator([proposed[i] for i in indices])
    return torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=256, help="Line images per measurement.")
    parser.add_argument("--width", type=int, default=1700, help="Mean width of the generated lines (IAM: ~1,700).")
    parser.add_argument("--height", type=int, default=120, help="Height of the generated lines (IAM: ~120).")
    parser.add_argument("--size", type=int, default=384, help="Model input size (TrOCR: 384x384).")
    parser.add_argument("--batch_size", type=int, default=16, help="Lines per batch (recipes/small.json: 16).")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="dataloader num_workers settings.")
    parser.add_argument("--no_augment", dest="augment", action="store_false",
                        help="No augmentation (the validation / test input path).")
    parser.add_argument("--no_proposed", dest="proposed", action="store_false",
                        help="Skip the ours+gray row (the proposed change, measured on a local copy).")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one pass of ours (and ours+gray) in-process, top functions printed.")
    add_common_args(parser, repeats=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.lines, args.width, args.height, args.size, args.batch_size = 24, 400, 40, 96, 4
    device = setup(args)
    pin = device.type == "cuda"

    progress(f"rendering {args.lines} lines")
    blobs, texts = iam_like_lines(args.lines, args.seed, args.width, args.height)
    processor = make_processor(args.size, args.size)
    print(f"# {describe_images(blobs)}; input {args.size}x{args.size}, batch {args.batch_size}, "
          f"augmentation {'on' if args.augment else 'off'}; processor {type(processor).__name__}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        # Baseline reads PNG files, as the tutorial; ours a save_to_disk folder, as the recipe.
        paths = []
        for index, blob in enumerate(blobs):
            paths.append(Path(tmp, f"line-{index:05d}.png"))
            paths[-1].write_bytes(blob)
        features = Features({"image": ImageFeature(), "text": Value("string"), "labels": Sequence(Value("int32"))})
        Dataset.from_dict(
            {"image": [{"bytes": blob, "path": None} for blob in blobs], "text": texts,
             "labels": [stand_in_labels(text) for text in texts]},
            features=features,
        ).save_to_disk(str(Path(tmp, "dataset")))
        dataset = load_from_disk(str(Path(tmp, "dataset")))

        data_args = SimpleNamespace(image_column="image", augment=args.augment)
        ours = with_image_transforms(DatasetDict({"train": dataset}), data_args, processor)["train"]
        collator = OcrCollator.from_image_processor(processor)
        proposed = dataset.with_transform(GrayImageTransform("image", image_size(processor), train=args.augment))
        gray_collator = GrayOcrCollator.from_image_processor(processor)
        baseline = TutorialDataset([str(p) for p in paths], texts, processor, args.augment)

        if args.proposed:
            identical = check_identical(ours, proposed, collator, gray_collator, 2 * args.batch_size, args.seed)
            print(f"# ours+gray gives bit-identical batches to ours: {'yes' if identical else 'NO'}", flush=True)

        def loader(data, collate, workers):
            """The same line order and the same augmentation of each line for every path: the
            sampler is seeded, and so is `random`, here (0 workers) or in the worker (its seed
            comes from the loader's generator)."""
            random.seed(args.seed)
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(args.seed))
            return DataLoader(data, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=workers, pin_memory=pin, generator=torch.Generator().manual_seed(args.seed))

        if args.profile:
            for name, data, collate in (("ours", ours, collator), ("ours+gray", proposed, gray_collator)):
                profile = cProfile.Profile()
                profile.runcall(seconds_per_line, loader(data, collate, 0), device)
                print(f"\n# cProfile of {name}, num_workers 0, by own time:")
                pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(12)

        rows, ratios = [], []
        for workers in args.workers:
            measurements = {
                "baseline": lambda w=workers: seconds_per_line(loader(baseline, None, w), device),
                "ours": lambda w=workers: seconds_per_line(loader(ours, collator, w), device),
            }
            if args.proposed:
                measurements["ours+gray"] = lambda w=workers: seconds_per_line(loader(proposed, gray_collator, w), device)
            measurements["decode only"] = lambda: decode_seconds_per_line(blobs)
            samples = interleaved(measurements, args.repeats, label=f"num_workers={workers}: ")
            times = {name: median(values) for name, values in samples.items()}
            for name, seconds in times.items():
                rows.append([str(workers), name, 1 / seconds, 1000 * seconds, times["baseline"] / seconds,
                             seconds / times["decode only"]])
            ratios.append(times["baseline"] / times["ours"])

    print()
    print_table(["workers", "path", "lines/s", "ms/line", "x baseline", "x decode"], rows)
    print("# x baseline: speed over the tutorial pattern (higher is better); x decode: time over "
          "decoding alone, the floor (1.00 = nothing but decoding)")
    ratio_line("bench_data", min(ratios))


if __name__ == "__main__":
    main()
