"""The decoding paths a loop check compares on one batch: generate() as the model is set up,
the teacher-forced argmax, and the user's own validation predictions; each step that fails
is recorded, never raised."""

import warnings
from collections.abc import Callable

import torch

from .metrics import corpus_cer, decode
from .pitfalls.core import IGNORE_INDEX, NOT_CHECKED, Finding, Subject
from .pitfalls.generation import room
from .pitfalls.model import config_ids


def _failed(number: int, what: str, error: Exception, fix: str) -> Finding:
    return Finding("not_checked", "warning", f"{what} failed, so pitfall {number} could not be checked on it.",
                   pitfall=number, evidence=f"{type(error).__name__}: {error}", effect=NOT_CHECKED, fix=fix)


def generate(subject: Subject, pixels: torch.Tensor) -> torch.Tensor:
    """generate() with the settings decoding uses (`subject.generation`); where settings sit on
    model.config, first as the user's code calls it, keeping transformers' refusal."""
    model = subject.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if subject.config_generation_settings:
            try:
                return model.generate(pixel_values=pixels)
            except ValueError as error:
                subject.generate_error = str(error).split(". ")[0][:200]
        return model.generate(pixel_values=pixels, generation_config=subject.generation)


def shift_right(labels: torch.Tensor, model, tokenizer) -> torch.Tensor:
    """The decoder input the loss would use: labels shifted right after the start token, with
    model.config's ids where it has them (the generation config's otherwise)."""
    ids = config_ids(model)
    pick = [ids[where] for where in ("model.config", "model.generation_config") if where in ids]
    start = next((held["decoder_start_token_id"] for held in pick if held["decoder_start_token_id"] is not None),
                 tokenizer.eos_token_id)
    pad = next((held["pad_token_id"] for held in pick if held["pad_token_id"] is not None), tokenizer.pad_token_id)
    shifted = torch.full_like(labels, pad)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad)
    shifted[:, 0] = start
    return shifted


def teacher_forced(subject: Subject, pixels: torch.Tensor) -> list[list[str]]:
    """The argmax of a labelled forward decoded over every position, over the label positions,
    and up to the first `</s>`."""
    model, tokenizer, labels = subject.model, subject.tokenizer, subject.labels
    starts = shift_right(labels, model, tokenizer).to(model.device)
    argmax = model(pixel_values=pixels, decoder_input_ids=starts).logits.argmax(-1).cpu()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    in_label = (labels != IGNORE_INDEX) & (labels != pad)
    until_eos = [row[: row.index(eos)] if eos in row else row for row in argmax.tolist()]
    return [decode(tokenizer, argmax), decode(tokenizer, argmax.masked_fill(~in_label, pad)),
            [decode(tokenizer, [row])[0] if row else "" for row in until_eos]]


def classify(theirs: list[str], paths: dict) -> list[str]:
    """Per line, which path the user's prediction equals: generate, teacher_forced, cleaned
    (generate decoded with clean-up), cut (a beginning of the generated line) or other."""
    kinds = []
    for line, text in enumerate(theirs):
        ours = paths["generate"][line]
        if text == ours:
            kinds.append("generate")
        elif any(text == way[line] for way in paths.get("teacher_forced", [])):
            kinds.append("teacher_forced")
        elif text == paths["generate_cleaned"][line]:
            kinds.append("cleaned")
        elif len(text) < len(ours) and ours.startswith(text.rstrip("\ufffd")):  # a cut may split a character
            kinds.append("cut")
        else:
            kinds.append("other")
    return kinds


def _run(model, step):
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return step()
    finally:
        model.train(training)


def evaluation_paths(subject: Subject, batch, evaluate: Callable | None, report, theirs=None,
                     what: str = "your validation step") -> dict | None:
    """generate(), teacher forcing and the user's predictions (`evaluate(model, batch)` or
    `theirs`) on the batch, classified line by line; failures become findings in `report`."""
    model, tokenizer = subject.model, subject.tokenizer
    if subject.pixel_values is None:
        return None
    try:
        pixels = subject.pixel_values.to(model.device, model.dtype)
        generated = _run(model, lambda: generate(subject, pixels))
    except Exception as error:
        report.append(_failed(8, "generate() on the batch", error, "model.generate(pixel_values=...) must run on "
                              "the model as your loop sets it up; the fix of the other findings may be enough"))
        return None
    limit, _ = room(subject.generation)
    texts = decode(tokenizer, generated.cpu())
    paths = {"generate": texts, "generate_cleaned": [tokenizer.clean_up_tokenization(text) for text in texts],
             "hit_max_length": [len(row) - 1 >= limit and tokenizer.eos_token_id not in row[1:]
                                for row in generated.tolist()]}
    try:
        paths["teacher_forced"] = _run(model, lambda: teacher_forced(subject, pixels))
    except Exception as error:
        report.append(_failed(8, "the labelled forward (teacher forcing)", error,
                              "model(pixel_values=..., labels=...) must run: see the other findings"))
    if theirs is None:
        try:
            theirs = [str(text) for text in _run(model, lambda: list(evaluate(model, batch)))]
        except Exception as error:
            report.append(_failed(8, "your validation step evaluate(model, batch)", error,
                                  "evaluate(model, batch) must return one predicted string per line of the batch"))
            return None
    if len(theirs) != len(texts):
        report.append(Finding("not_checked", "warning", "Your validation step returned another number of lines.",
                              pitfall=8, evidence=f"{len(theirs)} predictions for {len(texts)} lines", effect=NOT_CHECKED,
                              fix="evaluate(model, batch) must return one predicted string per line of the batch"))
        return None
    paths.update(theirs=theirs, kinds=classify(theirs, paths))
    if subject.texts:
        paths["scores"] = {"yours": corpus_cer(subject.texts, theirs), "generate": corpus_cer(subject.texts, texts)}
        if "teacher_forced" in paths:
            paths["scores"]["teacher_forced"] = corpus_cer(subject.texts, paths["teacher_forced"][1])
        report.scores.update(paths["scores"])
    report.checked.append(f"evaluation: {what} beside generate() and the teacher-forced argmax")
    return paths
