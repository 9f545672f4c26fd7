#!/usr/bin/env python
"""What each pitfall does: "the loss goes down, the CER goes up", reproduced and explained.

    make demo && python experiments/pitfalls.py            # its time and table: docs/pitfalls.md

The researcher's situation: a converged checkpoint (the demo's stage-1 model, runs/demo,
trained on five synthetic hands) fine-tuned on a hand it has never seen (data/newhand), for
a fixed number of steps, once as the recipe does (the reference row: its CER on the new
hand must fall) and once per pitfall, each planted by the smallest change to the recipe's
own pieces (numbered as in docs/pitfalls.md):

 1. the decoder starts from `<s>` (config and generation_config),
 2. `<s>` stays at the front of the labels (what `tokenizer(text)` gives by default),
 3. labels padded with the pad id, not -100, so the loss trains on pads,
 4. generation cut at 20 tokens (the transformers default),
 7. pixels in [0, 1] (mean 0, std 1) instead of the processor's mean / std,
 9. a learning rate ten times the reference's,
 8. CER from the argmax of teacher-forced logits instead of generate.

Every row has the same seed and data order; its CER is scored before and after fine-tuning,
the way that row evaluates (max length 20, wrong normalization, ...), on the first
--eval_samples lines of --split. The preflight checks (trocr_recipe/checks.py) exist to stop
most of these mistakes before any training: they are deliberately not run here.

--seeds runs every row once per seed (data order, dropout, augmentation): the table gives
each row's mean and range over the seeds, and "ends worse" only where the row ends worse than
the reference in every seed by more than the reference's own range. --own_domain is the
other situation of docs/pitfalls.md: the converged model fine-tuned on its own hands, where
the reference must hold its CER (within 0.3) rather than improve; --attempts adds the
seed's own attempt, the last encoder layer and two decoder layers trainable (`trainable`).

Writes <output_dir>/pitfalls.md (the table, also printed) and pitfalls.json (every figure,
per-step losses, and what was planted in each row); each row's loss_log.jsonl sits in
<output_dir>/<row>/, for compare_runs.py. --readme puts the table into docs/pitfalls.md.
"""

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # trocr_recipe and run_trocr, when run as `python experiments/pitfalls.py`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import EvalPrediction, set_seed  # noqa: E402

from run_trocr import LossLogCallback  # noqa: E402
from trocr_recipe.args import parse_recipe  # noqa: E402
from trocr_recipe.data import OcrCollator  # noqa: E402
from trocr_recipe.metrics import GeneratedTextMetrics  # noqa: E402
from trocr_recipe.pipeline import RunInputs, prepare_run, setup_logging  # noqa: E402
from trocr_recipe.trainable import set_trainable  # noqa: E402
from trocr_recipe.trainer import OcrTrainer  # noqa: E402

logger = logging.getLogger("trocr_recipe")

LOSS_WINDOW = 10  # steps: the first and the final training loss are means over this many (one step is noisy)
CER_TOLERANCE = 0.5  # points: a CER within this of another is "steady"; the reference must improve by more
HOLD_TOLERANCE = 0.3  # points: on its own hands (--own_domain) the reference may end at most this much worse
LOSS_TOLERANCE = 0.1  # relative change of the loss below which it counts as flat
README_START, README_END = "<!-- pitfalls:start -->", "<!-- pitfalls:end -->"
OWN_START, OWN_END = "<!-- pitfalls-own-domain:start -->", "<!-- pitfalls-own-domain:end -->"  # --own_domain


# The planted pitfalls: collators, a metric, and changes to what prepare_run built.


@dataclass
class BosInLabels(OcrCollator):
    """The recipe's labels (text ids, `</s>`) with `<s>` put back in front: `<s> text </s>`,
    what `tokenizer(text)` returns with its default special tokens."""

    bos_token_id: int = 0

    def __call__(self, features):
        with_bos = [{**feature, "labels": [self.bos_token_id, *feature["labels"]]} for feature in features]
        return super().__call__(with_bos)


@dataclass
class PadsInLoss(OcrCollator):
    """Labels padded with the pad id, as a tokenizer pads them, instead of -100."""

    pad_token_id: int = 1

    def __call__(self, features):
        batch = super().__call__(features)
        batch["labels"].masked_fill_(batch["labels"] == -100, self.pad_token_id)
        return batch


