"""Pitfalls of the labels: `<s>` kept (2), padding that the loss counts (3), and labels cut
at either end (12)."""

import torch

from ..metrics import decode
from .core import EXAMPLES, IGNORE_INDEX, Part, Subject, merge, pitfall, quote


def label_rows(labels: torch.Tensor, tokenizer) -> list[list[int]]:
    """Each label without -100 and without trailing pads (one `</s>` kept when pad is `</s>`)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = []
    for row in labels.tolist():
        ids = [token for token in row if token != IGNORE_INDEX]
        stripped = list(ids)
        while stripped and stripped[-1] == pad:
            stripped.pop()
        if pad == eos and len(stripped) < len(ids):
            stripped.append(eos)
        rows.append(stripped)
    return rows


@pitfall(2, "bos_in_labels")
def check_bos(subject: Subject):
    """The target has no `<s>`; Hugging Face tokenizers add it by default."""
    rows, bos = subject.rows or [], subject.tokenizer.bos_token_id
    bad = [line for line, row in enumerate(rows) if row and bos is not None and row[0] == bos]
    if not bad:
        return None
    return merge(check_bos, [Part(
        "error", f"<s> (id {bos}) is the first label id of {len(bad)} of {len(rows)} lines.",
        f"line {bad[0]}: {quote(rows[bad[0]])}",
        "The model is taught to write <s> after </s> and then to read from <s>: every text token moves one position "
        "from where the checkpoint learned it, the loss falls and the CER does not follow.",
        "processor.tokenizer(text, add_special_tokens=False).input_ids + [processor.tokenizer.eos_token_id]",
    )])


@pitfall(3, "pad_not_ignored")
def check_padding(subject: Subject):
    """Padding is -100, never the pad id."""
    if subject.labels is None:
        return None
    labels = subject.labels.cpu()
    rows = label_rows(labels, subject.tokenizer)
    kept = [sum(token != IGNORE_INDEX for token in row) for row in labels.tolist()]
    pads = [count - len(row) for count, row in zip(kept, rows)]
    if not any(pads):
        return None
    line = max(range(len(pads)), key=pads.__getitem__)
    return merge(check_padding, [Part(
        "error", f"{sum(pads)} label positions hold the pad id ({subject.tokenizer.pad_token_id}) instead of -100.",
        f"line {line} ends {quote(labels[line].tolist(), head=False)} ({pads[line]} pads); "
        f"{int((labels == IGNORE_INDEX).sum())} positions of the batch are -100",
        "The loss counts every pad as a target: pads are trivial to predict, so the loss falls fast and no longer "
        "measures reading, while the text tokens' share of the gradient shrinks.",
        "labels[labels == processor.tokenizer.pad_token_id] = -100 after padding (or pad with -100 in the collator)",
    )])


def _without_first(text: str, tokenizer) -> set[str]:
    """The text without its first character, and without its first token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {text[1:], decode(tokenizer, [ids[1:]])[0]}


def _cut_lines(subject: Subject) -> list[tuple[int, str, str]]:
    """Lines whose label decodes to the text without its first piece."""
    if not subject.texts:
        return []
    decoded = [decode(subject.tokenizer, [row])[0] if row else "" for row in subject.rows]
    return [(line, text, label) for line, (text, label) in enumerate(zip(subject.texts, decoded))
            if label != text and label and label in _without_first(text, subject.tokenizer)]


def _examples(lines) -> str:
    return "; ".join(f"line {line}: text {text!r}, label decodes to {label!r}" for line, text, label in
                     lines[:EXAMPLES])


@pitfall(12, "labels_cut")
def check_label_ends(subject: Subject):
    """Every label ends with `</s>` and starts with the text's first piece."""
    rows, eos = subject.rows or [], subject.tokenizer.eos_token_id
    parts = []
    lost = _cut_lines(subject)
    if lost:
        parts.append(Part(
            "error", f"{len(lost)} of {len(rows)} labels decode to their text without its first piece.",
            _examples(lost),
            "The first id was cut (to drop an <s> the tokenizer never added): the model learns to skip the start of "
            "every line.",
            "cut the first id only when it is <s>; better, tokenizer(text, add_special_tokens=False).input_ids + "
            "[eos_token_id]",
        ))
    limit = subject.max_target_length
    bad = [line for line, row in enumerate(rows)
           if (not row or row[-1] != eos) and (limit is None or len(row) < limit)]
    if bad:
        parts.append(Part(
            "error", f"{len(bad)} of {len(rows)} labels do not end with </s> (id {eos}).",
            f"line {bad[0]} ends {quote(rows[bad[0]], head=False)}",
            "The model never learns to stop: generate() runs on to the maximum length repeating words, while "
            "teacher-forced accuracy looks fine.",
            "end every label with processor.tokenizer.eos_token_id: tokenizer(text, add_special_tokens=False)"
            ".input_ids + [eos_token_id]",
        ))
    return merge(check_label_ends, parts)
