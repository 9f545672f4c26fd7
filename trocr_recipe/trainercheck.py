"""Checks a Seq2SeqTrainer script of your own in one line, before `trainer.train()`:

    from trocr_recipe.trainercheck import check_trainer
    from trocr_recipe.loopcheck import format_findings

    print(format_findings(check_trainer(trainer)))

It reads everything from the trainer: the first lines of its training set through its own
Dataset and collator (the trainer's sequential evaluation loader, so that their texts are
known), the model's configs and generation settings, and the evaluation as the Trainer runs
it: `prediction_step` with the training arguments' generation settings on the first lines of
the evaluation set, then your `compute_metrics` on them, compared with the corpus CER of the
same predictions against the raw texts (read from the dataset's `text` column, a `df` with
one, or given as `texts=`). Nothing it meets makes it raise: what cannot be run is a finding.
"""

import jiwer
import numpy as np
import torch

from .loopcheck import LoopReport, encode_texts, format_findings, has_errors, subject_for
from .metrics import corpus_cer, decode, line_cer
from .pitfalls import Finding, run_checks
from .pitfalls.core import NOT_CHECKED, combine
from .pitfalls.generation import effective_generation
from .predictions import evaluation_paths, generate

TEXT_COLUMNS = ("text", "texts", "transcription", "sentence", "label_text")
LINES = 8  # lines of each split read through the user's Dataset and collator

__all__ = ["check_trainer", "dataset_texts", "format_findings", "has_errors"]


def _not_checked(what: str, error: Exception, fix: str, pitfall: int | None = None) -> Finding:
    return Finding("not_checked", "warning", f"{what} failed; what needs it is not checked.", pitfall=pitfall,
                   evidence=f"{type(error).__name__}: {error}", effect=NOT_CHECKED, fix=fix)


def dataset_texts(dataset) -> list[str] | None:
    """The raw texts of a dataset, in its order: a datasets.Dataset column, the `text` column of
    a pandas `df` attribute (the community notebook's Dataset), or a `texts` list."""
    try:
        names = getattr(dataset, "column_names", None) or []
        for name in TEXT_COLUMNS:
            if name in names:
                return [str(text) for text in dataset[name]]
        frame = getattr(dataset, "df", None)
        for name in TEXT_COLUMNS:
            if frame is not None and name in getattr(frame, "columns", []):
                return [str(text) for text in frame[name]]
        texts = getattr(dataset, "texts", None)
        return [str(text) for text in texts] if isinstance(texts, (list, tuple)) else None
    except Exception:  # a user's dataset may do anything on access
        return None


def first_lines(trainer, dataset, count: int = LINES):
    """The first `count` lines of `dataset` through the user's Dataset and collator (the trainer's
    evaluation loader: in order, with the Trainer's own column handling), as one batch."""
    if hasattr(dataset, "select"):
        subset = dataset.select(range(min(count, len(dataset))))
    else:
        subset = torch.utils.data.Subset(dataset, range(min(count, len(dataset))))
    batches = iter(trainer.get_eval_dataloader(subset))
    batch = next(batches)
    return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _tokenizer(trainer, processor):
    for candidate in (processor, getattr(trainer, "processing_class", None)):
        if candidate is None:
            continue
        tokenizer = getattr(candidate, "tokenizer", candidate)
        if hasattr(tokenizer, "batch_decode") and hasattr(tokenizer, "eos_token_id"):
            return tokenizer, getattr(candidate, "image_processor", None)
    return None, getattr(processor, "image_processor", None)


