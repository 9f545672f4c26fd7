"""Checks a training loop of your own for the pitfalls of docs/pitfalls.md, on your own
objects: the model as your loop configured it, one batch as your loader gives it, and your
validation step. Nothing of the recipe's data path is involved.

    from trocr_recipe.loopcheck import check_loop, format_findings

    batch = next(iter(train_loader))  # {"pixel_values": (B, 3, H, W), "labels": (B, L), ...}
    findings = check_loop(model, processor, batch, texts=batch_texts, evaluate=validation_step)
    print(format_findings(findings))
    if any(finding.level == "error" for finding in findings): ...

`evaluate(model, batch) -> list[str]` is your validation step on one batch (the texts it
predicts); it is run beside `model.generate` and the teacher-forced argmax. From a shell,
on a saved batch: `python check_loop.py --model DIR --batch batch.pt`.

The step-by-step comparison's two pieces are here too (from trocr_recipe.steptrace):
`ReferenceBatches(trace_dir)`, a reference run's exact batches, and `StepLog(output_dir)`,
the log `compare_runs.py` reads.
"""

import warnings
from collections.abc import Callable, Mapping

import torch

from .checks import PITFALLS_DOC, Finding, _same_id
from .metrics import corpus_cer, decode
from .modeling import generation_max_length
from .steptrace import ReferenceBatches, StepLog

__all__ = ["check_loop", "format_findings", "has_errors", "LoopReport", "ReferenceBatches", "StepLog"]

IGNORE_INDEX = -100  # label positions the loss skips
DEFAULT_NEW_TOKENS = 20  # what generate() allows when the generation config sets no length
SPECIAL_IDS = ("decoder_start_token_id", "pad_token_id", "eos_token_id")
GENERATION_KEYS = ("max_length", "max_new_tokens", "num_beams", "early_stopping", "no_repeat_ngram_size",
                   "length_penalty")
