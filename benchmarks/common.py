"""What the three benchmarks share: imports from the project, common flags, interleaved
timing with medians, IAM-like line images, a small table and the final ratio line."""

import argparse
import io
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "data_scripts"):  # trocr_recipe, and make_tiny_model / make_synthetic
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402


# Words and tokenized punctuation for the generated lines (as IAM's ground truth: "Mr. Gaitskell ,").
WORDS = """the of and to a in that is was he for it with as his on be at by had not are but from or have
an they which one you were her all she there would their we him been has when who will more no if out
so said what up its about into than them can only other new some could time these two may then do first
any my now such like our over man me even most made after also did many before must through back years
where much your way well down should because each just those people how too little state good very make
world still own see men work long get here between both life being under never day same another know
while last might great old year off come since against go came right used take three house night place
small hand again part light thing water money found point half young city voice moment story early table
morning river window letter garden summer winter friend mother father child school doctor market paper
music plan face side sure mind stop move read write open close clear free full""".split()
PUNCTUATION = [".", ",", "!", "?", ";", ":", "-", "'s", "n't"]


def random_text(rng: random.Random, min_words: int, max_words: int) -> str:
    words = []
    for position in range(rng.randint(min_words, max_words)):
        word = rng.choice(WORDS)
        words.append(word.capitalize() if position == 0 or rng.random() < 0.1 else word)
        if rng.random() < 0.12:
            words.append(rng.choice(PUNCTUATION))
    return " ".join(words)


def add_common_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and one repetition: the smoke test.")
    parser.add_argument(
        "--repeats", type=int, default=repeats,
        help="Repetitions of each measurement, baseline and ours alternated; medians are reported.",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads for this process (default: torch's own choice, usually one per core).",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the generated lines and the model.")


def setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    print(f"# torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {args.repeats} repetition(s)", flush=True)
    return device


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout keeps the table and the ratio line only."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(measurements: dict, repeats: int, label: str = "") -> dict[str, list[float]]:
    """Runs every measurement once per repetition, alternating their order (ABC, CBA, ...)
    so that a slow spell of a shared machine hits all of them alike. Each callable returns
    its own figure (seconds per unit of work); returns every figure, by name."""
    names = list(measurements)
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            progress(f"{label}repetition {repeat + 1}/{repeats}: {name}")
            samples[name].append(measurements[name]())
    return samples


def median(values) -> float:
    return statistics.median(values)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[value if isinstance(value, str) else f"{value:.2f}" for value in row] for row in rows]
    widths = [max(len(str(row[column])) for row in cells) for column in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(str(cell).rjust(width) if column else str(cell).ljust(width)
                        for column, (cell, width) in enumerate(zip(row, widths))))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()


def ratio_line(name: str, ratio: float) -> None:
    print(f"{name} ratio={ratio:.2f}", flush=True)


def render_line(text: str, rng: random.Random, width: int = 1700, height: int = 120) -> Image.Image:
    """An IAM-like line: grayscale, about width x height, dark anti-aliased ink of one gray
    level on a white page (IAM's line images have their background set to white), the text
    scaled to fill the line."""
    size = int(height * rng.uniform(0.45, 0.6))
    font = ImageFont.load_default(size)
    length = font.getlength(text)
    if length > width * 0.95:  # too long for the line: a smaller font
        size = max(8, int(size * width * 0.95 / length))
        font = ImageFont.load_default(size)
    page = Image.new("L", (width, height), 255)
    ImageDraw.Draw(page).text(
        (rng.randint(5, 30), (height - size) // 2 + rng.randint(-5, 5)), text, font=font,
        fill=rng.randint(0, 60), stroke_width=rng.choice((0, 1, 1, 2)), stroke_fill=rng.randint(0, 60),
    )
    slant = rng.uniform(-0.3, 0.3)  # handwriting slant, as make_synthetic.py
    return page.transform(
        page.size, Image.AFFINE, (1, slant, -slant * height / 2, 0, 1, 0), Image.BILINEAR, fillcolor=255
    )


def iam_like_lines(count: int, seed: int, width: int = 1700, height: int = 120) -> tuple[list[bytes], list[str]]:
    """PNG bytes and texts of `count` lines of about width x height (widths vary by +-15%)."""
    rng = random.Random(seed)
    blobs, texts = [], []
    for _ in range(count):
        text = random_text(rng, 7, 11)  # IAM lines hold 8-9 words on average
        line_width = int(width * rng.uniform(0.85, 1.15))
        buffer = io.BytesIO()
        render_line(text, rng, line_width, height).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
        texts.append(text)
    return blobs, texts


def describe_images(blobs: list[bytes]) -> str:
    sizes = [Image.open(io.BytesIO(blob)).size for blob in blobs]
    widths, heights = zip(*sizes)
    return (f"{len(blobs)} grayscale PNG lines, about {int(np.mean(widths))}x{int(np.mean(heights))} px, "
            f"{np.mean([len(blob) for blob in blobs]) / 1024:.0f} KB each")


def make_processor(height: int, width: int):
    """A real-size TrOCR image processor, built offline (the Hub's trocr-*-handwritten say
    384x384, mean and std 0.5; bicubic as the paper and the recipe)."""
    import transformers
    from transformers import ViTImageProcessor

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "falling back to the PIL backend" notice
    try:
        return ViTImageProcessor(
            size={"height": height, "width": width}, resample=Image.BICUBIC,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
