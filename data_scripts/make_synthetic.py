"""Render synthetic text lines into an IAM-like dataset (train / validation / test).

    python data_scripts/make_synthetic.py --output_dir data/synthetic --num_train 4000
    python data_scripts/make_synthetic.py --output_dir data/hands --fonts caveat kalam indie-flower
    python data_scripts/make_synthetic.py --list_fonts

Each line is a grayscale PNG sized to its text or, with `--canvas_width`, on a strip of a
fixed size; `text` is the exact string drawn and `font` the font it was drawn in. Pillow's
built-in font (`builtin`, the default) is drawn word by word with random size, position,
slant, stroke width, word spacing and vertical jitter on a slightly noisy page. The
handwriting fonts (pip packages, see requirements.txt) and any font of `--font_dir` are
drawn letter by letter, each line in a hand of its own: size, slant, stroke width, letter
and word spacing, a wandering baseline, ink darkness and paper noise. Everything is drawn
from `--seed`: the same arguments give the same dataset, byte for byte. The fonts chosen,
those left out and the ranges of every variation: docs/synthetic_data.md.
"""

import argparse
import functools
import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from tqdm import tqdm

BUILTIN = "builtin"
# Handwriting fonts by name, each with the pip package that ships its .ttf (docs/synthetic_data.md says why these).
HANDWRITING_FONTS = {
    "caveat": "fontpkg-caveat",
    "dancing-script": "fontpkg-dancing-script",
    "indie-flower": "fontpkg-indie-flower",
    "kalam": "fontpkg-kalam",
    "yellowtail": "fontpkg-yellowtail",
    "zeyada": "fontpkg-zeyada",
}
# Joined-up scripts: spacing their letters or moving them apart would break the joins.
JOINED_FONTS = frozenset({"dancing-script", "yellowtail"})
# Every character a line can hold: a font's ink from its highest to its lowest is measured on them.
LINE_CHARACTERS = string.ascii_letters + string.digits + ".,!?;:-'"
INK_SPAN = 1.25  # a TrueType font's ink, highest to lowest, spans this many times the line's size
DRIFT_LIMIT = 0.12  # the baseline wanders at most this many times the size up or down
SUPERSAMPLE = 3  # TrueType lines are drawn this many times larger, then scaled down

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


@dataclass(frozen=True)
class Font:
    """A font to draw lines in: its name (the `font` column), its file (None for Pillow's
    built-in font) and whether its letters join up."""

    name: str
    path: Path | None = None
    joined: bool = False


def font_names() -> list[str]:
    """Every name `--fonts` takes; `all` stands for every handwriting font."""
    return [BUILTIN, *HANDWRITING_FONTS, "all"]


def font_file(name: str) -> Path:
    """The .ttf of a handwriting font, from the pip package that ships it."""
    package = HANDWRITING_FONTS[name]
    try:
        import fontpkg

        return Path(fontpkg.path(name))
    except (ImportError, LookupError):
        raise SystemExit(f"font '{name}' needs the package {package}: pip install {package} (see requirements.txt)")


def named_fonts(names: list[str]) -> list[Font]:
    """The fonts `--fonts` names, in order, each once; a clear error for an unknown name."""
    unknown = [name for name in names if name not in font_names()]
    if unknown:
        raise SystemExit(f"unknown font {', '.join(map(repr, unknown))}; available: {', '.join(font_names())}")
    expanded = [font for name in names for font in (HANDWRITING_FONTS if name == "all" else [name])]
    return [
        Font(BUILTIN) if name == BUILTIN else Font(name, font_file(name), name in JOINED_FONTS)
        for name in dict.fromkeys(expanded)
    ]


def load_fonts(font_dir: str | None) -> list[Font]:
    """The .ttf / .otf fonts of a folder, named by file name without its suffix."""
    if font_dir is None:
        return []
    fonts = sorted(p for p in Path(font_dir).iterdir() if p.suffix.lower() in (".ttf", ".otf"))
    if not fonts:
        raise SystemExit(f"{font_dir}: no .ttf or .otf fonts found")
    return [Font(path.stem, path) for path in fonts]


def choose_fonts(names: list[str] | None, font_dir: str | None) -> list[Font]:
    """The fonts of `--fonts` then those of `--font_dir`; Pillow's built-in font if neither."""
    if names is None and font_dir is None:
        names = [BUILTIN]
    return named_fonts(names or []) + load_fonts(font_dir)


