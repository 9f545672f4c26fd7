"""Model and processor loading, special tokens on both configs, and the generation config."""

import math

import torch
from PIL import Image
from transformers import TrOCRProcessor, VisionEncoderDecoderModel


def _source(model_args) -> dict:
    return dict(
        revision=model_args.model_revision,
        cache_dir=model_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
    )


def load_processor(model_args) -> TrOCRProcessor:
    """From a Hub id or a local folder; the checkpoint's own processor by default."""
    processor = TrOCRProcessor.from_pretrained(
        model_args.processor_name_or_path or model_args.model_name_or_path, **_source(model_args)
    )
    # The paper resizes bicubic, and so does the data path; the released checkpoints'
    # processor configs say bilinear. The saved processor must say what training did.
    processor.image_processor.resample = Image.BICUBIC
    return processor


def load_model(model_args, tokenizer) -> VisionEncoderDecoderModel:
    """Weights from model.safetensors only, unless allow_pickle_weights: a pickle can run code."""
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
    set_special_tokens(model, tokenizer)
    return model


def set_special_tokens(model, tokenizer) -> None:
    """The pretrained TrOCR decoder starts from `</s>`, not `<s>`. Generation reads
    `generation_config`, the loss's label shift reads `config`: both must agree."""
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.eos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size


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
    config = model.generation_config
    config.max_length = training_args.generation_max_length
    config.num_beams = training_args.generation_num_beams
    config.length_penalty = 1.0
    config.no_repeat_ngram_size = 0
    config.early_stopping = config.num_beams > 1


def token_loss(logits, labels, num_items_in_batch=None):
    """Cross-entropy summed over the label tokens and divided by the number of label tokens
    in the whole optimizer step (all accumulated micro-batches, all processes), as the
    reference trainer normalized it; a plain token mean when that count is not given."""
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum())