def check_trainer(trainer, processor=None, texts: list[str] | None = None, eval_texts: list[str] | None = None,
                  lines: int = LINES) -> LoopReport:
    """Every pitfall check on a Seq2SeqTrainer as it stands before `train()`; `processor` where
    the trainer was given none (or only an image processor), `texts` / `eval_texts` where the
    datasets' texts cannot be read."""
    report = LoopReport()
    tokenizer, image_processor = _tokenizer(trainer, processor)
    if tokenizer is None:
        report.append(Finding("not_checked", "error", "No tokenizer was found on the trainer.",
                              evidence=f"trainer.processing_class is {type(trainer.processing_class).__name__}",
                              effect="Nothing can be decoded: no check ran.",
                              fix="check_trainer(trainer, processor=processor)"))
        return report
    texts = texts or dataset_texts(trainer.train_dataset)
    try:
        batch = first_lines(trainer, trainer.train_dataset, lines)
    except Exception as error:
        report.append(_not_checked("Reading the first training lines through your Dataset and collator", error,
                                   "trainer.get_eval_dataloader(your training set) must yield dicts of tensors"))
        batch = None
    subject, problems = subject_for(trainer.model, tokenizer, image_processor, batch or {},
                                    texts[: len(batch["labels"])] if texts and batch else None)
    report += [] if batch is None else problems
    _trainer_settings(subject, trainer, texts)
    report.checked = [
        "model: special token ids on model.config, its decoder config and generation_config; vocabulary; the "
        "generation settings of the model and of the training arguments",
        f"training lines 0-{len(subject.rows or []) - 1} through your Dataset and collator"
        + (" against their texts" if subject.texts else " (texts not found: pass texts=)"),
    ]
    evaluation = _trainer_evaluation(trainer, subject, eval_texts or dataset_texts(trainer.eval_dataset), lines, report)
    report += run_checks(subject)
    if evaluation is not None:  # the evaluation as the Trainer runs it: pitfalls 4, 8, 10 and 11
        evaluation.rows = None  # its labels were checked as the training lines were
        for finding in run_checks(evaluation, (4, 8, 10, 11)):
            same = next((line for line, found in enumerate(report) if found.name == finding.name), None)
            if same is None:
                report.append(finding)
            else:
                report[same] = combine(report[same], finding)
    report.sort(key=lambda finding: finding.level != "error")
    return report


def _trainer_settings(subject, trainer, texts) -> None:
    """What the Trainer adds: its generation arguments, its learning rate, the dataset's lines."""
    args = trainer.args
    subject.generation, subject.generation_sources = effective_generation(
        trainer.model, _gen_kwargs(args), "Seq2SeqTrainingArguments")
    subject.learning_rate = args.learning_rate
    if texts:
        subject.corpus = {"name": "the training set", "rows": encode_texts(subject.tokenizer, texts)}


def _gen_kwargs(args) -> dict:
    """The generation arguments Seq2SeqTrainer.evaluate() hands to prediction_step."""
    return {key: value for key, value in (("max_length", getattr(args, "generation_max_length", None)),
                                          ("num_beams", getattr(args, "generation_num_beams", None)))
            if value is not None}


def _trainer_evaluation(trainer, subject, texts, lines: int, report: LoopReport):
    """The first evaluation lines as the Trainer evaluates them, and compute_metrics on them."""
    dataset = trainer.eval_dataset
    if dataset is None:
        report.checked.append("evaluation: no eval_dataset on the trainer")
        return None
    try:
        batch = first_lines(trainer, dataset, lines)
    except Exception as error:
        report.append(_not_checked("Reading the first evaluation lines through your Dataset and collator", error,
                                   "trainer.get_eval_dataloader() must yield dicts of tensors", pitfall=8))
        return None
    evaluation, problems = subject_for(trainer.model, subject.tokenizer, subject.image_processor, batch,
                                       texts[: len(batch.get("labels", []))] if texts else None)
    if problems or evaluation.labels is None:
        report += problems
        return None
    evaluation.generation, evaluation.generation_sources = subject.generation, subject.generation_sources
    theirs_ids = _prediction_step(trainer, batch, subject, report)
    theirs = None if theirs_ids is None else decode(subject.tokenizer, theirs_ids)
    if theirs:
        evaluation.evaluation = evaluation_paths(evaluation, batch, None, report, theirs=theirs,
                                                 what=f"prediction_step on evaluation lines 0-{len(theirs) - 1}")
    ids = theirs_ids if theirs_ids is not None else _our_ids(evaluation, report)
    if ids is not None and trainer.compute_metrics is not None:
        evaluation.metrics = _metrics(trainer, evaluation, ids, report)
    if evaluation.metrics:
        report.checked.append("compute_metrics: yours on those predictions, against the corpus CER of the raw texts")
    return evaluation


def _prediction_step(trainer, batch, subject, report):
    """Your evaluation step's predicted ids: generated with predict_with_generate, else the
    argmax of the logits the Trainer hands to compute_metrics."""
    try:
        _, predicted, _ = trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=False,
                                                  **_gen_kwargs(trainer.args))
    except Exception as error:
        if subject.config_generation_settings and isinstance(error, ValueError):
            subject.generate_error = str(error).split(". ")[0][:200]
        report.append(_not_checked("trainer.prediction_step (your evaluation as the Trainer runs it)", error,
                                   "see the other findings (settings on model.config: pitfall 5)", pitfall=8))
        return None
    if isinstance(predicted, tuple):
        predicted = predicted[0]
    predicted = predicted.detach().cpu()
    return predicted.argmax(-1) if predicted.is_floating_point() else predicted


