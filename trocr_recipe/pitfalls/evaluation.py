"""Pitfalls of the evaluation: teacher-forced validation (8), a CER averaged per line or
batch (10), and references or predictions that are not the raw texts (11)."""

from ..metrics import decode
from .core import EXAMPLES, Part, Subject, merge, pitfall
from .labels import _cut_lines

GENERATE_FIX = ("score validation with model.generate(pixel_values=...) decoded with skip_special_tokens=True, "
                "clean_up_tokenization_spaces=False")


def _lines(evaluation: dict, kind: str) -> str:
    kinds, theirs, ours = evaluation["kinds"], evaluation["theirs"], evaluation["generate"]
    lines = [line for line, found in enumerate(kinds) if found == kind]
    quoted = "; ".join(f"line {line}: yours {theirs[line]!r}, generate() {ours[line]!r}" for line in lines[:EXAMPLES])
    return f"{len(lines)} of {len(kinds)} lines, {quoted}"


def _scores(evaluation: dict) -> str:
    scores = evaluation.get("scores") or {}
    return ("; CER on this batch: " + ", ".join(f"{name.replace('_', '-')} {value:.2f}" for name, value in
                                                scores.items())) if scores else ""


@pitfall(8, "teacher_forced_eval")
def check_teacher_forcing(subject: Subject):
    """Your validation predictions must be what generate() writes, not the teacher-forced argmax."""
    evaluation = subject.evaluation
    if not evaluation:
        return None
    parts = []
    if "teacher_forced" in evaluation["kinds"]:
        parts.append(Part(
            "error", "Your validation step scores the teacher-forced argmax, not generated text.",
            "your predictions equal the argmax of model(pixel_values, labels) and differ from generate(): "
            + _lines(evaluation, "teacher_forced") + _scores(evaluation),
            "Each position is predicted from the true previous tokens and the labels say where lines end: the "
            "validation CER looks good and improves while the generated (test) CER does not.", GENERATE_FIX,
        ))
    if "other" in evaluation["kinds"]:
        parts.append(Part(
            "warning", "Your validation step's predictions are neither generate() with the model's generation "
            "config nor the teacher-forced argmax.", _lines(evaluation, "other") + _scores(evaluation),
            "Validation is scored otherwise than a test with generate() would be: its CER is not the one you get.",
            GENERATE_FIX + ", with the settings of model.generation_config",
        ))
    return merge(check_teacher_forcing, parts)


@pitfall(10, "per_line_cer")
def check_corpus_cer(subject: Subject):
    """The CER is corpus-level: total edits over total reference characters, not a mean of
    per-line (or per-batch) rates."""
    metrics = subject.metrics
    if not metrics or metrics.get("matches") != "per_line_mean":
        return None
    return merge(check_corpus_cer, [Part(
        "error", "Your compute_metrics averages the CER per line.",
        f"your {metrics['key']} {metrics['value']:.4g} equals the mean of the per-line rates "
        f"({metrics['score']:.4g}); the corpus CER of the same predictions is "
        f"{metrics['candidates']['corpus'][0]:.4g}",
        "Short lines weigh as much as long ones: the figure is not the paper's CER and moves differently.",
        "jiwer.cer(references, predictions) on the whole list (total edits / total reference characters)",
    )])


def _label_parts(subject: Subject) -> list[Part]:
    """Labels that decode to other text than their raw text (besides a lost first piece, pitfall 12)."""
    if not subject.texts or not subject.rows:
        return []
    cut = {line for line, _, _ in _cut_lines(subject)}
    limit = subject.max_target_length
    other = [(line, text, label) for line, (text, row) in enumerate(zip(subject.texts, subject.rows or []))
             if line not in cut and (limit is None or len(row) < limit)
             and (label := decode(subject.tokenizer, [row])[0] if row else "") != text]
    if not other:
        return []
    width = subject.labels.shape[1] if subject.labels is not None else None
    eos = subject.tokenizer.eos_token_id
    truncated = [line for line, _, _ in other if width and len(subject.rows[line]) == width
                 and subject.rows[line][-1] != eos]
    return [Part(
        "error", f"{len(other)} of {len(subject.rows)} labels do not decode back to their text.",
        "; ".join(f"line {line}: text {text!r}, label decodes to {label!r}" for line, text, label in other[:EXAMPLES])
        + (f"; lines {truncated} fill the whole label width {width} without </s>: truncated" if truncated else ""),
        "The model is trained on text other than the ground truth; references rebuilt from these labels are not the "
        "ground truth either.",
        "build labels from the raw text with the checkpoint's own tokenizer and a max_length that fits the longest "
        "line; score against the raw texts, never tokenizer.decode(labels)",
    )]


def _metric_parts(subject: Subject) -> list[Part]:
    metrics = subject.metrics or {}
    why = {"label_references": "the references are the label ids decoded back, not the raw texts",
           "cleaned": "the texts are decoded with clean_up_tokenization_spaces=True",
           "lowercased": "the texts are lower-cased before scoring"}.get(metrics.get("matches"))
    if metrics.get("matches") == "none":
        return [Part(
            "warning", "Your compute_metrics gives another CER than the corpus CER of the same predictions.",
            f"your {metrics['key']} {metrics['value']:.4g}; against the raw texts, predictions decoded without "
            f"clean-up, the corpus CER is {metrics['candidates']['corpus'][0]:.4g} (or {metrics['candidates']['corpus'][0] / 100:.4g} "
            "as a fraction)",
            "Validation is scored otherwise than the paper's CER: its figures cannot be compared with published ones.",
            "jiwer.cer(raw_texts, predictions) over the whole evaluation set",
        )]
    if not why:
        return []
    return [Part(
        "error", f"Your compute_metrics scores something other than the raw texts: {why}.",
        f"your {metrics['key']} {metrics['value']:.4g} equals that variant "
        f"({metrics['score']:.4g}); scored against the raw texts with predictions decoded "
        f"without clean-up it is {metrics['candidates']['corpus'][0]:.4g}"
        + (f"; e.g. reference {metrics['example'][0]!r} scored as {metrics['example'][1]!r}"
           if metrics.get("example") else ""),
        "The text scored is not the ground truth (the tokenizer's clean-up glues IAM's 'presto !' into 'presto!'): "
        "the CER is not the paper's and can hide truncated labels.",
        "keep the raw texts of the evaluation set and score predictions decoded with skip_special_tokens=True, "
        "clean_up_tokenization_spaces=False against them",
    )]


def _cleaned_parts(subject: Subject) -> list[Part]:
    evaluation = subject.evaluation
    if not evaluation or "cleaned" not in evaluation["kinds"]:
        return []
    return [Part(
        "warning", "Your validation step decodes with clean_up_tokenization_spaces=True.",
        _lines(evaluation, "cleaned") + _scores(evaluation),
        "Clean-up changes IAM's spacing around punctuation: the text scored is not what the model wrote.",
        "tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)",
    )]


@pitfall(11, "references_not_texts")
def check_references(subject: Subject):
    """Labels decode to their raw texts; evaluation scores raw texts against predictions decoded without clean-up."""
    return merge(check_references, _label_parts(subject) + _metric_parts(subject) + _cleaned_parts(subject))
