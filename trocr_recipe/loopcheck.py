"""Checks a training loop of your own for the pitfalls of docs/pitfalls.md, on your own
objects: the model as your loop configured it, one batch as your loader gives it, and your
validation step. Nothing of the recipe's data path is involved, and nothing you pass makes
it raise: what cannot be read or run becomes a finding, and the other checks still run.

    from trocr_recipe.loopcheck import check_loop, format_findings

    batch = next(iter(train_loader))  # {"pixel_values": (B, 3, H, W), "labels": (B, L), ...}
    findings = check_loop(model, processor, batch, texts=batch_texts, evaluate=validation_step)
    print(format_findings(findings))

`evaluate(model, batch) -> list[str]` is your validation step on one batch (the texts it
predicts); it is run beside `model.generate` and the teacher-forced argmax. A Seq2SeqTrainer
script checks itself with `trocr_recipe.trainercheck.check_trainer(trainer)`. From a shell,
on a saved batch: `python check_loop.py --model DIR --batch batch.pt`.

The step-by-step comparison's two pieces are here too (from trocr_recipe.steptrace):
`ReferenceBatches(trace_dir)`, a reference run's exact batches, and `StepLog(output_dir)`,
the log `compare_runs.py` reads.
"""

import sys
from collections.abc import Callable, Mapping

import torch

from .data import encode_labels
from .pitfalls import PITFALLS_DOC, Finding, Subject, run_checks
from .pitfalls.core import IGNORE_INDEX
from .pitfalls.generation import config_generation_settings, effective_generation
from .pitfalls.generation import room as generation_room
from .pitfalls.labels import label_rows
from .predictions import evaluation_paths
from .steptrace import ReferenceBatches, StepLog

__all__ = ["check_loop", "format_findings", "has_errors", "LoopReport", "ReferenceBatches", "StepLog",
           "IGNORE_INDEX", "generation_room", "validate_batch", "subject_for"]


class LoopReport(list):
    """The findings (a list of `Finding`), plus what was checked and, with an evaluation,
    the corpus CER of each decoding path on the batch."""

    def __init__(self, findings=(), checked: list[str] | None = None, scores: dict | None = None):
        super().__init__(findings)
        self.checked = checked or []
        self.scores = scores or {}


def check_loop(model, processor, batch, texts: list[str] | None = None, evaluate: Callable | None = None,
               learning_rate: float | None = None, dataset_texts: list[str] | None = None) -> LoopReport:
    """Every check on your model, your batch (`pixel_values`, `labels`; `texts` is taken from
    the batch when not given), your validation step, and where given your learning rate and the
    texts of your whole training set (counted against the generation settings)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    subject, problems = subject_for(model, tokenizer, getattr(processor, "image_processor", None), batch, texts)
    subject.learning_rate = learning_rate
    if dataset_texts:
        subject.corpus = {"name": "the dataset", "rows": encode_texts(tokenizer, dataset_texts)}
    report = LoopReport(problems, checked=[
        "model: special token ids on model.config, its decoder config and generation_config; vocabulary; "
        "the generation settings decoding uses",
        f"batch: {len(subject.rows or [])} lines, labels{' against their texts' if subject.texts else ''}"
        + (f", pixel values {tuple(subject.pixel_values.shape[1:])}" if subject.pixel_values is not None else ""),
    ])
    if evaluate is not None:
        subject.evaluation = evaluation_paths(subject, batch, evaluate, report)
    report += run_checks(subject)
    report.sort(key=lambda finding: finding.level != "error")
    return report


def subject_for(model, tokenizer, image_processor, batch, texts=None) -> tuple[Subject, list[Finding]]:
    """The Subject of a user's model and batch, and a finding for what of the batch could not be read."""
    generation, sources = effective_generation(model)
    subject = Subject(model=model, tokenizer=tokenizer, image_processor=image_processor, generation=generation,
                      generation_sources=sources, config_generation_settings=config_generation_settings(model.config),
                      checkpoint=getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None))
    try:
        pixel_values, labels, texts = read_batch(batch, texts)
    except ValueError as error:
        return subject, [Finding("batch_not_read", "error", f"The batch could not be read: {error}.",
                                 fix="pass one batch as your loader yields it: a dict with pixel_values (B, C, H, W) "
                                     "and labels (B, L), or the tuple (pixel_values, labels)")]
    subject.pixel_values, subject.labels, subject.texts = pixel_values, labels, texts
    subject.rows = label_rows(labels, tokenizer)
    return subject, []