def _our_ids(subject, report):
    """generate() with the settings as meant, when the Trainer's own step could not run."""
    try:
        model = subject.model
        with torch.no_grad():
            return generate(subject, subject.pixel_values.to(model.device, model.dtype)).cpu()
    except Exception as error:
        report.append(_not_checked("generate() on the evaluation lines", error, "see the other findings", pitfall=11))
        return None


def _metric_value(result: dict) -> tuple[str, float] | None:
    for key, value in (result or {}).items():
        if "cer" in str(key).lower() and isinstance(value, (int, float, np.floating)):
            return str(key), float(value)
    return None


def _metrics(trainer, subject, ids, report) -> dict | None:
    """Your compute_metrics on the predictions, against what it may have scored."""
    from transformers import EvalPrediction

    labels = subject.labels
    try:
        result = trainer.compute_metrics(EvalPrediction(predictions=ids.numpy().copy(), label_ids=labels.numpy().copy()))
    except Exception as error:
        report.append(_not_checked("Your compute_metrics on the evaluation lines", error,
                                   "compute_metrics(EvalPrediction(predictions=ids, label_ids=labels)) must run",
                                   pitfall=11))
        return None
    found = _metric_value(result)
    if found is None or not subject.texts:
        report.checked.append("compute_metrics: " + ("no CER in its result" if found is None else
                                                     "not compared, the evaluation texts were not found (eval_texts=)"))
        return None
    return compare_metric(subject.tokenizer, subject.texts, ids, labels, *found)


def compare_metric(tokenizer, texts, ids, labels, key: str, value: float) -> dict:
    """Which way of scoring the predictions `ids` gives the user's `value`: the corpus CER of the
    raw texts, or one of the wrong ways (see metric_candidates)."""
    candidates, example = metric_candidates(tokenizer, texts, ids, labels)
    matches = next((name for name, score in candidates.items() if _same_score(value, score)), "none")
    score = next((score for score in candidates.get(matches, []) if _same_score(value, score)), None)
    return {"key": key, "value": value, "candidates": candidates, "matches": matches, "score": score,
            "example": example if matches == "label_references" else None}


def _same_score(value: float, scores) -> bool:
    return any(abs(value * scale - score) <= 1e-3 * max(1.0, abs(score))
               for scale in (1.0, 100.0) for score in np.atleast_1d(scores))


def _scores(references: list[str], predictions: list[str]) -> list[float]:
    """The CER (percent) on raw strings, and as jiwer.cer's defaults give it (stripped ends)."""
    return [corpus_cer(references, predictions), 100.0 * jiwer.cer(references, predictions)]


def metric_candidates(tokenizer, texts, ids, labels) -> tuple[dict, tuple | None]:
    """The CER of the same predictions scored the right way first, then each wrong way."""
    cleaned = lambda rows: tokenizer.batch_decode(  # noqa: E731
        np.where(np.asarray(rows) < 0, tokenizer.pad_token_id, rows), skip_special_tokens=True,
        clean_up_tokenization_spaces=True)
    predictions, from_labels = decode(tokenizer, ids), decode(tokenizer, labels)
    candidates = {"corpus": _scores(texts, predictions)}
    rebuilt = [(refs, preds) for refs in (from_labels, cleaned(labels)) for preds in (predictions, cleaned(ids))
               if refs != texts]
    for refs, preds in rebuilt:
        if not any(_same_score(score, candidates["corpus"]) for score in _scores(refs, preds)):
            candidates["label_references"] = _scores(refs, preds)
            break
    candidates["cleaned"] = _scores(texts, cleaned(ids))
    candidates["lowercased"] = _scores([text.lower() for text in texts], [text.lower() for text in predictions])
    candidates["per_line_mean"] = [float(np.mean([line_cer(text, line) for text, line in zip(texts, predictions)]))]
    example = next(((text, ref) for refs, _ in rebuilt[:1] for text, ref in zip(texts, refs) if text != ref), None)
    return candidates, example