class TeacherForcedMetrics(GeneratedTextMetrics):
    """CER of the argmax of the teacher-forced logits (`predict_with_generate=False`): each
    position is predicted from the true previous tokens, and positions past the label's end
    are masked out, as the usual compute_metrics does."""

    def __call__(self, eval_prediction):
        labels = eval_prediction.label_ids
        argmax = np.where(labels == -100, self.tokenizer.pad_token_id, eval_prediction.predictions)
        return super().__call__(EvalPrediction(predictions=argmax, label_ids=labels))


def argmax_logits(logits, labels):
    """preprocess_logits_for_metrics: keep token ids, not the vocabulary-wide logits."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def start_from_bos(run: RunInputs, training_args) -> None:
    # Both configs, as a careful user would: the loss's label shift reads config, generate() the other.
    for config in (run.model.config, run.model.generation_config):
        config.decoder_start_token_id = run.processor.tokenizer.bos_token_id


def bos_in_labels(run: RunInputs, training_args) -> None:
    run.collator = BosInLabels(**vars(run.collator), bos_token_id=run.processor.tokenizer.bos_token_id)


def pads_in_loss(run: RunInputs, training_args) -> None:
    run.collator = PadsInLoss(**vars(run.collator), pad_token_id=run.processor.tokenizer.pad_token_id)


def max_length_20(run: RunInputs, training_args) -> None:
    # The trainer passes generation_max_length to generate(); a saved model decodes with its generation_config.
    training_args.generation_max_length = run.model.generation_config.max_length = 20


def zero_one_pixels(run: RunInputs, training_args) -> None:
    # In place: the encoder's on-device normalization (normalize_on_device) calls this same collator.
    channels = len(run.collator.image_mean)
    run.collator.image_mean, run.collator.image_std = [0.0] * channels, [1.0] * channels


def learning_rate_x10(run: RunInputs, training_args) -> None:
    training_args.learning_rate *= 10


def last_layers_trainable(run: RunInputs, training_args) -> None:
    """The seed's attempt: only the encoder's last layer and the decoder's last two train."""
    last = {}  # the layers' name prefix -> the largest layer index under it
    for name, _ in run.model.named_parameters():
        match = re.match(r"((?:encoder|decoder)\..*?\.)(\d+)\.", name)
        if match:
            last[match.group(1)] = max(last.get(match.group(1), 0), int(match.group(2)))
    patterns = [f"{prefix}{index}.*" for prefix, top in last.items()
                for index in ((top,) if prefix.startswith("encoder.") else (top - 1, top)) if index >= 0]
    set_trainable(run.model, patterns)
    training_args.trainable = patterns  # read back by planted()


@dataclass(frozen=True)
class Pitfall:
    name: str  # the row's folder under output_dir and its key in pitfalls.json
    title: str
    why: str
    plant: Callable[[RunInputs, object], None] | None = None  # applied to what prepare_run built
    teacher_forced: bool = False  # the row's CER comes from teacher-forced logits


PITFALLS = (
    Pitfall(
        "reference",
        "reference (the recipe)",
        "Decoder starts from `</s>`, labels are the text then `</s>` padded with -100, generation sized to "
        "the data, the processor's normalization, a fine-tuning learning rate, generate-based CER.",
    ),
    Pitfall(
        "bos_start",
        "1. decoder starts from `<s>`",
        "The checkpoint's decoder always read its first input as `</s>`. From `<s>`, every line starts from an "
        "input it never saw, and fine-tuning spends its steps relearning the start instead of reading.",
        start_from_bos,
    ),
    Pitfall(
        "bos_in_labels",
        "2. `<s>` kept in labels",
        "The target gains a first token that says nothing about the image: the model is taught to write `<s>` "
        "after `</s>`, then to read from `<s>`, so every text token moves one position from where the checkpoint "
        "learned it.",
        bos_in_labels,
    ),
    Pitfall(
        "pads_in_loss",
        "3. pads not -100",
        "Pad positions count in the loss. Pad after `</s>` or pad is trivial to predict, so the loss is "
        "diluted by easy tokens and falls while the text tokens' share of the gradient shrinks: the loss no "
        "longer measures reading.",
        pads_in_loss,
    ),
    Pitfall(
        "max_length_20",
        "4. generation max length 20",
        "generate() stops at 20 tokens, the start token included: every line longer than 19 tokens is cut "
        "whatever the model learned. Training is untouched, so no amount of it helps.",
        max_length_20,
    ),
    Pitfall(
        "wrong_normalization",
        "7. pixels in [0, 1] (mean 0, std 1)",
        "The checkpoint saw pixels in [-1, 1] (mean 0.5, std 0.5). In [0, 1] every image is shifted and its "
        "contrast halved, so the encoder's features are not the ones the decoder learned to read.",
        zero_one_pixels,
    ),
    Pitfall(
        "learning_rate_x10",
        "9. learning rate x10",
        "Steps sized for training from scratch throw a converged model off its optimum in the first updates; "
        "the loss recovers on the training lines sooner than the reading does.",
        learning_rate_x10,
    ),
    Pitfall(
        "teacher_forcing_cer",
        "8. CER from teacher forcing",
        "Each position is predicted from the true previous tokens and the labels say where the line ends: "
        "errors never compound and no line runs on or stops early. The same model decoding with generate(), "
        "as at test time, pays for both.",
        teacher_forced=True,
    ),
)


