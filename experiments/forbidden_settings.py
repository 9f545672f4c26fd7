#!/usr/bin/env python
"""What generation settings that forbid a reading (docs/pitfalls.md, pitfall 14) cost a
model that reads: the demo's stage-1 model on its own test lines and on lines that repeat a
word, a number or a dash, rendered in the same five hands, decoded with the recipe's
settings and with each forbidding setting. For each: the lines the setting makes impossible
(counted on the labels, as the check counts them) and the corpus CER.

    make demo                                   # runs/demo and data/synthetic
    python experiments/forbidden_settings.py    # about a minute on a 2-core CPU

Prints a Markdown table (docs/pitfalls.md#pitfall-14 holds it) and writes it with every
figure to --output as JSON.
"""

import argparse
import copy
import json
import random
import sys
from pathlib import Path

import torch
from datasets import load_from_disk
from tqdm import tqdm
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data_scripts")]

import make_synthetic  # noqa: E402
from trocr_recipe.augment import resize_to_tensor, to_gray_or_rgb  # noqa: E402
from trocr_recipe.data import OcrCollator, image_size  # noqa: E402
from trocr_recipe.loopcheck import encode_texts  # noqa: E402
from trocr_recipe.metrics import corpus_cer, decode  # noqa: E402
from trocr_recipe.pitfalls.forbidden import blockers  # noqa: E402

HANDS = ("caveat", "dancing-script", "indie-flower", "kalam", "yellowtail")
# Each row: the settings decoding uses on top of the model's own generation config.
SETTINGS = {
    "the model's own (the recipe's)": {},
    "no_repeat_ngram_size=3": {"no_repeat_ngram_size": 3},
    "the notebook's (num_beams 4, no_repeat_ngram_size 3, length_penalty 2.0, max_length 64)": {
        "num_beams": 4, "no_repeat_ngram_size": 3, "length_penalty": 2.0, "early_stopping": True, "max_length": 64},
    "repetition_penalty=1.2": {"repetition_penalty": 1.2},
}


def repeat_texts(count: int, rng: random.Random) -> list[str]:
    """Lines that repeat: a word, a number or a dash three to five times, alone or within words."""
    lines = []
    for _ in range(count):
        unit = rng.choice([rng.choice(make_synthetic.WORDS), str(rng.randint(1, 99)), "-", "ha"])
        repeated = " ".join([unit] * rng.randint(3, 5))
        around = [rng.choice(make_synthetic.WORDS) for _ in range(rng.randint(0, 2))]
        lines.append(" ".join([*around[:1], repeated, *around[1:]]).capitalize())
    return lines


def render(texts: list[str], seed: int) -> list:
    rng, fonts = random.Random(seed), make_synthetic.named_fonts(list(HANDS))
    images = []
    for text in tqdm(texts, desc="Rendering repeated lines", unit="line"):
        image = None
        while image is None:
            image = make_synthetic.render_line(text, rng.choice(fonts), rng, None)
        images.append(image)
    return images


def read(model, processor, images, settings: dict, batch_size: int) -> list[str]:
    collator, size = OcrCollator.from_image_processor(processor.image_processor), image_size(processor.image_processor)
    generation = copy.deepcopy(model.generation_config)
    generation.update(**settings)
    texts = []
    for start in tqdm(range(0, len(images), batch_size), desc="Reading", unit="batch", leave=False):
        features = [{"pixel_values": resize_to_tensor(to_gray_or_rgb(image), size), "labels": []}
                    for image in images[start:start + batch_size]]
        with torch.inference_mode():
            ids = model.generate(pixel_values=collator(features)["pixel_values"], generation_config=generation)
        texts += decode(processor.tokenizer, ids)
    return texts


def forbidden(tokenizer, texts: list[str], generation) -> int:
    """Lines some setting of `generation` makes impossible (repetition_penalty only scores down)."""
    rows = encode_texts(tokenizer, texts)
    tests = [test for key, (_, test, _) in blockers(generation, generation.decoder_start_token_id).items()
             if key != "repetition_penalty"]
    return sum(any(test(row) for test in tests) for row in rows)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo")
    parser.add_argument("--dataset", default="data/synthetic")
    parser.add_argument("--split", default="test")
    parser.add_argument("--repeats", type=int, default=100, help="lines that repeat, rendered in the demo's hands")
    parser.add_argument("--batch_size", type=int, default=25)
    parser.add_argument("--output", default="runs/forbidden_settings.json")
    args = parser.parse_args(argv)
    model, processor = VisionEncoderDecoderModel.from_pretrained(args.model).eval(), TrOCRProcessor.from_pretrained(args.model)
    split = load_from_disk(args.dataset)[args.split]
    sets = {"test": (list(split["text"]), list(split["image"]))}
    texts = repeat_texts(args.repeats, random.Random(0))
    sets["repeats"] = (texts, render(texts, seed=0))
    rows = []
    for name, settings in SETTINGS.items():
        generation = copy.deepcopy(model.generation_config)
        generation.update(**settings)
        row = {"settings": name}
        for part, (references, images) in sets.items():
            row[f"{part}_lines"] = len(references)
            row[f"{part}_forbidden"] = forbidden(processor.tokenizer, references, generation)
            row[f"{part}_cer"] = corpus_cer(references, read(model, processor, images, settings, args.batch_size))
        rows.append(row)
        print(json.dumps(row))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| decoding settings | test lines impossible | test CER | repeating lines impossible | repeating lines CER |",
             "|---|---|---|---|---|"]
    lines += [f"| {row['settings']} | {row['test_forbidden']} of {row['test_lines']} | {row['test_cer']:.2f} | "
              f"{row['repeats_forbidden']} of {row['repeats_lines']} | {row['repeats_cer']:.2f} |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
