"""Preflight checks for the pitfalls that make "loss goes down, CER goes up", numbered as in
docs/pitfalls.md.

Each check is a small function returning `Finding`s; `run_checks` runs them all on what
`prepare_run` built, `raise_on_errors` logs the warnings and stops the run listing every
error at once (with `strict`, warnings stop it too). `preflight_forward` is one forward
pass on one training batch, for `--preflight_only`."""

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from datasets import DatasetDict
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from .data import image_size, longest_label
from .metrics import decode
from .modeling import generation_max_length

logger = logging.getLogger(__name__)

# Checkpoint names of models already fine-tuned (Hub: microsoft/trocr-*-handwritten, -printed).
FINE_TUNED_MARKERS = ("-handwritten", "-printed")
# A learning rate above this drifts a converged checkpoint away within an epoch (pitfall 9);
# the reference fine-tuned stage-1 checkpoints at 2e-5.
MAX_FINE_TUNED_LEARNING_RATE = 1e-4
SAMPLE_SIZE = 64  # training lines whose labels and texts are checked
PITFALLS_DOC = "docs/pitfalls.md"  # one section per pitfall, anchored pitfall-<number>


def pitfall_doc(number: int) -> str:
    """Where pitfall `number` is explained: docs/pitfalls.md#pitfall-<number>."""
    return f"{PITFALLS_DOC}#pitfall-{number}"


@dataclass(frozen=True)
class Finding:
    """One problem found. Preflight findings say everything in `message`; the loop checks
    (loopcheck.py) keep the mistake there and the evidence, effect and fix apart."""

    name: str
    level: Literal["error", "warning"]
    message: str  # what is wrong (preflight: also the pitfall, what it causes, how to fix it)
    pitfall: int | None = None  # its number in docs/pitfalls.md
    evidence: str = ""  # the ids, values or lines that show it
    effect: str = ""  # what it does to training or to the CER
    fix: str = ""

    @property
    def doc(self) -> str:
        return pitfall_doc(self.pitfall) if self.pitfall else ""

    def __str__(self) -> str:
        """One line for a preflight finding; the loop checks' details on indented lines below."""
        details = {"evidence": self.evidence, "effect": self.effect, "fix": self.fix}
        if not any(details.values()):
            return f"[{self.level}] {self.name}: {self.message}" + (f" See {self.doc}." if self.doc else "")
        return "\n".join([f"[{self.level}] {self.name}: {self.message}"] + [
            f"    {label}: {value}" for label, value in {**details, "see": self.doc}.items() if value
        ])


def _configs(model) -> dict:
    # The loss's label shift reads `config`, generate() reads `generation_config` (pitfall 5).
    return {"model.config": model.config, "model.generation_config": model.generation_config}


def _same_id(value, expected: int) -> bool:
    # generation_config.eos_token_id may be a list of stop ids.
    return expected in value if isinstance(value, list) else value == expected


def _examples(pairs: list[tuple[str, str]], limit: int = 3) -> str:
    return "; ".join(f"{text!r} -> {decoded!r}" for text, decoded in pairs[:limit])


# 1 and 5: special tokens on both configs.


def check_decoder_start(model, tokenizer) -> list[Finding]:
    """Pitfall 1: the pretrained TrOCR decoder starts from `</s>`, not `<s>`; pitfall 5:
    config and generation_config must both say so."""
    eos = tokenizer.eos_token_id
    wrong = {
        where: config.decoder_start_token_id
        for where, config in _configs(model).items()
        if config.decoder_start_token_id != eos
    }
    if not wrong:
        return []
    where = ", ".join(f"{name}.decoder_start_token_id={value}" for name, value in wrong.items())
    only_one = (
        " The other config has it right: config feeds the loss's label shift, generation_config drives "
        "generate(), so training and decoding start from different tokens (pitfall 5)."
        if len(wrong) == 1
        else ""
    )
    return [
        Finding(
            "decoder_start_token",
            "error",
            f"{where}, but the TrOCR decoder was pretrained to start from </s> (id {eos}) (pitfall 1). "
            f"The model has to relearn its first step: the loss falls while CER rises.{only_one} "
            "Fix: set decoder_start_token_id = tokenizer.eos_token_id on both (modeling.set_special_tokens).",
            pitfall=1,
        )
    ]