EXAMPLES = 2  # lines quoted as evidence
# Pixel preparations a batch may look like: (description, value of white before mean/std, mean, std).
PREPARATIONS = (
    ("pixels in [0, 1] (no normalization, e.g. ToTensor() alone)", 1.0, (0.0,) * 3, (1.0,) * 3),
    ("pixels in [0, 255] (neither rescaled nor normalized)", 255.0, (0.0,) * 3, (1.0,) * 3),
    ("ImageNet mean and std", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("mean 0.5, std 0.5 (values in [-1, 1])", 1.0, (0.5,) * 3, (0.5,) * 3),
)
RANGE_SLACK = 0.1  # page intensities may overshoot [0, 1] this much (float bicubic resizing)


class LoopReport(list):
    """The findings (a list of `Finding`), plus what was checked and, with an evaluation,
    the corpus CER of each decoding path on the batch."""

    def __init__(self, findings=(), checked: list[str] | None = None, scores: dict | None = None):
        super().__init__(findings)
        self.checked = checked or []
        self.scores = scores or {}


def check_loop(model, processor, batch: Mapping, texts: list[str] | None = None,
               evaluate: Callable | None = None) -> LoopReport:
    """Every check on your model, your batch (`pixel_values`, `labels`; `texts` is taken from
    the batch when not given) and, when given, your validation step. Raises ValueError when
    the batch is not a batch (keys, shapes, sizes)."""
    if texts is None and isinstance(batch, Mapping):
        texts = batch.get("texts")
    pixel_values, labels, texts = validate_batch(batch, texts)
    tokenizer = processor.tokenizer
    rows = label_rows(labels, tokenizer)
    report = LoopReport(checked=[
        "model: special token ids on model.config, its decoder config and generation_config; vocabulary; "
        "generation length and beams",
        f"batch: {len(labels)} lines, labels{' against their texts' if texts else ''}, pixel values "
        f"{tuple(pixel_values.shape[1:])}",
    ])
    report += model_findings(model, tokenizer, rows)
    report += label_findings(labels, rows, tokenizer, texts)
    shape = check_pixel_shape(model, pixel_values, processor.image_processor)
    report += shape or check_pixel_values(pixel_values, processor.image_processor)
    if evaluate is not None and not shape:
        report += check_evaluation(model, tokenizer, batch, pixel_values, labels, texts, evaluate, report)
    elif evaluate is not None:
        report.checked.append("evaluation: not run, the pixel values do not fit the encoder")
    report.sort(key=lambda finding: finding.level != "error")
    return report


# The batch: what it must be before anything can be checked.


def validate_batch(batch, texts) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """pixel_values (B, C, H, W) floats, labels (B, L) integers, texts B strings or None."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"the batch is a {type(batch).__name__}, not a dict with pixel_values and labels")
    missing = [key for key in ("pixel_values", "labels") if key not in batch]
    if missing:
        raise ValueError(f"the batch has no {' and no '.join(missing)} (its keys: {sorted(map(str, batch))})")
    pixel_values, labels = batch["pixel_values"], _as_tensor(batch["labels"], "labels")
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
    return pixel_values, labels.cpu(), None if texts is None else list(texts)


def _as_tensor(labels, key: str) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels
    try:
        return torch.as_tensor(labels)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key} cannot be read as one (batch, length) array of ids: {error}") from None


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


def _text_ids(row: list[int], tokenizer) -> list[int]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [token for token in row if token not in special]


def _finding(name, level, pitfall, message, evidence, effect, fix) -> Finding:
    return Finding(name, level, message, pitfall=pitfall, evidence=evidence, effect=effect, fix=fix)


# The model: special ids, vocabulary, generation settings.


def model_findings(model, tokenizer, rows: list[list[int]]) -> list[Finding]:
    longest = max((len(_text_ids(row, tokenizer)) + 1 for row in rows), default=1)  # text + </s>
    return [
        *check_decoder_start(model, tokenizer),
        *check_configs_agree(model, tokenizer),
        *check_vocab_size(model, tokenizer, rows),
        *check_generation_length(model, longest),
        *check_beams(model),
    ]


def _config_ids(model) -> dict[str, dict]:
    """Each special id as model.config, its decoder config and generation_config hold it (None: unset)."""
    configs = {"model.config": model.config, "model.config.decoder": getattr(model.config, "decoder", None),
               "model.generation_config": model.generation_config}
    return {where: {key: getattr(config, key, None) for key in SPECIAL_IDS}
            for where, config in configs.items() if config is not None}


def check_decoder_start(model, tokenizer) -> list[Finding]:
    """Pitfall 1: the loss's label shift (model.config) and generate (generation_config) must
    start from `</s>`."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    ids = _config_ids(model)
    wrong = {where: ids[where]["decoder_start_token_id"] for where in ("model.config", "model.generation_config")
             if ids[where]["decoder_start_token_id"] not in (None, eos)}
    if not wrong:
        return []
    token = "<s>" if bos in wrong.values() else "id " + "/".join(map(str, sorted(set(wrong.values()))))
    return [_finding(
        "decoder_start_bos", "error", 1,
        f"The decoder starts from {token} instead of </s>.",
        "; ".join(f"{where}.decoder_start_token_id={value}" for where, value in wrong.items())
        + f"; the tokenizer's </s> is {eos}, <s> is {bos}",
        "The pretrained TrOCR decoder always read </s> first; from another token every line starts from an input "
        "it never saw, fine-tuning relearns the start instead of reading, and the CER rises while the loss falls.",
        "model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = "
        "processor.tokenizer.eos_token_id",
    )]


def check_configs_agree(model, tokenizer) -> list[Finding]:
    """Pitfall 5: special ids equal across the three configs (pad and eos the tokenizer's),
    present where the label shift reads them, generation settings on generation_config."""
    ids = _config_ids(model)
    expected = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    problems = []
    for key in SPECIAL_IDS:
        values = {where: held[key] for where, held in ids.items() if held[key] is not None}
        wrong = key in expected and any(not _same_id(value, expected[key]) for value in values.values())
        if len({str(value) for value in values.values()}) > 1 or wrong:
            held = ", ".join(f"{where}={value}" for where, value in values.items())
            problems.append(f"{key}: {held}" + (f" (the tokenizer's is {expected[key]})" if wrong else ""))
    missing = [f"model.config has no {key}" for key in ("decoder_start_token_id", "pad_token_id")
               if ids["model.config"][key] is None]
    problems += _generation_settings_on_config(model)
    if not problems and not missing:
        return []
    return [_finding(
        "configs_disagree", "error" if problems else "warning", 5,
        "model.config and model.generation_config disagree." if problems else
        "model.config lacks the ids the loss's label shift reads.",
        "; ".join(problems + missing),
        "The loss's label shift reads model.config, generate() reads only model.generation_config: the model is "
        "trained one way and decoded another, settings on model.config are ignored by generate(), and without "
        "decoder_start/pad ids on model.config, model(pixel_values=..., labels=...) fails.",
        "set decoder_start_token_id (tokenizer.eos_token_id), pad_token_id and eos_token_id on both configs from "
        "the tokenizer; put max_length, num_beams and other generation settings on model.generation_config only",
    )]


def _generation_settings_on_config(model) -> list[str]:
    """Generation settings set on model.config that generate() does not see."""
    generation = model.generation_config
    return [
        f"model.config.{key}={getattr(model.config, key)} but model.generation_config.{key}="
        f"{getattr(generation, key, None)} (generate() reads only the latter)"
        for key in GENERATION_KEYS
        if key in vars(model.config) and getattr(model.config, key) != getattr(generation, key, None)
    ]


def check_vocab_size(model, tokenizer, rows: list[list[int]]) -> list[Finding]:
    """Pitfall 6: the tokenizer and the label ids must fit the decoder's embedding table."""
    table = model.decoder.get_input_embeddings().num_embeddings
    largest = max((max(row) for row in rows if row), default=0)
    if len(tokenizer) == table and largest < table:
        return []
    too_many = len(tokenizer) > table or largest >= table
    return [_finding(
        "vocab_size_mismatch", "error" if too_many else "warning", 6,
        f"The tokenizer has {len(tokenizer)} ids, the decoder's embedding table {table}.",
        f"len(processor.tokenizer)={len(tokenizer)}, model.decoder embeddings={table}, largest label id of the "
        f"batch {largest} (TrOCR-small has 64044 ids, base and large 50265)",
        "Ids beyond the table fail with an index error; with a smaller or another tokenizer each id names another "
        "piece than the decoder learned, and the first epochs look like a collapse.",
        "load the processor from the same checkpoint as the model",
    )]


def generation_room(generation_config) -> tuple[int, str]:
    """New tokens generate() may produce after the start token, and the setting that says so."""
    if generation_config.max_new_tokens is not None:
        return generation_config.max_new_tokens, f"max_new_tokens={generation_config.max_new_tokens}"
    if generation_config.max_length is not None:
        return generation_config.max_length - 1, f"max_length={generation_config.max_length}"
    return DEFAULT_NEW_TOKENS, f"max_length unset: transformers' default of {DEFAULT_NEW_TOKENS} new tokens"


def check_generation_length(model, longest: int) -> list[Finding]:
    """Pitfall 4: room for the longest label of the batch (text + `</s>`), with a 10% margin."""
    room, setting = generation_room(model.generation_config)
    wanted = generation_max_length(longest)
    if room >= wanted - 1:
        return []
    return [_finding(
        "generation_too_short", "error" if room < longest else "warning", 4,
        f"generate() has room for {room} tokens; the longest line of this batch needs {longest}.",
        f"model.generation_config: {setting}; longest label {longest} tokens (text and </s>), "
        f"{wanted - 1} with a 10% margin",
        "Lines longer than the room are cut in every prediction whatever the model learned; the CER has a floor "
        "set by the long lines.",
        f"model.generation_config.max_length = {wanted} or more, sized on the longest label of the training set",
    )]


def check_beams(model) -> list[Finding]:
    """Pitfall 13: greedy decoding, where the paper's figures come from beam search."""
    beams = model.generation_config.num_beams
    if beams is not None and beams > 1:
        return []
    return [_finding(
        "single_beam", "warning", 13,
        "generate() decodes greedily.",
        f"model.generation_config.num_beams={beams}",
        "Fine for a quick validation signal, but the paper's figures come from beam search: a greedy CER is "
        "somewhat worse than the published one.",
        "model.generation_config.num_beams = 10 (and early_stopping = True) for the evaluation you compare with "
        "published figures",
    )]


# The labels: special tokens, padding, and the text they stand for.


def label_findings(labels: torch.Tensor, rows: list[list[int]], tokenizer, texts) -> list[Finding]:
    findings = [*check_bos(rows, tokenizer), *check_padding(labels, rows, tokenizer), *check_eos(rows, tokenizer)]
    if texts:
        findings += check_label_texts(rows, texts, tokenizer, labels.shape[1])
    return findings


def _quote(row: list[int], head: bool = True) -> str:
    return f"{row[:8]}{' ...' if len(row) > 8 else ''}" if head else f"[... {str(row[-8:])[1:]}"


def check_bos(rows: list[list[int]], tokenizer) -> list[Finding]:
    """Pitfall 2: the target has no `<s>`."""
    bad = [line for line, row in enumerate(rows) if row and row[0] == tokenizer.bos_token_id]
    if not bad:
        return []
    return [_finding(
        "bos_in_labels", "error", 2,
        f"<s> (id {tokenizer.bos_token_id}) is the first label id of {len(bad)} of {len(rows)} lines.",
        f"line {bad[0]}: {_quote(rows[bad[0]])}",
        "The model is taught to write <s> after </s> and then to read from <s>: every text token moves one position "
        "from where the checkpoint learned it, the loss falls and the CER does not follow.",
        "processor.tokenizer(text, add_special_tokens=False).input_ids + [processor.tokenizer.eos_token_id]",
    )]


def check_padding(labels: torch.Tensor, rows: list[list[int]], tokenizer) -> list[Finding]:
    """Pitfall 3: padding is -100, never the pad id."""
    kept = [sum(token != IGNORE_INDEX for token in row) for row in labels.tolist()]
    pads = [count - len(row) for count, row in zip(kept, rows)]
    if not any(pads):
        return []
    line = max(range(len(pads)), key=pads.__getitem__)
    ignored = int((labels == IGNORE_INDEX).sum())
    return [_finding(
        "pad_not_ignored", "error", 3,
        f"{sum(pads)} label positions hold the pad id ({tokenizer.pad_token_id}) instead of -100.",
        f"line {line} ends {_quote(labels[line].tolist(), head=False)} ({pads[line]} pads); {ignored} positions "
        "of the batch are -100",
        "The loss counts every pad as a target: pads are trivial to predict, so the loss falls fast and no longer "
        "measures reading, while the text tokens' share of the gradient shrinks.",
        "labels[labels == processor.tokenizer.pad_token_id] = -100 after padding",
    )]


def check_eos(rows: list[list[int]], tokenizer) -> list[Finding]:
    """Pitfall 12: every label ends with `</s>`."""
    bad = [line for line, row in enumerate(rows) if not row or row[-1] != tokenizer.eos_token_id]
    if not bad:
        return []
    return [_finding(
        "no_eos_in_labels", "error", 12,
        f"{len(bad)} of {len(rows)} labels do not end with </s> (id {tokenizer.eos_token_id}).",
        f"line {bad[0]} ends {_quote(rows[bad[0]], head=False)}",
        "The model never learns to stop: generate() runs on to the maximum length repeating words, while "
        "teacher-forced accuracy looks fine.",
        "end every label with processor.tokenizer.eos_token_id: tokenizer(text, add_special_tokens=False).input_ids "
        "+ [eos_token_id]",
    )]


def check_label_texts(rows: list[list[int]], texts: list[str], tokenizer, width: int) -> list[Finding]:
    """Pitfalls 12 and 11: each label, decoded without clean-up, gives back its raw text."""
    decoded = decode_rows(tokenizer, rows)
    lost, other = [], []
    for line, (text, label) in enumerate(zip(texts, decoded)):
        if label != text:
            (lost if label and label in _without_first(text, tokenizer) else other).append((line, text, label))
    return [*_first_char_finding(lost, len(rows)), *_not_texts_finding(other, rows, width, tokenizer)]


def _without_first(text: str, tokenizer) -> set[str]:
    """The text without its first character, and without its first token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {text[1:], decode(tokenizer, [ids[1:]])[0]}


def _examples(lines: list[tuple[int, str, str]]) -> str:
    return "; ".join(f"line {line}: text {text!r}, label decodes to {label!r}" for line, text, label in
                     lines[:EXAMPLES])


def _first_char_finding(lost, total: int) -> list[Finding]:
    if not lost:
        return []
    return [_finding(
        "first_char_lost", "error", 12,
        f"{len(lost)} of {total} labels decode to their text without its first piece.",
        _examples(lost),
        "The first id was cut (to drop an <s> the tokenizer never added): the model learns to skip the start of "
        "every line, and those labels usually lack </s> as well.",
        "cut the first id only when it is <s>; better, tokenizer(text, add_special_tokens=False).input_ids + "
        "[eos_token_id]",
    )]


def _not_texts_finding(other, rows: list[list[int]], width: int, tokenizer) -> list[Finding]:
    if not other:
        return []
    cut = [line for line, _, _ in other if len(rows[line]) == width and rows[line][-1] != tokenizer.eos_token_id]
    note = f"; lines {cut} fill the whole label width {width} without </s>: truncated" if cut else ""
    return [_finding(
        "labels_not_texts", "error", 11,
        f"{len(other)} of {len(rows)} labels do not decode back to their text.",
        _examples(other) + note,
        "The model is trained on text other than the ground truth; references rebuilt from these labels are not "
        "the ground truth either.",
        "build labels from the raw text with the checkpoint's own tokenizer and a max_length that fits the longest "
        "line; score against the raw texts, never tokenizer.decode(labels)",
    )]


# The pixel values: shape and normalization.


def _encoder_input(model) -> tuple[int, tuple[int, int]]:
    encoder = model.config.encoder
    size = encoder.image_size
    return getattr(encoder, "num_channels", 3), tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def check_pixel_shape(model, pixel_values: torch.Tensor, image_processor) -> list[Finding]:
    """Pitfall 7: channels and image size the encoder was built for."""
    channels, size = _encoder_input(model)
    shape = tuple(pixel_values.shape[1:])
    if shape == (channels, *size):
        return []
    processor_size = image_processor.size
    return [_finding(
        "pixel_shape", "error", 7,
        f"pixel_values are {shape[0]}x{shape[1]}x{shape[2]} images; the encoder takes {channels}x{size[0]}x{size[1]}.",
        f"pixel_values.shape={tuple(pixel_values.shape)}; model.config.encoder: num_channels={channels}, "
        f"image_size={list(size)}; processor.image_processor.size={dict(processor_size)}",
        "The forward fails, or interpolated position embeddings see a geometry the encoder was never trained on.",
        "pixel_values = processor(images=[image.convert('RGB') for image in images], return_tensors='pt')"
        ".pixel_values",
    )]


def _processor_preparation(image_processor) -> tuple[float, tuple, tuple]:
    """The image processor's (value of white, mean, std), as PREPARATIONS states them."""
    white = image_processor.rescale_factor * 255 if image_processor.do_rescale else 255.0
    if not image_processor.do_normalize:
        return white, (0.0,) * 3, (1.0,) * 3
    return white, tuple(image_processor.image_mean), tuple(image_processor.image_std)


def page_range(pixel_values: torch.Tensor, white: float, mean, std) -> tuple[list[float], list[float]]:
    """Per channel, the darkest and lightest page intensity (0 black, 1 white) that pixel
    values prepared with (white, mean, std) stand for: (x * std + mean) / white."""
    channels = pixel_values.shape[1]
    mean = torch.tensor(mean[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    page = ((pixel_values.float().cpu() * std + mean) / white).transpose(0, 1).flatten(1)
    return page.min(1).values.tolist(), page.max(1).values.tolist()


def fits(page: tuple[list[float], list[float]]) -> bool:
    """Page intensities within [0, 1] that reach both the dark ink and the light page, in every channel."""
    lows, highs = page
    return all(-RANGE_SLACK <= low <= 0.45 for low in lows) and all(0.55 <= high <= 1 + RANGE_SLACK for high in highs)


def check_pixel_values(pixel_values: torch.Tensor, image_processor) -> list[Finding]:
    """Pitfall 7: values as the image processor rescales and normalizes them."""
    white, mean, std = _processor_preparation(image_processor)
    page = page_range(pixel_values, white, mean, std)
    if fits(page):
        return []
    expected = f"[{-mean[0] / std[0]:.2f}, {(white - mean[0]) / std[0]:.2f}]"  # black and white, first channel
    looks = [name for name, *preparation in PREPARATIONS if fits(page_range(pixel_values, *preparation))]
    low, high = min(page[0]), max(page[1])
    out_of_range = low < -RANGE_SLACK or high > 1 + RANGE_SLACK
    return [_finding(
        "pixel_normalization", "error" if looks or out_of_range else "warning", 7,
        "pixel_values are not prepared as processor.image_processor prepares them.",
        f"observed min {float(pixel_values.min()):.3f}, max {float(pixel_values.max()):.3f}, mean "
        f"{float(pixel_values.float().mean()):.3f}; the processor gives {expected} (rescale "
        f"{image_processor.rescale_factor:.5g}, mean {list(mean)}, std {list(std)}), the page intensities these "
        f"values stand for would be [{low:.2f}, {high:.2f}] instead of dark ink to light page within "
        f"[0, 1]" + (f"; they look like {' or '.join(looks)}" if looks else ""),
        "The encoder sees inputs shifted and scaled away from what it was pretrained on: its features are not the "
        "ones the decoder learned to read, and fine-tuning spends its steps adapting.",
        "pixel_values = processor(images=..., return_tensors='pt').pixel_values, or the same rescale, mean and std "
        "as processor.image_processor",
    )]


# The evaluation: yours, generate, teacher forcing.


def check_evaluation(model, tokenizer, batch, pixel_values, labels, texts, evaluate, report: LoopReport):
    """Pitfalls 8, 4 and 11: your validation step beside generate() and the teacher-forced argmax."""
    paths = reference_paths(model, tokenizer, pixel_values, labels)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            theirs = list(evaluate(model, batch))
    finally:
        model.train(training)
    if len(theirs) != len(labels) or not all(isinstance(text, str) for text in theirs):
        raise ValueError(f"evaluate(model, batch) must return {len(labels)} strings, one per line; got {theirs!r}")
    if texts:
        report.scores.update(yours=corpus_cer(texts, theirs), generate=corpus_cer(texts, paths["generate"]),
                             teacher_forced=corpus_cer(texts, paths["teacher_forced"][1]))
    report.checked.append("evaluation: your validation step beside generate() and the teacher-forced argmax")
    return evaluation_findings(theirs, paths, report.scores, model)


def reference_paths(model, tokenizer, pixel_values, labels) -> dict:
    """generate() with the model's generation config, and the argmax of a labelled forward,
    both decoded without clean-up (the teacher-forced argmax in three ways)."""
    training = model.training
    model.eval()
    pixels = pixel_values.to(model.device, model.dtype)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generated = model.generate(pixel_values=pixels)
            starts = _shift_right(labels, model, tokenizer).to(model.device)
            argmax = model(pixel_values=pixels, decoder_input_ids=starts).logits.argmax(-1).cpu()
    finally:
        model.train(training)
    room, _ = generation_room(model.generation_config)
    rows, texts = generated.tolist(), decode(tokenizer, generated.cpu())
    return {
        "generate": texts,
        "generate_cleaned": [tokenizer.clean_up_tokenization(text) for text in texts],
        "hit_max_length": [len(row) - 1 >= room and tokenizer.eos_token_id not in row[1:] for row in rows],
        "teacher_forced": _teacher_forced_texts(argmax, labels, tokenizer),
    }


def _shift_right(labels: torch.Tensor, model, tokenizer) -> torch.Tensor:
    """The decoder input the loss would use: labels shifted right after the start token, with
    model.config's ids where it has them (the generation config's otherwise)."""
    ids = _config_ids(model)
    pick = (ids["model.config"], ids["model.generation_config"])
    start = next((held["decoder_start_token_id"] for held in pick if held["decoder_start_token_id"] is not None),
                 tokenizer.eos_token_id)
    pad = next((held["pad_token_id"] for held in pick if held["pad_token_id"] is not None), tokenizer.pad_token_id)
    shifted = torch.full_like(labels, pad)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad)
    shifted[:, 0] = start
    return shifted


def _teacher_forced_texts(argmax: torch.Tensor, labels: torch.Tensor, tokenizer) -> list[list[str]]:
    """The argmax decoded over every position, over the label positions, and up to the first `</s>`."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    in_label = (labels != IGNORE_INDEX) & (labels != pad)
    until_eos = []
    for row in argmax.tolist():
        until_eos.append(row[: row.index(eos)] if eos in row else row)
    ways = [argmax, argmax.masked_fill(~in_label, pad), until_eos]
    return [decode(tokenizer, ids) if isinstance(ids, torch.Tensor) else decode_rows(tokenizer, ids) for ids in ways]


def decode_rows(tokenizer, rows: list[list[int]]) -> list[str]:
    """Rows of different lengths, decoded as metrics.decode decodes (no clean-up)."""
    return [decode(tokenizer, [row])[0] if row else "" for row in rows]


def classify_lines(theirs: list[str], paths: dict) -> list[str]:
    """Per line, which path your prediction equals: generate, teacher_forced, cleaned (generate
    decoded with clean-up), cut (a beginning of the generated line) or other."""
    kinds = []
    for line, text in enumerate(theirs):
        ours = paths["generate"][line]
        if text == ours:
            kinds.append("generate")
        elif any(text == way[line] for way in paths["teacher_forced"]):
            kinds.append("teacher_forced")
        elif text == paths["generate_cleaned"][line]:
            kinds.append("cleaned")
        elif len(text) < len(ours) and ours.startswith(text.rstrip("\ufffd")):  # a cut may split a character
            kinds.append("cut")
        else:
            kinds.append("other")
    return kinds


def _scores(scores: dict) -> str:
    if not scores:
        return ""
    return (f"; CER on this batch: yours {scores['yours']:.2f}, generate() {scores['generate']:.2f}, "
            f"teacher-forced argmax {scores['teacher_forced']:.2f}")


def _lines(kinds: list[str], kind: str, theirs: list[str], ours: list[str]) -> str:
    lines = [line for line, found in enumerate(kinds) if found == kind]
    quoted = "; ".join(f"line {line}: yours {theirs[line]!r}, generate() {ours[line]!r}" for line in lines[:EXAMPLES])
    return f"{len(lines)} of {len(kinds)} lines, {quoted}"


def evaluation_findings(theirs: list[str], paths: dict, scores: dict, model) -> list[Finding]:
    kinds, ours = classify_lines(theirs, paths), paths["generate"]
    findings = []
    if "teacher_forced" in kinds:
        findings.append(_finding(
            "teacher_forced_eval", "error", 8,
            "Your validation step scores the teacher-forced argmax, not generated text.",
            "your predictions equal the argmax of model(pixel_values, labels) and differ from generate(): "
            + _lines(kinds, "teacher_forced", theirs, ours) + _scores(scores),
            "Each position is predicted from the true previous tokens and the labels say where lines end: the "
            "validation CER looks good and improves while the generated (test) CER does not.",
            "score validation with model.generate(pixel_values=...) decoded with skip_special_tokens=True, "
            "clean_up_tokenization_spaces=False",
        ))
    findings += _cut_findings(kinds, theirs, paths, scores, model)
    for kind, pitfall, what in (("cleaned", 11, "the generated text decoded with clean_up_tokenization_spaces=True"),
                                ("other", 8, "neither generate() with the model's generation config nor the "
                                 "teacher-forced argmax")):
        if kind in kinds:
            findings.append(_finding(
                "eval_disagrees", "warning", pitfall,
                f"Your validation step's predictions are {what}.",
                _lines(kinds, kind, theirs, ours) + _scores(scores),
                "Validation is scored otherwise than a test with generate() would be: its CER is not the one you will "
                "get (clean-up changes IAM's spacing around punctuation).",
                "decode model.generate(pixel_values=...) with skip_special_tokens=True, "
                "clean_up_tokenization_spaces=False, with the settings of model.generation_config",
            ))
    return findings


def _cut_findings(kinds, theirs, paths, scores, model) -> list[Finding]:
    """Pitfall 4: your predictions are beginnings of the generated lines, or generate() itself
    runs out of room."""
    ours, hit = paths["generate"], paths["hit_max_length"]
    if "cut" not in kinds and not any(hit):
        return []
    room, setting = generation_room(model.generation_config)
    evidence = [_lines(kinds, "cut", theirs, ours) + " are beginnings of the generated lines"] if "cut" in kinds else []
    if any(hit):
        evidence.append(f"generate() ({setting}) used all its {room} tokens without </s> on {sum(hit)} of "
                        f"{len(hit)} lines, e.g. {ours[hit.index(True)]!r}")
    return [_finding(
        "eval_cuts_lines", "error" if "cut" in kinds else "warning", 4,
        "Your validation step cuts lines short." if "cut" in kinds else "generate() runs out of room.",
        "; ".join(evidence) + _scores(scores),
        "Cut lines lose their end in every prediction, whatever the model learned; a model that uses all its room "
        "without </s> either reads lines longer than the room or never learned to stop (pitfall 12).",
        "generate with the model's generation config, its max_length sized on the longest label of the training "
        "set plus a margin; labels that end with </s>",
    )]


# Printing.


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