def read_batch(batch, texts=None) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """pixel_values and labels from a dict, a BatchEncoding or a (pixel_values, labels[, texts])
    tuple; labels as a tensor or lists (ragged lists padded with -100); texts where they fit."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        batch = {"pixel_values": batch[0], "labels": batch[1], **({"texts": batch[2]} if len(batch) > 2 else {})}
    if texts is None and isinstance(batch, Mapping):
        texts = batch.get("texts")
    pixel_values, labels, texts = validate_batch(batch, texts)
    if labels.numel() == 0:
        raise ValueError(f"an empty batch or empty labels: labels {tuple(labels.shape)}, pixel_values "
                         f"{tuple(pixel_values.shape)}")
    return pixel_values, labels, texts


def validate_batch(batch, texts) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """pixel_values (B, C, H, W) floats, labels (B, L) integers, texts B strings or None; a
    ValueError saying what is wrong otherwise."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"the batch is a {type(batch).__name__}, not a dict with pixel_values and labels")
    missing = [key for key in ("pixel_values", "labels") if key not in batch]
    if missing:
        raise ValueError(f"the batch has no {' and no '.join(missing)} (its keys: {sorted(map(str, batch))})")
    pixel_values, labels = batch["pixel_values"], _as_labels(batch["labels"])
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values is {shape}: expected a tensor (batch, channels, height, width)")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values are {pixel_values.dtype}: the model takes the processor's float values")
    if labels.dim() != 2 or labels.is_floating_point():
        raise ValueError(f"labels are {labels.dtype} {tuple(labels.shape)}: expected integer ids (batch, length)")
    if len(labels) != len(pixel_values):
        raise ValueError(f"{len(pixel_values)} images (pixel_values) but {len(labels)} label rows")
    if texts is not None and not (
        isinstance(texts, (list, tuple)) and len(texts) == len(labels) and all(isinstance(text, str) for text in texts)
    ):
        got = f"{len(texts)} items" if isinstance(texts, (list, tuple)) else f"a {type(texts).__name__}"
        raise ValueError(f"texts must be a list of {len(labels)} strings, one per line of the batch; got {got}")
    return pixel_values, labels.detach().cpu(), None if texts is None else list(texts)


def _as_labels(labels) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels
    try:
        return torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        pass
    if isinstance(labels, (list, tuple)) and all(isinstance(row, (list, tuple)) for row in labels) and labels:
        padded = torch.full((len(labels), max(map(len, labels))), IGNORE_INDEX)
        for line, row in enumerate(labels):
            padded[line, : len(row)] = torch.as_tensor(row, dtype=torch.long) if row else padded[line, :0]
        return padded
    raise ValueError(f"labels ({type(labels).__name__}) cannot be read as (batch, length) ids")


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """The recipe's labels of `texts` (data.encode_labels), none truncated."""
    return encode_labels(tokenizer, list(texts), max_target_length=sys.maxsize)[0]


def format_findings(findings: list[Finding]) -> str:
    """What was checked, the CERs of an evaluation, then each finding, errors first."""
    checked = getattr(findings, "checked", [])
    lines = [f"Checked {'; '.join(checked)}."] if checked else []
    scores = getattr(findings, "scores", {})
    if scores:
        lines.append("CER on this batch: " + ", ".join(f"{name.replace('_', '-')} {value:.2f}"
                                                        for name, value in scores.items()))
    errors = sum(finding.level == "error" for finding in findings)
    if not findings:
        return "\n".join(lines + ["No mistake found."])
    lines.append(f"{errors} error(s), {len(findings) - errors} warning(s), each explained in {PITFALLS_DOC}:")
    return "\n".join(lines + [str(finding) for finding in findings])


def has_errors(findings: list[Finding]) -> bool:
    return any(finding.level == "error" for finding in findings)