def check_special_token_ids(model, tokenizer) -> list[Finding]:
    """Pitfall 5: eos and pad on config and generation_config must be the tokenizer's
    (decoder_start is check_decoder_start's)."""
    expected = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    wrong = [
        f"{where}.{attr}={getattr(config, attr)}"
        for where, config in _configs(model).items()
        for attr, value in expected.items()
        if not _same_id(getattr(config, attr), value)
    ]
    if not wrong:
        return []
    return [
        Finding(
            "special_token_ids",
            "error",
            f"{', '.join(wrong)}, but the tokenizer has </s>={tokenizer.eos_token_id} and "
            f"<pad>={tokenizer.pad_token_id} (pitfall 5: config and generation_config disagree). "
            "A wrong eos never stops generation, which runs on to the maximum length; a wrong pad feeds a real "
            "token to the label shift and to finished beams. Fix: set both configs from the tokenizer "
            "(modeling.set_special_tokens).",
            pitfall=5,
        )
    ]


# 2 and 12: the labels themselves.


def check_labels_without_bos(labels: list[list[int]], tokenizer) -> list[Finding]:
    """Pitfall 2: the target has no `<s>`; Hugging Face tokenizers add it by default."""
    bad = [ids for ids in labels if ids and ids[0] == tokenizer.bos_token_id]
    if not bad:
        return []
    return [
        Finding(
            "labels_start_with_bos",
            "error",
            f"{len(bad)} of the first {len(labels)} training labels start with <s> (id {tokenizer.bos_token_id}), "
            f"e.g. {bad[0][:8]} (pitfall 2). The model learns to emit <s> first: predictions start with a "
            "spurious token or <s><s>. Fix: tokenize with add_special_tokens=False and append </s> "
            "(data.encode_labels).",
            pitfall=2,
        )
    ]


def check_labels_end_with_eos(labels: list[list[int]], tokenizer) -> list[Finding]:
    """Pitfall 12: without `</s>` at the end the model never learns to stop."""
    bad = [ids for ids in labels if not ids or ids[-1] != tokenizer.eos_token_id]
    if not bad:
        return []
    return [
        Finding(
            "labels_end_with_eos",
            "error",
            f"{len(bad)} of the first {len(labels)} training labels do not end with </s> (id "
            f"{tokenizer.eos_token_id}), e.g. ...{bad[0][-8:]} (pitfall 12). The model never learns to "
            "stop: generation runs on to the maximum length repeating words, while teacher-forced accuracy looks "
            "fine. Fix: text ids without special tokens, then </s> (data.encode_labels).",
            pitfall=12,
        )
    ]


def check_labels_decode_to_text(
    labels: list[list[int]], texts: list[str], tokenizer, max_target_length: int
) -> list[Finding]:
    """Pitfall 12: decoding a label (no clean-up) must give back its raw reference text.
    Labels of max_target_length may have been truncated and are skipped."""
    wrong = [
        (text, decoded)
        for ids, text in zip(labels, texts)
        if len(ids) < max_target_length and (decoded := decode(tokenizer, [ids])[0]) != text
    ]
    if not wrong:
        return []
    return [
        Finding(
            "labels_decode_to_text",
            "error",
            f"{len(wrong)} of the first {len(labels)} training labels do not decode back to their reference text: "
            f"{_examples(wrong)} (pitfall 12). A lost first character means the first id was cut off "
            "(to drop an <s> the tokenizer never added); other differences mean the labels come from another "
            "tokenizer. The model is trained on text other than the ground truth. Fix: build labels with "
            "data.encode_labels and the processor's tokenizer.",
            pitfall=12,
        )
    ]