# The seed's own attempts beside the full fine-tuning of the reference row (--attempts).
ATTEMPTS = (
    Pitfall(
        "last_layers",
        "attempt: last encoder layer + two decoder layers",
        "Only the encoder's last layer and the decoder's last two layers train (`trainable`), the rest frozen: "
        "fewer weights to move away from what the checkpoint reads well.",
        last_layers_trainable,
    ),
)


ATTEMPT_NAMES = {attempt.name for attempt in ATTEMPTS}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="runs/demo", help="Converged checkpoint folder to start every row from.")
    parser.add_argument("--dataset", default="data/newhand", help="Dataset to fine-tune it on (dataset_name).")
    parser.add_argument(
        "--recipe",
        default="recipes/demo_newhand.json",
        help="Recipe whose settings every row keeps (batch size, beams, schedule, seed, augmentation); the "
        "flags below override its steps, learning rate and warmup, and evaluation happens only before and after.",
    )
    parser.add_argument(
        "--output_dir", default="runs/pitfalls", help="Where pitfalls.md, pitfalls.json and one folder per row go."
    )
    parser.add_argument("--max_steps", type=int, default=120, help="Optimizer steps of fine-tuning per row.")
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=5e-4,
        help="Peak learning rate of the reference row, a fine-tuning rate (the paper fine-tuned at 2e-5); row 9 "
        "uses ten times this. Rows 1 and 2 cost less the higher it is: docs/pitfalls.md#measured has a sweep.",
    )
    parser.add_argument(
        "--warmup_steps", type=int, default=10, help="Linear warmup steps before the recipe's schedule."
    )
    parser.add_argument(
        "--split", choices=("validation", "test"), default="test", help="Split the CER is scored on."
    )
    parser.add_argument("--eval_samples", type=int, default=200, help="Score the first N lines of --split.")
    parser.add_argument("--seeds", type=int, nargs="+", help="Run every row once per seed (default: the recipe's).")
    parser.add_argument("--rows", nargs="+", help="Only these pitfall rows (names as in pitfalls.json), and the reference.")
    parser.add_argument("--attempts", action="store_true", help="Add the seed's attempts (ATTEMPTS) as rows.")
    parser.add_argument(
        "--own_domain",
        action="store_true",
        help=f"The model fine-tuned on its own data: the reference must hold its CER (within {HOLD_TOLERANCE}) "
        "instead of improving.",
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help=f"Also put the table into docs/pitfalls.md, between the {README_START} and {README_END} lines "
        f"(with --own_domain: {OWN_START} and {OWN_END}).",
    )
    return parser.parse_args(argv)


def recipe_argv(args) -> list[str]:
    """The run_trocr.py arguments every row trains with (output_dir aside): the recipe with
    the fine-tuning budget, no evaluation or checkpoint during training, and the two settings
    run_trocr.py imposes (logging every step, raw columns kept for the image transform)."""
    limit = "--max_test_samples" if args.split == "test" else "--max_eval_samples"
    return [
        args.recipe,
        "--model_name_or_path", args.model,
        "--dataset_name", args.dataset,
        "--max_steps", str(args.max_steps),
        "--learning_rate", str(args.learning_rate),
        "--warmup_steps", str(args.warmup_steps),
        limit, str(args.eval_samples),
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--load_best_model_at_end", "false",
        "--report_to", "none",
        "--logging_steps", "1",
        "--remove_unused_columns", "false",
    ]