def list_fonts() -> str:
    """What `--list_fonts` prints: each name, where its font comes from, whether it is installed."""
    rows = [f"{BUILTIN:<16}Pillow's built-in font (the default)"]
    for name, package in HANDWRITING_FONTS.items():
        try:
            state = f"installed: {font_file(name)}"
        except SystemExit:
            state = f"missing: pip install {package}"
        rows.append(f"{name:<16}{package}, {'joined script' if name in JOINED_FONTS else 'separate letters'}, {state}")
    rows.append(f"{'all':<16}every handwriting font above")
    return "\n".join(rows)


def line_size(rng: random.Random, canvas: tuple[int, int] | None) -> int:
    """The font size of a line: 20-30 px, or 5/16 to 15/32 of the strip's height."""
    return rng.randint(20, 30) if canvas is None else rng.randint(canvas[1] * 5 // 16, canvas[1] * 15 // 32)


def sheared(page: PILImage.Image, slant: float, paper: int = 255) -> PILImage.Image:
    """The page slanted about its middle row (positive: leaning right), corners filled with paper."""
    width, height = page.size
    return page.transform(
        (width, height), PILImage.AFFINE, (1, slant, -slant * height / 2, 0, 1, 0), PILImage.BILINEAR, fillcolor=paper
    )


def with_noise(page: PILImage.Image, sigma: float, rng: random.Random) -> PILImage.Image:
    """The page with Gaussian paper noise, seeded from `rng`."""
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, sigma, (page.height, page.width))
    return PILImage.fromarray(np.clip(np.asarray(page, dtype=np.float64) + noise, 0, 255).astype(np.uint8), "L")


def render_builtin(text: str, rng: random.Random, canvas: tuple[int, int] | None):
    """The line in Pillow's built-in font, word by word (the draws of the original demo data,
    so that `make demo` renders the same lines)."""
    size = line_size(rng, canvas)
    font = ImageFont.load_default(size)
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
    return with_noise(sheared(page, rng.uniform(-0.3, 0.3)), 6, rng)


@dataclass(frozen=True)
class Hand:
    """How one line is written in a TrueType font, drawn once per line from the seeded RNG
    (in pixels of the line where not said; the ranges are in docs/synthetic_data.md)."""

    stroke: int  # extra stroke width, in pixels of the supersampled page
    word_spacing: float
    letter_spacing: float  # added after each letter
    drift: float  # standard deviation of each step of the baseline's wander
    ink: int  # gray level of the ink
    paper: int  # gray level of the paper
    noise: float  # standard deviation of the paper noise
    slant: float  # horizontal shear, positive leaning right


def draw_hand(rng: random.Random, size: int, joined: bool) -> Hand:
    """A hand for one line of `size` pixels; joined scripts keep their letters' spacing, and
    words stay further apart than letters however widely these are spaced."""
    letter_spacing = 0.0 if joined else size * rng.uniform(0, 0.06)
    return Hand(
        stroke=rng.choice((0, 0, 1, 2)),
        word_spacing=size * rng.uniform(0.3, 0.55) + 2 * letter_spacing,
        letter_spacing=letter_spacing,
        drift=size * rng.uniform(0.01, 0.04),
        ink=rng.randint(0, 80),
        paper=rng.randint(230, 255),
        noise=rng.uniform(2, 10),
        slant=rng.uniform(-0.2, 0.35),
    )


@functools.lru_cache(maxsize=None)
def ink_per_pixel(path: Path) -> float:
    """The height of a font's ink over every character a line can hold, per pixel of font size."""
    _, top, _, bottom = ImageFont.truetype(str(path), 100).getbbox(LINE_CHARACTERS, anchor="ls")
    return (bottom - top) / 100


@functools.lru_cache(maxsize=None)
def scaled_font(path: Path, span: int) -> tuple[ImageFont.FreeTypeFont, int]:
    """The font sized so that its ink spans `span` pixels from highest to lowest, whatever its
    proportions, and the height of that ink above the baseline."""
    font = ImageFont.truetype(str(path), max(1, round(span / ink_per_pixel(path))))
    return font, -font.getbbox(LINE_CHARACTERS, anchor="ls")[1]


def baseline_wander(rng: random.Random, words: list[str], hand: Hand, limit: float, joined: bool) -> list[list[float]]:
    """The vertical offset of every letter: a random walk pulled back towards the line and
    kept within +-limit, stepping at each letter, or at each word of a joined script."""
    offset, offsets = 0.0, []
    for word in words:
        row = []
        for _ in range(1 if joined else len(word)):
            offset = min(limit, max(-limit, 0.8 * offset + rng.gauss(0, hand.drift)))
            row.append(offset)
        offsets.append(row * len(word) if joined else row)
    return offsets


