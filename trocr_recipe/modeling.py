"""Model and processor loading, special tokens on both configs, and the generation config."""

import logging
import math
import os

import torch
from PIL import Image
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

logger = logging.getLogger("trocr_recipe")

_RESAMPLE_NAMES = {int(value): value.name.lower() for value in Image.Resampling}


def change_setting(config, where: str, key: str, value, why: str, level: int = logging.WARNING) -> str | None:
    """Sets `config.key = value`; a change is logged as `where.key old -> new (why)` and returned."""
    old = getattr(config, key, None)
    setattr(config, key, value)
    if old == value:
        return None
    change = f"{where}.{key} {old} -> {value} ({why})"
    logger.log(level, "Changed %s", change)
    return change


def _source(model_args) -> dict:
    return dict(
        revision=model_args.model_revision,
        cache_dir=model_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
    )


# The local models the Makefile builds, and the command that builds each.
BUILT_BY_MAKE = {"models/tiny": "make tiny", "models/demo": "make demo"}


def load_processor(model_args) -> TrOCRProcessor:
    """From a Hub id or a local folder; the checkpoint's own processor by default."""
    name = model_args.processor_name_or_path or model_args.model_name_or_path
    try:
        processor = TrOCRProcessor.from_pretrained(name, **_source(model_args))
    except OSError as error:
        if os.path.isdir(name):
            raise
        build = BUILT_BY_MAKE.get(os.path.normpath(name))
        hint = f" Run `{build}` first: it builds {name}." if build else ""
        where = (f"no such local folder (looked in {os.path.abspath(name)}: a recipe's paths are relative to the "
                 "folder you run from; run from the repository root or give the path from here)")
        raise SystemExit(f"{name}: {where}, and not loadable as a Hub id ({error}).{hint}") from None
    # The released checkpoints' processor configs say bilinear; the saved processor must say what training did.
    old = processor.image_processor.resample
    if old != Image.BICUBIC:
        processor.image_processor.resample = Image.BICUBIC
        logger.warning("Changed image_processor.resample %s -> bicubic (the paper resized bicubic, and so does the "
                       "data path)", _RESAMPLE_NAMES.get(old, old))
    return processor


def load_model(model_args, tokenizer) -> tuple[VisionEncoderDecoderModel, list[str]]:
    """Weights from model.safetensors only, unless allow_pickle_weights: a pickle can run code.
    Returns the model and the special-token settings of the checkpoint it changed."""
    try:
        model = VisionEncoderDecoderModel.from_pretrained(
            model_args.model_name_or_path,
            use_safetensors=None if model_args.allow_pickle_weights else True,
            **_source(model_args),
        )
    except OSError as error:
        if model_args.allow_pickle_weights or "safetensors" not in str(error):
            raise
        raise SystemExit(
            f"{model_args.model_name_or_path}: no model.safetensors ({error}). Only safetensors weights are loaded "
            "by default; --allow_pickle_weights also loads pytorch_model.bin."
        ) from None
    return model, set_special_tokens(model, tokenizer)


SPECIAL_TOKENS_WHY = {
    "decoder_start_token_id": "the pretrained TrOCR decoder starts from </s>, not <s>",
    "eos_token_id": "lines end with </s>",
    "pad_token_id": "the tokenizer's pad id",
}


def set_special_tokens(model, tokenizer) -> list[str]:
    """Decoder start and end `</s>`, pad the tokenizer's, on `config` (the loss's label shift
    reads it) and `generation_config` (generate reads it). Returns the changes, each logged."""
    values = {"decoder_start_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    changes = [
        change_setting(config, where, key, value, SPECIAL_TOKENS_WHY[key])
        for where, config in (("model.config", model.config), ("model.generation_config", model.generation_config))
        for key, value in values.items()
    ]
    changes.append(change_setting(model.config, "model.config", "vocab_size", model.config.decoder.vocab_size,
                                  "the decoder's vocabulary", logging.INFO))
    return [change for change in changes if change]


def generation_max_length(longest_label: int) -> int:
    """Room for the longest label (</s> included) plus the start token and a 10% margin,
    so that no reference line is cut; never the checkpoints' default of 20."""
    return math.ceil(1.1 * longest_label) + 1


def configure_generation(model, training_args, longest_label: int) -> None:
    """Beam search as the paper decoded (length penalty 1, no n-gram blocking). The
    training arguments' generation knobs are the only ones; they are written into the
    model's generation config so that the saved model decodes the same way."""
    if training_args.generation_max_length is None:
        training_args.generation_max_length = generation_max_length(longest_label)
    if training_args.generation_num_beams is None:
        training_args.generation_num_beams = model.generation_config.num_beams or 1
    config, where = model.generation_config, "model.generation_config"
    for key, value, why in (
        ("max_length", training_args.generation_max_length, "the longest label of the data, plus a margin"),
        ("num_beams", training_args.generation_num_beams, "generation_num_beams of the run"),
        ("length_penalty", 1.0, "beam search as the paper decoded"),
        ("no_repeat_ngram_size", 0, "the paper blocked no n-gram"),
        ("early_stopping", training_args.generation_num_beams > 1, "a line's beam search ends when its beams have"),
    ):
        change_setting(config, where, key, value, why, logging.INFO)


def token_loss(logits, labels, num_items_in_batch=None, label_smoothing: float = 0.0):
    """Cross-entropy summed over the label tokens and divided by the number of label tokens
    in the whole optimizer step (all accumulated micro-batches, all processes), as the
    reference trainer normalized it; a plain token mean when that count is not given."""
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum",
        label_smoothing=label_smoothing,
    )
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum())
