"""Render synthetic text lines into an IAM-like dataset (train / validation / test).

    python data_scripts/make_synthetic.py --output_dir data/synthetic --num_train 4000

Each line is drawn with random font size, position, slant, stroke width, word spacing and
vertical jitter on a slightly noisy page, as a grayscale PNG sized to the text or, with
`--canvas_width`, on a strip of a fixed size; `text` is the exact string drawn.
Pillow's built-in font is used unless `--font_dir` names a folder of .ttf / .otf fonts
(handwriting fonts give lines closer to IAM). Written with `save_to_disk`.
"""

import argparse
import random
import string
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from tqdm import tqdm

# Common English words; tokenized punctuation as in IAM's ground truth ("Mr. Gaitskell ,").
WORDS = """the of and to a in that is was he for it with as his on be at by had not are but from
or have an they which one you were her all she there would their we him been has when who will
more no if out so said what up its about into than them can only other new some could time
these two may then do first any my now such like our over man me even most made after also did
many before must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year
off come since against go came right used take three house night place small hand again part
light thing water money found point half young city voice moment story early table morning
river window letter garden summer winter friend mother father child school doctor market
paper music plan face side sure mind stop move read write open close clear free full""".split()
PUNCTUATION = [".", ",", "!", "?", ";", ":", "-", "'s", "n't"]


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))


def random_text(rng: random.Random, min_words: int, max_words: int, words: str) -> str:
    """A line of English words, or of random letter strings that no language model can
    guess: the text must be read from the image."""
    line = []
    for position in range(rng.randint(min_words, max_words)):
        word = rng.choice(WORDS) if words == "english" else random_word(rng)
        if position == 0 or rng.random() < 0.1:
            word = word.capitalize()
        elif rng.random() < 0.03:
            word = str(rng.randint(1, 1999))
        line.append(word)
        if rng.random() < 0.12:
            line.append(rng.choice(PUNCTUATION))
    return " ".join(line)


def load_fonts(font_dir: str | None) -> list[Path | None]:
    if font_dir is None:
        return [None]
    fonts = sorted(p for p in Path(font_dir).iterdir() if p.suffix.lower() in (".ttf", ".otf"))
    if not fonts:
        raise SystemExit(f"{font_dir}: no .ttf or .otf fonts found")
    return fonts


def render_line(text: str, font_path: Path | None, rng: random.Random, canvas: tuple[int, int] | None):
    """The line as a grayscale image sized to its text, or on a strip of a fixed size
    (`canvas`, as IAM's lines are all about a page wide, so that the model's resize scales
    every line alike). None when the text does not fit the strip."""
    size = rng.randint(20, 30) if canvas is None else rng.randint(canvas[1] * 5 // 16, canvas[1] * 15 // 32)
    font = ImageFont.load_default(size) if font_path is None else ImageFont.truetype(str(font_path), size)
    stroke = rng.choice((0, 0, 1))
    spacing = size * rng.uniform(0.25, 0.45)
    words = text.split(" ")
    widths = [font.getlength(word) + 2 * stroke for word in words]
    x = rng.uniform(size / 4, size)
    needed = x + sum(widths) + spacing * (len(words) - 1) + size / 2
    width, height = (int(needed + x), size * 2) if canvas is None else canvas
    if needed > width:
        return None
    page = PILImage.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    ink = rng.randint(0, 60)
    baseline = rng.uniform(height / 6, height / 3)
    for word, word_width in zip(words, widths):
        draw.text((x, baseline + rng.uniform(-2, 2)), word, font=font, fill=ink, stroke_width=stroke, stroke_fill=ink)
        x += word_width + spacing
    slant = rng.uniform(-0.3, 0.3)
    page = page.transform(
        (width, height), PILImage.AFFINE, (1, slant, -slant * height / 2, 0, 1, 0), PILImage.BILINEAR, fillcolor=255
    )
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (height, width))
    return PILImage.fromarray(np.clip(np.asarray(page, dtype=np.float64) + noise, 0, 255).astype(np.uint8), "L")


def make_split(name: str, count: int, fonts, rng: random.Random, args) -> Dataset:
    rows = {"image": [], "text": [], "id": []}
    canvas = (args.canvas_width, args.canvas_height) if args.canvas_width else None
    for index in tqdm(range(count), desc=f"Rendering {name}", unit="line"):
        image = None
        while image is None:  # a new text until one fits the strip
            text = random_text(rng, args.min_words, args.max_words, args.words)
            image = render_line(text, rng.choice(fonts), rng, canvas)
        rows["image"].append(image)
        rows["text"].append(text)
        rows["id"].append(f"{name}-{index:05d}")
    return Dataset.from_dict(rows, features=Features({"image": Image(), "text": Value("string"), "id": Value("string")}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Where the DatasetDict is saved.")
    parser.add_argument("--num_train", type=int, default=4000, help="Training lines.")
    parser.add_argument("--num_validation", type=int, default=100, help="Validation lines.")
    parser.add_argument("--num_test", type=int, default=200, help="Test lines.")
    parser.add_argument("--min_words", type=int, default=2, help="Fewest words per line.")
    parser.add_argument("--max_words", type=int, default=5, help="Most words per line.")
    parser.add_argument(
        "--words", choices=("english", "random"), default="english",
        help="Common English words, or random letter strings (nothing to guess without reading).",
    )
    parser.add_argument(
        "--canvas_width", type=int, default=None, help="Draw every line on a strip this wide; sized to its text if unset."
    )
    parser.add_argument("--canvas_height", type=int, default=64, help="Height of that strip in pixels.")
    parser.add_argument("--font_dir", default=None, help="Folder of .ttf/.otf fonts; Pillow's built-in font if unset.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for texts and rendering.")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    fonts = load_fonts(args.font_dir)
    counts = {"train": args.num_train, "validation": args.num_validation, "test": args.num_test}
    dataset = DatasetDict({name: make_split(name, count, fonts, rng, args) for name, count in counts.items()})
    dataset.save_to_disk(args.output_dir)
    print(f"Wrote {', '.join(f'{n} {name}' for name, n in counts.items())} lines to {args.output_dir}")


if __name__ == "__main__":
    main()
