"""Figures of a run: the lines read worst on a split, and the training curves.

    from trocr_recipe.figures import training_curves_figure, worst_lines_figure

    drawn_ids = worst_lines_figure("runs/demo/worst_test.png", images, references, predictions, ids, cers)
    training_curves_figure("runs/demo/training_curves.png", loss_rows, eval_rows)

`worst_lines_figure` draws the `top` lines with the highest per-line CER, worst first: id
and CER, the line image scaled to the figure's width, then the reference and the
prediction with the characters that differ highlighted (green in the reference: missed
or misread; red in the prediction: wrong). Long texts wrap. `training_curves_figure`
plots the loss, the learning rate and the validation CER against the optimizer step.
"""

import difflib
import itertools
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .augment import to_rgb

WIDTH = 1400  # pixels; every line image is scaled to fit it, however wide
MARGIN = 16
MAX_IMAGE_HEIGHT = 110
# Monospace, so that wrapping is a character count; shipped with matplotlib, so always there.
_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONT = ImageFont.truetype(str(_FONTS / "DejaVuSansMono.ttf"), 18)
BOLD = ImageFont.truetype(str(_FONTS / "DejaVuSansMono-Bold.ttf"), 18)
CHAR_WIDTH = FONT.getlength("M")
LINE_HEIGHT = sum(FONT.getmetrics()) + 4
BLACK, GREY = (0, 0, 0), (150, 150, 150)
GREEN, RED = (0, 120, 0), (200, 0, 0)
# A background behind marked characters, so that a missed or extra space shows too.
HIGHLIGHT = {GREEN: (200, 240, 200), RED: (255, 210, 210)}
LABEL = "pred "  # text rows start with "ref  " / "pred ", the text aligned after it
COLUMNS = int((WIDTH - 2 * MARGIN) // CHAR_WIDTH) - len(LABEL)


def differing_characters(reference: str, prediction: str) -> tuple[list[bool], list[bool]]:
    """Per character of each string: True where the alignment does not match it."""
    in_reference, in_prediction = [False] * len(reference), [False] * len(prediction)
    matcher = difflib.SequenceMatcher(None, reference, prediction, autojunk=False)
    for tag, ref_start, ref_end, pred_start, pred_end in matcher.get_opcodes():
        if tag != "equal":
            in_reference[ref_start:ref_end] = [True] * (ref_end - ref_start)
            in_prediction[pred_start:pred_end] = [True] * (pred_end - pred_start)
    return in_reference, in_prediction


def _draw_marked(draw: ImageDraw.ImageDraw, x: float, y: int, text: str, marked: list[bool], color) -> None:
    """`text` in black, its marked characters in `color` on a light background."""
    start = 0
    for is_marked, group in itertools.groupby(marked):
        end = start + len(list(group))
        left = x + start * CHAR_WIDTH
        if is_marked:
            draw.rectangle((left, y, x + end * CHAR_WIDTH - 1, y + LINE_HEIGHT - 2), fill=HIGHLIGHT[color])
        draw.text((left, y), text[start:end], font=FONT, fill=color if is_marked else BLACK)
        start = end


def _text_rows(label: str, text: str, marked: list[bool], color) -> Image.Image:
    """A labelled text, wrapped at COLUMNS characters, marks kept."""
    chunks = range(0, max(1, len(text)), COLUMNS)
    rows = Image.new("RGB", (WIDTH, LINE_HEIGHT * len(chunks)), "white")
    draw = ImageDraw.Draw(rows)
    draw.text((MARGIN, 0), label, font=FONT, fill=GREY)
    x = MARGIN + len(LABEL) * CHAR_WIDTH
    for row, start in enumerate(chunks):
        end = start + COLUMNS
        _draw_marked(draw, x, row * LINE_HEIGHT, text[start:end], marked[start:end], color)
    return rows


def _fit(image, width: int, max_height: int) -> Image.Image:
    """Scaled (up or down, aspect kept) to the largest size within width x max_height."""
    image = to_rgb(image)
    scale = min(width / image.width, max_height / image.height)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def _stack(parts: list[Image.Image], gap: int = 6) -> Image.Image:
    canvas = Image.new("RGB", (WIDTH, sum(part.height for part in parts) + gap * len(parts)), "white")
    y = 0
    for part in parts:
        canvas.paste(part, (0, y))
        y += part.height + gap
    return canvas


def _heading(text: str) -> Image.Image:
    heading = Image.new("RGB", (WIDTH, LINE_HEIGHT), "white")
    ImageDraw.Draw(heading).text((MARGIN, 0), text, font=BOLD, fill=BLACK)
    return heading


def _legend() -> Image.Image:
    missed, wrong = "reference characters missed or misread", "predicted characters that are wrong"
    legend = Image.new("RGB", (WIDTH, LINE_HEIGHT), "white")
    draw = ImageDraw.Draw(legend)
    _draw_marked(draw, MARGIN, 0, missed, [True] * len(missed), GREEN)
    _draw_marked(draw, MARGIN + (len(missed) + 4) * CHAR_WIDTH, 0, wrong, [True] * len(wrong), RED)
    return legend


def _line_panel(rank: int, line_id: str, cer: float, image, reference: str, prediction: str) -> Image.Image:
    in_reference, in_prediction = differing_characters(reference, prediction)
    line_image = _fit(image, WIDTH - 2 * MARGIN, MAX_IMAGE_HEIGHT)
    framed = Image.new("RGB", (WIDTH, line_image.height), "white")
    framed.paste(line_image, (MARGIN, 0))
    rule = Image.new("RGB", (WIDTH, 2), GREY)
    return _stack(
        [
            _heading(f"#{rank}  {line_id}  CER {cer:.1f}%"),
            framed,
            _text_rows("ref", reference, in_reference, GREEN),
            _text_rows("pred", prediction, in_prediction, RED),
            rule,
        ]
    )


def worst_lines_figure(output_path, images, references, predictions, ids, cers, top: int = 12) -> list[str]:
    """PNG of the `top` lines with the highest CER, worst first (ties in split order).
    `images` is indexed only for the lines drawn, so a lazy dataset column is fine.
    Returns the ids drawn, in order."""
    order = sorted(range(len(cers)), key=lambda index: -cers[index])[:top]
    title = f"{len(order)} of {len(cers)} lines, highest CER first"
    panels = [_heading(title), _legend()] + [
        _line_panel(rank, str(ids[i]), cers[i], images[i], references[i], predictions[i])
        for rank, i in enumerate(order, start=1)
    ]
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    _stack(panels).save(output_path)
    return [str(ids[i]) for i in order]


def _plot_steps(ax, rows: list[dict], key: str, label: str, empty: str, **style) -> None:
    points = sorted((row["step"], row[key]) for row in rows if row.get(key) is not None)
    if points:
        ax.plot(*zip(*points), **style)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_yticks([])
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def training_curves_figure(output_path, loss_rows: list[dict], eval_rows: list[dict]) -> Path:
    """PNG with three panels against the optimizer step: training loss and learning rate
    (rows of loss_log.jsonl) and validation CER (rows with "step" and "eval_cer")."""
    fig = Figure(figsize=(9, 9), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, rate_ax, cer_ax = fig.subplots(3, 1, sharex=True)
    _plot_steps(loss_ax, loss_rows, "loss", "training loss", "no training step logged", lw=1.0)
    _plot_steps(rate_ax, loss_rows, "learning_rate", "learning rate", "no learning rate logged", lw=1.0)
    _plot_steps(cer_ax, eval_rows, "eval_cer", "validation CER (%)", "no evaluation during training", marker="o")
    cer_ax.set_xlabel("optimizer step")
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