# 3 and 7: the collator, on a probe batch.


def probe_batch(collator, labels: list[list[int]], size: tuple[int, int]) -> tuple[list[dict], dict]:
    """The collator on the shortest and the longest sampled label (padding whenever lengths
    differ, as in any real line set) with a uint8 image whose channels differ (so that
    per-channel mean/std show)."""
    height, width = size
    ramp = torch.arange(height * width).view(1, height, width)
    pixels = ((ramp + torch.tensor([0, 85, 170]).view(3, 1, 1)) % 256).to(torch.uint8)
    features = [{"pixel_values": pixels, "labels": ids} for ids in (min(labels, key=len), max(labels, key=len))]
    return features, collator(features)


def check_label_padding(features: list[dict], batch: dict, pad_token_id: int) -> list[Finding]:
    """Pitfall 3: a label's own ids unchanged, every position after them -100 (ignored by the loss)."""
    for row, feature in enumerate(features):
        ids, padded = feature["labels"], batch["labels"][row].tolist()
        if padded[: len(ids)] == ids and set(padded[len(ids):]) <= {-100}:
            continue
        pad_note = f" (pad_token_id {pad_token_id} used as padding)" if pad_token_id in padded[len(ids):] else ""
        return [
            Finding(
                "label_padding",
                "error",
                f"the collator turned the label {ids} into {padded}: positions after the label must be -100"
                f"{pad_note} (pitfall 3). Otherwise the loss averages over pad predictions, falls fast "
                "and says nothing about reading. Fix: pad labels with -100 (data.OcrCollator).",
                pitfall=3,
            )
        ]
    return []


def check_collator_normalization(features: list[dict], batch: dict, collator, image_processor) -> list[Finding]:
    """Pitfall 7: the collator must rescale and normalize exactly as the image processor."""
    expected = image_processor(images=[features[0]["pixel_values"]], do_resize=False, return_tensors="pt")
    if torch.allclose(batch["pixel_values"][0], expected.pixel_values[0], atol=1e-4):
        return []
    stats = ("image_mean", "image_std", "rescale_factor")
    used = ", ".join(f"{name}={getattr(collator, name)}" for name in stats if hasattr(collator, name))
    reference = ", ".join(f"{name}={getattr(image_processor, name)}" for name in stats)
    return [
        Finding(
            "collator_normalization",
            "error",
            f"the collator's pixel values differ from the image processor's for the same uint8 image (collator: "
            f"{used or type(collator).__name__}; image processor: {reference}) (pitfall 7). The encoder "
            "sees inputs shifted from what it was pretrained on (e.g. ImageNet mean/std instead of 0.5/0.5). Fix: "
            "build the collator with data.OcrCollator.from_image_processor(processor.image_processor).",
            pitfall=7,
        )
    ]


# 6 and 7: tokenizer and image processor against the model and the checkpoint's own.


def _checkpoint_own(loader, model_args):
    """The checkpoint's own tokenizer or image processor when the processor comes from
    elsewhere; None when it is the checkpoint's or the checkpoint ships none."""
    source = model_args.processor_name_or_path
    if not source or source == model_args.model_name_or_path:
        return None
    try:
        return loader.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision, cache_dir=model_args.cache_dir
        )
    except (OSError, ValueError):
        return None


def check_vocabulary_size(model, tokenizer) -> list[Finding]:
    """Pitfall 6: the tokenizer must fit the decoder's embedding table."""
    table = model.decoder.get_input_embeddings().num_embeddings
    if len(tokenizer) == table:
        return []
    too_many = len(tokenizer) > table
    effect = (
        f"Ids from {table} up index past the table: an index error on the first batch that has them."
        if too_many
        else "Its ids name other pieces than the decoder learned: the model must relearn its vocabulary and the "
        "first epochs look like a collapse."
    )
    return [
        Finding(
            "vocabulary_size",
            "error" if too_many else "warning",
            f"the tokenizer has {len(tokenizer)} ids, the decoder's embedding table {table} (pitfall 6: "
            f"the tokenizer of one checkpoint with the model of another; TrOCR-small has 64044 ids, base and large "
            f"50265). {effect} Fix: use the checkpoint's own tokenizer (leave processor_name_or_path unset).",
            pitfall=6,
        )
    ]


