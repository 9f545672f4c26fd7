"""Model and processor loading, special tokens on both configs, and the generation config."""

import logging
import math
import os
import pickle

from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from PIL import Image
from transformers import PreTrainedModel, TrOCRProcessor, VisionEncoderDecoderModel

from .errors import BadInput, one_line, read_json_object

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
# The files of a model or processor folder that can map a class to Python code in the folder.
CODE_MAPS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
SAVED = "a folder written by save_pretrained"


def _not_a_folder(name: str, flag: str) -> None:
    """BadInput for a name that is no local folder and cannot be a Hub id either (a path)."""
    if os.path.exists(name):
        raise BadInput(f"{flag} {name}: not a folder; give {SAVED}")
    build = BUILT_BY_MAKE.get(os.path.normpath(name))
    if build:
        raise BadInput(f"{flag} {name}: no such local folder (looked in {os.path.abspath(name)}: a recipe's paths are "
                       "relative to the folder you run from; run from the repository root or give the path from "
                       f"here). Run `{build}` first: it builds {name}.")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise BadInput(f"{flag} {name}: no such local folder (and not a Hub id); give {SAVED}") from None
    if name.startswith((".", "/", "~")):
        raise BadInput(f"{flag} {name}: no such local folder; give {SAVED}")


def check_folder(name: str, flag: str, trust_remote_code: bool = False, model: bool = True) -> None:
    """What from_pretrained would trip over or silently fill in, named before it runs: a
    class mapped to the folder's own code (never run unless trust_remote_code), a config.json
    missing or not a VisionEncoderDecoderModel's (no decoder: a random one would load), a
    generation_config.json that cannot be read (it would be ignored)."""
    folder = Path(name)
    if not trust_remote_code:
        for file in CODE_MAPS:
            if (folder / file).is_file() and "auto_map" in _json(folder / file, flag, name):
                raise BadInput(f"{flag} {name}: {file} maps a class to Python code in the folder (auto_map); this "
                               "tool never runs code from a model folder: save the model with transformers' own "
                               "classes")
    if not model:
        return
    if not (folder / "config.json").is_file():
        raise BadInput(f"{flag} {name}: no config.json, not a model folder; give {SAVED}")
    config = _json(folder / "config.json", flag, name)
    if config.get("model_type") != "vision-encoder-decoder":
        raise BadInput(f"{flag} {name}: config.json is of model_type {config.get('model_type')!r}, not "
                       "'vision-encoder-decoder'; give the folder of a TrOCR model")
    missing = [part for part in ("encoder", "decoder") if not isinstance(config.get(part), dict)]
    if missing:
        raise BadInput(f"{flag} {name}: config.json has no {' and no '.join(missing)} config (a random one would "
                       "be built in its place); save the model again with save_pretrained")
    if (folder / "generation_config.json").exists():
        _json(folder / "generation_config.json", flag, name)


def _json(path: Path, flag: str, name: str) -> dict:
    try:
        return read_json_object(path, "repair or remove it, or save the model again with save_pretrained")
    except BadInput as error:
        raise BadInput(f"{flag} {name}: {str(error).removeprefix(str(path.parent) + os.sep)}") from None


def pretrained(cls, name: str, flag: str, trust_remote_code: bool = False, fix: str | None = None, **kwargs):
    """`cls.from_pretrained(name)` that never runs a folder's own code unless asked
    (trust_remote_code is passed, never left to a prompt on stdin) and turns every error of
    the libraries (missing or foreign config, damaged or pickled weights, a bad tokenizer
    config) into one BadInput line naming `flag`, the folder and what to do."""
    if not isinstance(name, str) or not name.strip():
        raise BadInput(f"{flag} {name!r}: empty; give {SAVED}, or a Hub id")
    if os.path.isdir(name):
        check_folder(name, flag, trust_remote_code, model=issubclass(cls, PreTrainedModel))
    else:
        _not_a_folder(name, flag)
    try:
        return cls.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as error:  # transformers, safetensors, tokenizers and pickle raise a dozen types
        where = "" if os.path.isdir(name) else "not a local folder, and as a Hub id: "
        detail = f"{type(error).__name__}: {one_line(error)[:300]}"
        if isinstance(error, pickle.UnpicklingError):  # torch's text suggests weights_only=False: never here
            detail = "a pickle torch.load(weights_only=True) refuses: it would build other objects or run code"
        fix = fix or f"save it again with save_pretrained, or give another {flag}"
        raise BadInput(f"{flag} {name}: {where}cannot load a {cls.__name__} ({detail}); {fix}") from None


def check_model_source(model_args) -> None:
    """check_folder on a local starting model, before a run spends time on its data."""
    if os.path.isdir(model_args.model_name_or_path or ""):
        check_folder(model_args.model_name_or_path, "model_name_or_path", model_args.trust_remote_code)


def load_processor(model_args, flag: str | None = None) -> TrOCRProcessor:
    """From a Hub id or a local folder; the checkpoint's own processor by default. `flag`
    names the argument in errors (default: the recipe key the name came from)."""
    name = model_args.processor_name_or_path or model_args.model_name_or_path
    flag = flag or ("processor_name_or_path" if model_args.processor_name_or_path else "model_name_or_path")
    processor = pretrained(TrOCRProcessor, name, flag, **_source(model_args))
    # The released checkpoints' processor configs say bilinear; the saved processor must say what training did.
    old = processor.image_processor.resample
    if old != Image.BICUBIC:
        processor.image_processor.resample = Image.BICUBIC
        logger.warning("Changed image_processor.resample %s -> bicubic (the paper resized bicubic, and so does the "
                       "data path)", _RESAMPLE_NAMES.get(old, old))
    return processor


def load_model(model_args, tokenizer, flag: str = "model_name_or_path") -> tuple[VisionEncoderDecoderModel, list[str]]:
    """Weights from model.safetensors only, unless allow_pickle_weights: a pickle can run code.
    Returns the model and the special-token settings of the checkpoint it changed."""
    name = model_args.model_name_or_path
    if (os.path.isdir(name) and not model_args.allow_pickle_weights
            and not any(Path(name).glob("model*.safetensors*")) and any(Path(name).glob("pytorch_model*.bin*"))):
        raise BadInput(f"{flag} {name}: no model.safetensors. Only safetensors weights are loaded by default; "
                       "--allow_pickle_weights also loads pytorch_model.bin")
    try:
        model = pretrained(VisionEncoderDecoderModel, name, flag,
                           use_safetensors=None if model_args.allow_pickle_weights else True, **_source(model_args))
    except BadInput as error:
        if model_args.allow_pickle_weights or os.path.isdir(name) or "safetensors" not in str(error):
            raise
        raise BadInput(f"{error} (only model.safetensors is loaded by default; --allow_pickle_weights also loads "
                       "pytorch_model.bin)") from None
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