def evaluate(trainer, run: RunInputs, role: str, teacher_forced: bool = False) -> tuple[float, int | None]:
    """CER of split `role` with generate(), as the recipe scores, or from the teacher-forced
    logits; with generate, also the longest sequence generated, in tokens (start token included)."""
    tokenizer = run.processor.tokenizer
    trainer.compute_metrics = (TeacherForcedMetrics if teacher_forced else GeneratedTextMetrics)(
        tokenizer, run.references[role]
    )
    trainer.preprocess_logits_for_metrics = argmax_logits if teacher_forced else None
    trainer.args.predict_with_generate = not teacher_forced
    output = trainer.predict(run.inputs[role])
    if teacher_forced:
        return output.metrics["test_cer"], None
    tokens = np.isin(output.predictions, (-100, tokenizer.pad_token_id), invert=True)
    longest = max((int(np.nonzero(row)[0].max()) + 1 for row in tokens if row.any()), default=0)
    return output.metrics["test_cer"], longest


class EncoderInputRange:
    """The smallest and largest pixel value the encoder received, whatever normalized them
    (the collator, or the encoder's own hook for batches from dataloader workers)."""

    def __init__(self, model):
        self.range = [float("inf"), float("-inf")]
        model.encoder.register_forward_pre_hook(self, with_kwargs=True)  # after normalize_on_device's hook

    def __call__(self, encoder, args, kwargs):
        pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        self.range = [min(self.range[0], float(pixels.min())), max(self.range[1], float(pixels.max()))]


def planted(run: RunInputs, trainer, training_args, pixels: EncoderInputRange) -> dict:
    """What the row trained and decoded with, read back from the objects the trainer used:
    the proof that its pitfall (and only it) is in effect. The labels are those of the first
    four training lines through the trainer's collator."""
    train = run.inputs["train"]
    batch = trainer.data_collator([train[index] for index in range(min(4, len(train)))])
    return {
        "decoder_start_token_id": {
            "config": run.model.config.decoder_start_token_id,
            "generation_config": run.model.generation_config.decoder_start_token_id,
        },
        "generation_max_length": run.model.generation_config.max_length,
        "learning_rate": training_args.learning_rate,
        "trainable": getattr(training_args, "trainable", ["all"]),
        "image_mean": list(run.collator.image_mean),
        "image_std": list(run.collator.image_std),
        "pixel_range": pixels.range,
        "labels": batch["labels"].tolist(),
        "label_texts": [run.references["train"][index] for index in range(len(batch["labels"]))],
    }


