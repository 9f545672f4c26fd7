#!/usr/bin/env python
"""Training-input throughput: lines per second through decode, augmentation, resize,
normalization and collation, on IAM-like line images (grayscale PNG, about 1,700x120).

    python benchmarks/bench_data.py                     # the figure of docs/speed.md
    python benchmarks/bench_data.py --no_augment        # the evaluation input path
    python benchmarks/bench_data.py --quick             # smoke test

Compared, interleaved, with the same images, batch size, sampler order and number of
dataloader workers (0, then 1):

- baseline: the tutorial pattern, a torch Dataset whose __getitem__ opens the PNG file,
  converts it to RGB, applies the same augmentation (trocr_recipe.augment.augment) and calls
  `processor(images=image, return_tensors="pt").pixel_values`: one float tensor per line,
  stacked by the default collate;
- ours: the recipe's path, a `datasets` Image column from a save_to_disk folder, transformed
  on the fly by `with_image_transforms` (ImageTransform: decode, grayscale kept as one
  channel, augment, bicubic resize, uint8), batched by `OcrCollator`, which normalizes
  the batch and spreads the channel over three: in the main process with 0 workers; with
  workers, the batch crosses to the main process as uint8 and is normalized there on the
  device (`OcrCollator.normalize`, what the model's encoder does with it in a run).

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

import torch  # noqa: E402
from datasets import Dataset, DatasetDict, Features, Sequence, Value, load_from_disk  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from PIL import Image  # noqa: E402
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
# Timing.
# --------------------------------------------------------------------------------------
def seconds_per_line(loader, device, normalize=None) -> float:
    """Wall time per line after the first batch (worker start-up and the first batch
    excluded), each batch moved to the device as a training step would, and for ours
    normalized there when it comes from a worker (as uint8), as the model's encoder would."""
    batches = iter(loader)
    next(batches)
    start, lines = time.perf_counter(), 0
    for batch in batches:
        pixels = batch["pixel_values"].to(device, non_blocking=True)
        if normalize is not None:
            normalize(pixels)
        lines += len(batch["labels"])
    synchronize(device)
    return (time.perf_counter() - start) / max(lines, 1)


def decode_seconds_per_line(blobs) -> float:
    start = time.perf_counter()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB")
    return (time.perf_counter() - start) / len(blobs)


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
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one pass of ours in-process, top functions printed.")
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
        baseline = TutorialDataset([str(p) for p in paths], texts, processor, args.augment)

        def loader(data, collate, workers):
            """The same line order and the same augmentation of each line for every path: the
            sampler is seeded, and so is `random`, here (0 workers) or in the worker (its seed
            comes from the loader's generator)."""
            random.seed(args.seed)
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(args.seed))
            return DataLoader(data, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=workers, pin_memory=pin, generator=torch.Generator().manual_seed(args.seed))

        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(seconds_per_line, loader(ours, collator, 0), device, collator.normalize)
            print("\n# cProfile of ours, num_workers 0, by own time:")
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(12)

        rows, ratios = [], []
        for workers in args.workers:
            measurements = {
                "baseline": lambda w=workers: seconds_per_line(loader(baseline, None, w), device),
                "ours": lambda w=workers: seconds_per_line(loader(ours, collator, w), device, collator.normalize),
            }
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