def render_hand(text: str, font: Font, rng: random.Random, canvas: tuple[int, int] | None):
    """The line in a TrueType font, letter by letter, in a hand drawn for this line; drawn
    SUPERSAMPLE times larger and scaled down, so that strokes thicken by fractions of a pixel."""
    size = line_size(rng, canvas)
    face, ascent = scaled_font(font.path, round(size * INK_SPAN * SUPERSAMPLE))
    hand = draw_hand(rng, size, font.joined)
    words = text.split(" ")
    widths = [
        (face.getlength(word) + 2 * hand.stroke) / SUPERSAMPLE + hand.letter_spacing * (len(word) - 1) for word in words
    ]
    x = rng.uniform(size / 4, size)
    needed = x + sum(widths) + hand.word_spacing * (len(words) - 1) + size / 2
    width, height = (int(needed + x), size * 2) if canvas is None else canvas
    if needed > width:
        return None
    page = PILImage.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), hand.paper)
    draw = ImageDraw.Draw(page)
    limit = size * DRIFT_LIMIT
    top = rng.uniform(height / 12, height - height / 12 - size * INK_SPAN - limit)
    baseline = top * SUPERSAMPLE + ascent
    for word, word_width, offsets in zip(words, widths, baseline_wander(rng, words, hand, limit, font.joined)):
        for index, (letter, offset) in enumerate(zip(word, offsets)):
            left = (x + index * hand.letter_spacing) * SUPERSAMPLE + face.getlength(word[:index])
            draw.text((left, baseline + offset * SUPERSAMPLE), letter, font=face, fill=hand.ink, anchor="ls",
                      stroke_width=hand.stroke, stroke_fill=hand.ink)
        x += word_width + hand.word_spacing
    return with_noise(sheared(page.resize((width, height), PILImage.BOX), hand.slant, hand.paper), hand.noise, rng)


def render_line(text: str, font: Font, rng: random.Random, canvas: tuple[int, int] | None):
    """The line as a grayscale image sized to its text, or on a strip of a fixed size
    (`canvas`, as IAM's lines are all about a page wide, so that the model's resize scales
    every line alike). None when the text does not fit the strip."""
    return render_builtin(text, rng, canvas) if font.path is None else render_hand(text, font, rng, canvas)


FEATURES = Features({"image": Image(), "text": Value("string"), "id": Value("string"), "font": Value("string")})


def make_split(name: str, count: int, fonts: list[Font], rng: random.Random, args) -> Dataset:
    rows = {"image": [], "text": [], "id": [], "font": []}
    canvas = (args.canvas_width, args.canvas_height) if args.canvas_width else None
    for index in tqdm(range(count), desc=f"Rendering {name}", unit="line"):
        image = None
        while image is None:  # a new text until one fits the strip
            text = random_text(rng, args.min_words, args.max_words, args.words)
            font = rng.choice(fonts)
            image = render_line(text, font, rng, canvas)
        rows["image"].append(image)
        rows["text"].append(text)
        rows["id"].append(f"{name}-{index:05d}")
        rows["font"].append(font.name)
    return Dataset.from_dict(rows, features=FEATURES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="Where the DatasetDict is saved (required unless --list_fonts).")
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
    parser.add_argument(
        "--fonts", nargs="+", metavar="NAME", default=None,
        help=f"Fonts to draw lines in, one picked at random per line: {', '.join(font_names())}. "
        f"Default: {BUILTIN}, unless --font_dir is given.",
    )
    parser.add_argument("--list_fonts", action="store_true", help="List the fonts, whether installed, and exit.")
    parser.add_argument("--font_dir", default=None, help="Folder of .ttf/.otf fonts, used besides those of --fonts.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for texts and rendering.")
    args = parser.parse_args(argv)
    if args.list_fonts:
        print(list_fonts())
        return
    if args.output_dir is None:
        parser.error("--output_dir is required")
    rng = random.Random(args.seed)
    fonts = choose_fonts(args.fonts, args.font_dir)
    counts = {"train": args.num_train, "validation": args.num_validation, "test": args.num_test}
    dataset = DatasetDict({name: make_split(name, count, fonts, rng, args) for name, count in counts.items()})
    dataset.save_to_disk(args.output_dir)
    print(f"Wrote {', '.join(f'{n} {name}' for name, n in counts.items())} lines to {args.output_dir}")


if __name__ == "__main__":
    main()