def run_row(pitfall: Pitfall, argv: list[str], args, seed: int | None = None) -> dict:
    output_dir = Path(args.output_dir) / pitfall.name
    seed_flags = [] if seed is None else ["--seed", str(seed)]
    if args.seeds and len(args.seeds) > 1:
        output_dir = output_dir / f"seed-{seed}"
    model_args, data_args, training_args = parse_recipe(argv + seed_flags + ["--output_dir", str(output_dir)])
    setup_logging(training_args)
    logger.info("Row %s, seed %d", pitfall.title, training_args.seed)
    set_seed(training_args.seed)  # as run_trocr.py: every row starts from the same state and data order
    run = prepare_run(model_args, data_args, training_args)
    if pitfall.plant:
        pitfall.plant(run, training_args)
    # No run_preflight here: it would refuse most of these rows.
    pixels = EncoderInputRange(run.model)
    trainer = OcrTrainer(
        model=run.model,
        args=training_args,
        train_dataset=run.inputs["train"],
        processing_class=run.processor,
        data_collator=run.collator,
        callbacks=[LossLogCallback(training_args.output_dir)],
    )
    row = {"name": pitfall.name, "title": pitfall.title, "why": pitfall.why}
    row["baseline_cer"], _ = evaluate(trainer, run, args.split, pitfall.teacher_forced)
    if pitfall.teacher_forced:
        # Every dataloader draws its seed from torch's RNG: this second look must not move the
        # row's data order away from the other rows'.
        with torch.random.fork_rng():
            row["generated_baseline_cer"], _ = evaluate(trainer, run, args.split)
    trainer.train()
    row["cer"], row["longest_generation"] = evaluate(trainer, run, args.split, pitfall.teacher_forced)
    if pitfall.teacher_forced:
        row["generated_cer"], row["longest_generation"] = evaluate(trainer, run, args.split)
    row["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    row["first_loss"] = float(np.mean(row["losses"][:LOSS_WINDOW]))
    row["final_loss"] = float(np.mean(row["losses"][-LOSS_WINDOW:]))
    row["planted"] = planted(run, trainer, training_args, pixels)
    row["batch_size"], row["seed"] = training_args.per_device_train_batch_size, training_args.seed
    return row


def trend(before: float, after: float, tolerance: float, flat: str) -> str:
    if abs(after - before) <= tolerance:
        return flat
    return "up" if after > before else "down"


def what_user_sees(row: dict, reference_baseline: float) -> str:
    """The loss from the first steps to the final ones; the row's reported CER against the CER
    the starting checkpoint really has (the reference row's baseline)."""
    first, final = row["first_loss"], row["final_loss"]
    seen = (
        f"loss {trend(first, final, LOSS_TOLERANCE * abs(first), 'flat')}, "
        f"CER {trend(reference_baseline, row['cer'], CER_TOLERANCE, 'steady')}"
    )
    if "generated_cer" in row:
        seen += f" (generated CER {row['generated_cer']:.2f})"
    return seen


def unexpected(rows: list[dict], dataset: str, own_domain: bool = False) -> list[str]:
    """What would make the table misleading: a reference that did not improve (on its own
    hands: that did not hold its CER), a pitfall row that ended no worse than it (row 8
    aside: it trains as the reference does, its fault is the CER it reports)."""
    reference, found = rows[0], []
    if own_domain and reference["cer"] - reference["baseline_cer"] > HOLD_TOLERANCE:
        found.append(
            f"The reference row did not hold its CER on {dataset} (CER {reference['baseline_cer']:.2f} -> "
            f"{reference['cer']:.2f}, more than {HOLD_TOLERANCE} worse): give it a lower --learning_rate before "
            "reading the rows against it."
        )
    elif not own_domain and reference["baseline_cer"] - reference["cer"] <= CER_TOLERANCE:
        found.append(
            f"The reference row did not improve on {dataset} (CER {reference['baseline_cer']:.2f} -> "
            f"{reference['cer']:.2f}): give it more --max_steps or another --learning_rate before reading the "
            "rows against it."
        )
    found += [
        f"{row['title']} ends at CER {row['cer']:.2f}, no worse than the reference's {reference['cer']:.2f}"
        for row in rows[1:]
        if "generated_cer" not in row and row["cer"] <= reference["cer"] and row.get("name") not in ATTEMPT_NAMES
    ]
    return found


def fine_tuned(args, reference: dict) -> str:
    """The set-up every row shares, as the tables open with it (left open for more)."""
    return (f"`{args.model}` fine-tuned for {args.max_steps} steps on the `{args.dataset}` training split (batch "
            f"{reference['batch_size']}, learning rate {args.learning_rate:g} with {args.warmup_steps} warmup steps")


def markdown(rows: list[dict], args) -> str:
    reference = rows[0]
    lines = [
        f"{fine_tuned(args, reference)}, seed {reference['seed']}, the same data order in every row). CER: "
        f"corpus-level, on the first "
        f"{args.eval_samples} lines of the {args.split} split, with generate() unless the row says otherwise; "
        f"baseline is the starting checkpoint scored the way the row scores. Final training loss: mean of "
        f"the last {LOSS_WINDOW} steps (\"loss down\" compares it with the first {LOSS_WINDOW}).",
        "",
        "| pitfall | what the user sees | baseline CER | CER after fine-tuning | after, against the reference's "
        "| final training loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        baseline, after = f"{row['baseline_cer']:.2f}", f"{row['cer']:.2f}"
        against = f"{row['cer'] - reference['cer']:+.2f}"
        if "generated_cer" in row:
            baseline += f" (generated {row['generated_baseline_cer']:.2f})"
            after += f" (generated {row['generated_cer']:.2f})"
            against += f" (generated {row['generated_cer'] - reference['cer']:+.2f})"
        lines.append(
            f"| {row['title']} | {what_user_sees(row, reference['baseline_cer'])} | {baseline} | {after} | "
            f"{against} | {row['final_loss']:.4f} |"
        )
    lines += ["", "Why:", ""] + [f"- **{row['title']}**: {row['why']}" for row in rows]
    return "\n".join(lines) + "\n"


def write_readme(table: str, readme: Path, start: str = README_START, end: str = README_END) -> None:
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no {start} ... {end} lines to put the table between")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{table}{end}", text), encoding="utf-8")