def check_tokenizer_matches_checkpoint(tokenizer, model_args) -> list[Finding]:
    """Pitfall 6: a processor from another source must carry the checkpoint's vocabulary."""
    own = _checkpoint_own(AutoTokenizer, model_args)
    if own is None:
        return []
    vocab, own_vocab = tokenizer.get_vocab(), own.get_vocab()
    if vocab == own_vocab:
        return []
    same = sum(own_vocab.get(piece) == index for piece, index in vocab.items())
    return [
        Finding(
            "tokenizer_matches_checkpoint",
            "error",
            f"the tokenizer from {model_args.processor_name_or_path} is not the one of {model_args.model_name_or_path} "
            f"({len(tokenizer)} ids against {len(own)}, {same} pieces with the same id) (pitfall 6). The "
            "decoder's embeddings belong to the checkpoint's tokenizer: with another one the model must relearn its "
            "vocabulary and the first epochs look like a collapse. Fix: leave processor_name_or_path unset.",
            pitfall=6,
        )
    ]


def check_tokenizer_round_trip(texts: list[str], tokenizer) -> list[Finding]:
    """Pitfall 6: text the tokenizer cannot give back (unknown characters, lower-casing)
    can never be predicted, whatever the training."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    wrong = [(text, decoded) for text, one in zip(texts, ids) if (decoded := decode(tokenizer, [one])[0]) != text]
    if not wrong:
        return []
    return [
        Finding(
            "tokenizer_round_trip",
            "error",
            f"the tokenizer does not give back {len(wrong)} of the first {len(texts)} training texts: "
            f"{_examples(wrong)} (pitfall 6). What it loses the model can never output: CER has a floor "
            "above zero. Fix: use the checkpoint's own tokenizer, or a training text it can represent.",
            pitfall=6,
        )
    ]


def check_encoder_image_size(model, image_processor) -> list[Finding]:
    """Pitfall 7: the ViT encoder's position embeddings are sized for one input size."""
    configured = model.config.encoder.image_size
    encoder = tuple(configured) if isinstance(configured, (list, tuple)) else (configured, configured)
    used = tuple(image_size(image_processor))
    if encoder == used:
        return []
    return [
        Finding(
            "encoder_image_size",
            "error",
            f"the encoder was built for {encoder[0]}x{encoder[1]} images (config.encoder.image_size) but the image "
            f"processor resizes to {used[0]}x{used[1]} (pitfall 7). The position embeddings do not fit the "
            "patch grid: the forward pass fails or, interpolated, sees a geometry it was never trained on. Fix: use "
            "the checkpoint's own image processor size (384x384 for the Hub checkpoints).",
            pitfall=7,
        )
    ]


def check_image_resample(image_processor) -> list[Finding]:
    """Pitfall 7: training resizes bicubic as the paper (augment.resize_to_tensor); the
    processor saved beside the model must resize the same way for inference."""
    if image_processor.resample == Image.Resampling.BICUBIC:
        return []
    return [
        Finding(
            "image_resample",
            "warning",
            f"the image processor resamples with {Image.Resampling(image_processor.resample).name} "
            f"({image_processor.resample}), but training resizes bicubic as the paper did (pitfall 7). "
            "Whoever decodes with the saved processor (processor(images=...)) feeds the model images resized "
            "otherwise than in training. Fix: processor.image_processor.resample = PIL.Image.BICUBIC (3).",
            pitfall=7,
        )
    ]


def _image_settings(image_processor) -> dict:
    return {
        "size": tuple(image_size(image_processor)),
        "resample": image_processor.resample,
        "image_mean": tuple(image_processor.image_mean),
        "image_std": tuple(image_processor.image_std),
        "rescale_factor": image_processor.rescale_factor,
    }