def across_seeds(runs: dict[str, list[dict]]) -> list[dict]:
    """Each row's first run, with its CER and its gap to the reference per seed, their means
    and ranges, and `ends_worse`: worse than the reference in every seed, by more on average
    than the reference's own range over the seeds."""
    references = [row["cer"] for row in runs["reference"]]
    noise = max(references) - min(references)
    rows = []
    for by_seed in runs.values():
        cers = [row["cer"] for row in by_seed]
        gaps = [cer - reference for cer, reference in zip(cers, references, strict=True)]
        rows.append({**by_seed[0], "seeds": [row["seed"] for row in by_seed], "cers": cers, "gaps": gaps,
                     "cer_mean": float(np.mean(cers)), "gap_mean": float(np.mean(gaps)), "reference_range": noise,
                     "ends_worse": min(gaps) > 0 and float(np.mean(gaps)) > noise})
    return rows


def mean_range(values: list[float], spec: str = ".2f") -> str:
    """`mean (lowest to highest)`, each formatted with `spec`: a figure over seeds, as the tables give it."""
    return f"{float(np.mean(values)):{spec}} ({min(values):{spec}} to {max(values):{spec}})"


def markdown_seeds(rows: list[dict], args) -> str:
    """The table over several seeds: mean and range, and the verdict only beyond the spread."""
    reference = rows[0]
    lines = [
        f"{fine_tuned(args, reference)}), once per seed "
        f"({', '.join(map(str, reference['seeds']))}: data order, dropout, augmentation). CER on the first "
        f"{args.eval_samples} lines of the {args.split} split, generate() unless the row says otherwise. The "
        f"reference's CER after spans {reference['reference_range']:.2f} points over the seeds: a row \"ends worse\" "
        "only when it ends worse than the reference in every seed and by more than that on average.",
        "",
        "| row | baseline CER | CER after, mean (range) | after, against the reference's: mean (range) | ends worse |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['title']} | {row['baseline_cer']:.2f} | {mean_range(row['cers'])} | "
            f"{mean_range(row['gaps'], '+.2f')} | "
            f"{'-' if row['name'] == 'reference' else 'yes' if row['ends_worse'] else 'within the spread'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(
            f"{args.model}: no checkpoint there (no config.json). Run `make demo` first: it trains the demo "
            "model into runs/demo, the default; --model names another checkpoint folder."
        )
    chosen = [row for row in PITFALLS if not args.rows or row.name == "reference" or row.name in args.rows]
    chosen += ATTEMPTS if args.attempts else ()
    argv = recipe_argv(args)
    runs, warnings, started = {}, [], time.time()
    for seed in args.seeds or [None]:
        for pitfall in chosen:
            row_started = time.time()
            row = run_row(pitfall, argv, args, seed)
            runs.setdefault(pitfall.name, []).append(row)
            logger.info(
                "%s (seed %d): CER %.2f -> %.2f, final loss %.4f (%.0f s)", pitfall.title, row["seed"],
                row["baseline_cer"], row["cer"], row["final_loss"], time.time() - row_started,
            )
        seed_rows = [by_seed[-1] for by_seed in runs.values()]
        found = unexpected(seed_rows, args.dataset, args.own_domain)
        warnings += [f"seed {seed_rows[0]['seed']}: {warning}" for warning in found] if args.seeds else found
    for warning in warnings:
        logger.warning(warning)

    several = args.seeds and len(args.seeds) > 1
    rows = across_seeds(runs) if several else [by_seed[0] for by_seed in runs.values()]
    table = markdown_seeds(rows, args) if several else markdown(rows, args)
    output = Path(args.output_dir)
    (output / "pitfalls.md").write_text(table, encoding="utf-8")
    settings = {key: value for key, value in vars(args).items() if key != "readme"}
    summary = {"settings": settings, "seconds": round(time.time() - started, 1), "warnings": warnings, "rows": rows,
               "runs": {name: by_seed[1:] for name, by_seed in runs.items()} if several else {}}
    (output / "pitfalls.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(table)
    if args.readme:
        write_readme(table, ROOT / "docs" / "pitfalls.md", *((OWN_START, OWN_END) if args.own_domain else ()))
        logger.info("Table written into %s", ROOT / "docs" / "pitfalls.md")
    logger.info("Wrote %s and pitfalls.json (%.0f s in all)", output / "pitfalls.md", time.time() - started)
    return rows


if __name__ == "__main__":
    main()