def check_image_processor_matches_checkpoint(image_processor, model_args) -> list[Finding]:
    """Pitfall 7: a processor from another source should prepare images as the checkpoint's own."""
    own = _checkpoint_own(AutoImageProcessor, model_args)
    if own is None:
        return []
    used, expected = _image_settings(image_processor), _image_settings(own)
    differences = [f"{key} {used[key]} (checkpoint: {expected[key]})" for key in used if used[key] != expected[key]]
    if not differences:
        return []
    return [
        Finding(
            "image_processor_matches_checkpoint",
            "warning",
            f"the image processor from {model_args.processor_name_or_path} differs from the one of "
            f"{model_args.model_name_or_path}: {'; '.join(differences)} (pitfall 7: e.g. ImageNet "
            "mean/std instead of 0.5/0.5, bilinear instead of bicubic). The encoder sees inputs prepared otherwise "
            "than in pretraining and the first epochs are spent adapting. Fix: leave processor_name_or_path unset, "
            "or match those settings.",
            pitfall=7,
        )
    ]


# 4 and 9: generation and optimization settings.


def check_generation_length(model, training_args, longest: int) -> list[Finding]:
    """Pitfall 4: generation must have room for the longest label plus the start token."""
    needed = longest + 1
    lengths = {
        "generation_config.max_length": model.generation_config.max_length,
        "training_args.generation_max_length": training_args.generation_max_length,
    }
    short = [f"{name}={value}" for name, value in lengths.items() if value is not None and value < needed]
    if not short:
        return []
    return [
        Finding(
            "generation_max_length",
            "error",
            f"{', '.join(short)}, but the longest label has {longest} tokens (</s> included), {needed} with the start "
            "token (pitfall 4; the checkpoints' configs carry the default max_length 20). Longer lines are "
            "cut and CER counts the missing rest. Fix: leave generation_max_length unset so the recipe sizes it "
            f"({generation_max_length(longest)} here), or set it to at least {needed}.",
            pitfall=4,
        )
    ]


def check_learning_rate(
    training_args, model_args, fine_tuned: bool | None = None, max_learning_rate: float = MAX_FINE_TUNED_LEARNING_RATE
) -> list[Finding]:
    """Pitfall 9: an already fine-tuned checkpoint (by name unless `fine_tuned` is given)
    wants a small learning rate."""
    if fine_tuned is None:
        fine_tuned = any(marker in model_args.model_name_or_path for marker in FINE_TUNED_MARKERS)
    if not fine_tuned or training_args.learning_rate <= max_learning_rate:
        return []
    return [
        Finding(
            "learning_rate",
            "warning",
            f"learning_rate={training_args.learning_rate:g} on {model_args.model_name_or_path}, a checkpoint already "
            f"fine-tuned (pitfall 9). A rate above {max_learning_rate:g} moves a converged model away from "
            "its optimum within an epoch: CER rises from its baseline. Fix: a rate near the reference's 2e-5, or "
            "start from a -stage1 checkpoint.",
            pitfall=9,
        )
    ]


# Running the checks and acting on them.


def run_checks(
    run,
    model_args,
    data_args,
    training_args,
    *,
    sample_size: int = SAMPLE_SIZE,
    fine_tuned: bool | None = None,
    max_learning_rate: float = MAX_FINE_TUNED_LEARNING_RATE,
) -> list[Finding]:
    """Every check on what `pipeline.prepare_run` built (a `RunInputs`); reads the labels
    and the first `sample_size` training texts, never the dataset's images."""
    model, tokenizer, image_processor = run.model, run.processor.tokenizer, run.processor.image_processor
    # Without the on-the-fly image transform, reading labels decodes no image.
    splits = DatasetDict({role: split.with_format(None) for role, split in run.inputs.items()})
    labels = splits["train"]["labels"][:sample_size]
    texts = run.references["train"][:sample_size]
    features, batch = probe_batch(run.collator, labels, image_size(image_processor))
    return [
        *check_decoder_start(model, tokenizer),
        *check_special_token_ids(model, tokenizer),
        *check_labels_without_bos(labels, tokenizer),
        *check_labels_end_with_eos(labels, tokenizer),
        *check_labels_decode_to_text(labels, texts, tokenizer, data_args.max_target_length),
        *check_label_padding(features, batch, tokenizer.pad_token_id),
        *check_generation_length(model, training_args, longest_label(splits)),
        *check_vocabulary_size(model, tokenizer),
        *check_tokenizer_matches_checkpoint(tokenizer, model_args),
        *check_tokenizer_round_trip(texts, tokenizer),
        *check_collator_normalization(features, batch, run.collator, image_processor),
        *check_encoder_image_size(model, image_processor),
        *check_image_resample(image_processor),
        *check_image_processor_matches_checkpoint(image_processor, model_args),
        *check_learning_rate(training_args, model_args, fine_tuned, max_learning_rate),
    ]


def format_findings(findings: list[Finding], strict: bool = False) -> str:
    if not findings:
        return "Preflight checks: every check passed."
    lines = [f"Preflight checks found {len(findings)} problem(s) that would spoil the run (see {PITFALLS_DOC}):"]
    lines += [f"- {finding}" for finding in findings]
    if strict and any(finding.level == "warning" for finding in findings):
        lines.append("(preflight_strict: warnings count as errors)")
    return "\n".join(lines)


def raise_on_errors(findings: list[Finding], strict: bool = False) -> None:
    """Logs the warnings; stops the run listing every error at once (every warning too when strict)."""
    blocking = [finding for finding in findings if strict or finding.level == "error"]
    for finding in findings:
        if finding not in blocking:
            logger.warning("Preflight %s", finding)
    if blocking:
        raise SystemExit(format_findings(blocking, strict))
    logger.info("Preflight checks passed with %d warning(s)", len(findings))


def preflight(run, model_args, data_args, training_args, strict: bool = False, **options) -> list[Finding]:
    """`run_checks` then `raise_on_errors`: what both loops call before training."""
    findings = run_checks(run, model_args, data_args, training_args, **options)
    raise_on_errors(findings, strict)
    return findings


def preflight_forward(model, collator, train_split, batch_size: int) -> float:
    """One forward pass (eval mode, no gradients) on the first training batch; stops the run
    when the loss is not finite. Reading the train split runs its augmentation, which draws
    from the global `random` state: meant for `--preflight_only`."""
    features = [train_split[index] for index in range(min(batch_size, len(train_split)))]
    batch = {key: value.to(model.device) for key, value in collator(features).items()}
    training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(training)
    if not math.isfinite(loss):
        raise_on_errors([
            Finding(
                "forward_loss",
                "error",
                f"the loss of the first training batch is {loss}, not finite: NaN or inf weights in the checkpoint, "
                "or pixel values or label ids out of range. Nothing can be trained from it.",
            )
        ])
    vocabulary = model.decoder.get_input_embeddings().num_embeddings
    logger.info(
        "Preflight forward pass: loss %.4f on %d training lines (a model that knows nothing: ln(%d) = %.2f)",
        loss, len(features), vocabulary, math.log(vocabulary),
    )
    return loss


def run_preflight(run, model_args, data_args, training_args) -> dict | None:
    """Both loops' step before training: stop on errors (and warnings, when strict). With
    `preflight_only`, also one forward pass and a printed report, returned as the result."""
    findings = preflight(run, model_args, data_args, training_args, strict=data_args.preflight_strict)
    if not data_args.preflight_only:
        return None
    loss = preflight_forward(run.model, run.collator, run.inputs["train"], training_args.per_device_train_batch_size)
    print(format_findings(findings, data_args.preflight_strict))
    print(f"One training batch forward: loss {loss:.4f}")
    return {"preflight_findings": [str(finding) for finding in findings], "preflight_loss": loss}
