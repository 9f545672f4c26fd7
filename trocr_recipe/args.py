"""Arguments of a run and the recipe parser: one JSON file gives the defaults, command-line
flags override them, and an unknown key or a value of the wrong type in either place stops
the run naming it."""

import argparse
import dataclasses
import json
import math
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from .errors import BadInput, read_json_object


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint to start from: a Hub id (e.g. microsoft/trocr-small-stage1) or a local folder."},
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Processor (image processor + tokenizer) to use; defaults to model_name_or_path."},
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of the Hub checkpoint."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded models and datasets are cached."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code that a Hub checkpoint or processor ships for custom classes. Off, only "
            "transformers' own classes load and a checkpoint that needs its own code stops the run."
        },
    )
    trainable: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "Which parameters train, the others frozen: all, encoder, decoder, or shell-style patterns on "
            "the parameter names, e.g. 'encoder.layers.11.*' 'decoder.model.decoder.layers.[45].*' (a recipe "
            "gives a list). The counts of trainable and frozen parameters are logged and in all_results.json."
        },
    )
    method: dict | str | None = field(
        default=None,
        metadata={
            "help": "A free-form JSON object for a method of your own, e.g. {\"entropy_weight\": 0.1}: "
            "run_trocr_no_trainer.py hands it to compute_loss and create_optimizer unread "
            "(docs/custom_loop.md); run_trocr.py refuses it."
        },
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Also load weights from pytorch_model.bin (a pickle, read with torch.load(weights_only=True)); "
            "by default only model.safetensors is read and a checkpoint without it stops the run."
        },
    )

    def __post_init__(self):
        if isinstance(self.method, str):  # from the command line: JSON text
            try:
                self.method = json.loads(self.method)
            except json.JSONDecodeError as error:
                raise ValueError(f"method {self.method!r}: not valid JSON ({error.msg}); give an object such as "
                                 '\'{"entropy_weight": 0.1}\'') from None
        if self.method is not None and not isinstance(self.method, dict):
            raise ValueError(f"method {json.dumps(self.method)}: a JSON object of names to values")


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub dataset (e.g. Teklia/IAM-line) or a local path: a save_to_disk folder, a folder of "
            "parquet files, or an imagefolder with metadata."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    image_column: str = field(default="image", metadata={"help": "Column holding the line images."})
    text_column: str = field(default="text", metadata={"help": "Column holding the transcriptions."})
    id_column: str | None = field(
        default="id", metadata={"help": "Column naming each line in predictions files; row index if absent."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str = field(default="validation", metadata={"help": "Split for model selection."})
    test_split: str = field(default="test", metadata={"help": "Split scored at the end (do_predict)."})
    max_target_length: int = field(
        default=256,
        metadata={"help": "Longest label in tokens, </s> included; longer labels are truncated and counted."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training lines."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation lines."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use only the first N test lines."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for the label tokenization map."}
    )
    augment: bool = field(
        default=True, metadata={"help": "The paper's seven-way augmentation on the training split."}
    )
    preflight_only: bool = field(
        default=False,
        metadata={"help": "Run the preflight checks and one forward pass, print the report, and stop."},
    )
    preflight_strict: bool = field(
        default=False, metadata={"help": "Preflight warnings stop the run too, as errors do."}
    )
    baseline_test: bool = field(
        default=False,
        metadata={
            "help": "The starting model is scored on the test split too, before training (baseline_test_cer in "
            "all_results.json, predictions_baseline_test.jsonl): fine-tuning's before and after on the same lines."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop when validation CER has not improved for this many evaluations (paper: 20 epochs)."},
    )
    # The data check (trocr_recipe/validate.py): what to do with each kind of bad line.
    on_undecodable_image: Literal["error", "skip"] = field(
        default="skip",
        metadata={
            "help": "A line whose image cannot be decoded (truncated file, not an image): skip it (counted, and "
            "named in data_report.json) or stop the run (error)."
        },
    )
    on_bad_image_size: Literal["error", "skip"] = field(
        default="skip",
        metadata={
            "help": "A line whose image has a side of 0 pixels, a side above max_image_side or an aspect ratio above "
            "max_aspect_ratio: skip or error."
        },
    )
    on_empty_text: Literal["error", "skip", "keep"] = field(
        default="skip",
        metadata={"help": "A line whose text is empty or whitespace only: skip, error, or keep (learn to read nothing)."},
    )
    on_unknown_tokens: Literal["error", "skip", "keep"] = field(
        default="keep",
        metadata={
            "help": "A line whose label holds the tokenizer's unknown token (characters its vocabulary lacks, which "
            "the model can never write): keep (counted and named in data_report.json), skip or error."
        },
    )
    on_label_too_long: Literal["error", "skip", "keep"] = field(
        default="keep",
        metadata={
            "help": "A line whose label is longer than max_target_length: keep it truncated (counted as "
            "<split>_truncated_labels and named in data_report.json), skip or error."
        },
    )
    max_image_side: int = field(
        default=20000, metadata={"help": "Longest image side in pixels; a larger image is a bad_image_size line."}
    )
    max_aspect_ratio: float = field(
        default=100.0,
        metadata={"help": "Largest long side / short side of an image; a flatter one is a bad_image_size line."},
    )
    max_bad_fraction: float = field(
        default=0.01,
        metadata={
            "help": "Stop when more than this fraction of a split would be skipped: then the data or the settings "
            "(image column, tokenizer, max_target_length) are wrong, not a few lines."
        },
    )
    trace_steps: int | None = field(
        default=None,
        metadata={
            "help": "Write a reference trace for checking another training loop: train N optimizer steps "
            "deterministically (dropout and augmentation off, no evaluation or checkpoints) and save each step's "
            "exact batch, loss, gradient norm and learning rate with the settings a loop must share in "
            "<output_dir>/trace (docs/step_comparison.md)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds a run, even one of another recipe: its checkpoints "
            "and all_results.json are removed. Without it a run resumes there only with the same recipe."
        },
    )

    def __post_init__(self):
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction}: a fraction between 0 and 1")
        if self.trace_steps is not None and self.trace_steps < 1:
            raise ValueError(f"trace_steps={self.trace_steps}: the number of optimizer steps to trace, at least 1")
        if self.max_image_side < 1 or self.max_aspect_ratio < 1:
            raise ValueError(
                f"max_image_side={self.max_image_side}, max_aspect_ratio={self.max_aspect_ratio}: both at least 1"
            )


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments)


class RecipeParser(HfArgumentParser):
    USAGE = "%(prog)s RECIPE.json [--flag value ...]"
    RECIPE = textwrap.fill(
        "RECIPE.json: a recipe (recipes/README.md lists them), a JSON object of the arguments below; its values "
        "replace the defaults shown, flags override both; an unknown key or a value of the wrong type stops the "
        "run, named.", width=92)

    def error(self, message):
        # argparse would print the usage of every argument (hundreds of lines) first.
        raise SystemExit(f"{self.prog}: {message} (--help lists every argument)")

    def format_help(self) -> str:
        """What the script does and the recipe, then the project's own options, then the ~120
        stock training ones (argparse would list them all as one block)."""
        def options(classes) -> str:
            parser = HfArgumentParser(classes, usage=argparse.SUPPRESS, add_help=False)
            return parser.format_help().split("\n", 1)[1]  # past its "options:" title

        return "\n".join([
            self.format_usage(), (self.description or "").strip(), "", self.RECIPE, "",
            "options of this project (model, data, checks; trocr_recipe/args.py):",
            "  -h, --help            show this message and exit", options(ARGUMENT_CLASSES[:2]),
            "training options (transformers Seq2SeqTrainingArguments):", options(ARGUMENT_CLASSES[2:]),
        ])


def _field_types(parser) -> dict[str, object]:
    """Argument name -> its type annotation, resolved."""
    annotations = {}
    for dtype in parser.dataclass_types:
        hints = typing.get_type_hints(dtype)
        annotations.update({f.name: hints[f.name] for f in dataclasses.fields(dtype) if f.init})
    return annotations


def _accepts(annotation, value) -> bool:
    """Whether a JSON value fits an argument's annotation. argparse converts only string
    defaults, so a recipe's 2.5 for an int would reach the run as it is."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(_accepts(args[0], item) for item in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):  # true and false are not numbers; 3 is a float
        return isinstance(value, (int, annotation)) and not isinstance(value, bool)
    if annotation in (str, Path):
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return value in [member.value for member in annotation]
    return True  # a class no JSON value is (GenerationConfig, ...): its own checks apply


def _describe(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in args))
    if origin is Literal:
        return " or ".join(json.dumps(arg) for arg in args)
    if origin is list:
        return f"a list, each item {_describe(args[0])}" if args else "a list"
    if origin is dict or annotation is dict:
        return "an object"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " or ".join(json.dumps(member.value) for member in annotation)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, "a string" if annotation is Path else getattr(annotation, "__name__", str(annotation)))


def _json_kind(value) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), "null")


def load_recipe(path: str, annotations: dict[str, object]) -> dict:
    if not Path(path).exists():
        raise BadInput(f"{path}: recipe file not found")
    recipe = read_json_object(path, "a recipe is one JSON object of argument names to values, in UTF-8")
    unknown = sorted(set(recipe) - set(annotations))
    if unknown:
        raise SystemExit(f"{path}: unknown recipe key(s): {', '.join(unknown)}")
    if recipe.get("bf16") == "auto":
        # One recipe serves every machine: bf16 on GPUs that have it, float32 elsewhere.
        recipe["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if recipe.get("tf32") == "auto":
        # TF32 float32 matmuls on GPUs that have them (Ampere and newer); elsewhere left unset
        # (True would stop the run there).
        recipe["tf32"] = True if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) else None
    wrong = [
        f'"{key}": {json.dumps(value)} is {_json_kind(value)}, expected {_describe(annotations[key])}'
        for key, value in recipe.items()
        if not _accepts(annotations[key], value)
    ]
    if wrong:
        raise SystemExit(f"{path}: wrong type: " + "; ".join(wrong))
    return recipe


def parse_recipe(argv: list[str] | None = None, description: str | None = None):
    """`RECIPE.json [--flag value ...]` or flags alone -> (model, data, training) arguments;
    `description` (what the script does) opens its --help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = RecipeParser(ARGUMENT_CLASSES, allow_abbrev=False, usage=RecipeParser.USAGE, description=description)
    source = "arguments"
    if argv and argv[0].endswith(".json"):
        source = argv.pop(0)
        parser.set_defaults(**load_recipe(source, _field_types(parser)))
    try:
        model_args, data_args, training_args, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except ValueError as error:  # the arguments' own checks, e.g. an eval_strategy that does not exist
        raise SystemExit(f"{source}: {error}") from None
    if remaining:
        flags = [item for item in remaining if item.startswith("-")] or remaining
        raise SystemExit(f"unknown argument(s): {' '.join(flags)}")
    if model_args.model_name_or_path is None:
        raise SystemExit("model_name_or_path is required (in the recipe or as --model_name_or_path)")
    if data_args.dataset_name is None:
        raise SystemExit("dataset_name is required (in the recipe or as --dataset_name)")
    check_numbers(model_args, data_args, training_args, source)
    if data_args.baseline_test and not training_args.do_eval:
        raise SystemExit(f"{source}: baseline_test scores the starting model beside its validation baseline: "
                         "it needs do_eval")
    return model_args, data_args, training_args


# Numbers the libraries take without complaint and would turn into another run: a negative
# max_steps trains by epochs, a label of 1 token is </s> alone, a batch of 0 stops at the
# first step. (key, smallest value, what it is); None values are left unset.
NUMBER_RANGES = (
    ("max_target_length", 2, "the longest label in tokens, </s> included (1 would keep </s> alone)"),
    ("per_device_train_batch_size", 1, "lines per batch"), ("per_device_eval_batch_size", 1, "lines per batch"),
    ("gradient_accumulation_steps", 1, "batches per update"),
    ("max_train_samples", 1, "lines"), ("max_eval_samples", 1, "lines"), ("max_test_samples", 1, "lines"),
    ("preprocessing_num_workers", 1, "processes"), ("early_stopping_patience", 1, "evaluations"),
    ("generation_num_beams", 1, "beams"), ("generation_max_length", 2, "tokens, the start token included"),
    ("learning_rate", 0, "the peak learning rate"), ("weight_decay", 0, "the weight decay"),
    ("warmup_steps", 0, "steps (or a fraction of them)"), ("num_train_epochs", 0, "epochs"),
    ("max_grad_norm", 0, "the clipping norm (0: none)"), ("label_smoothing_factor", 0, "a fraction below 1"),
    ("adam_epsilon", 0, "Adam's epsilon"),
)


def check_numbers(model_args, data_args, training_args, source: str) -> None:
    """Each number in its range and finite, before anything loads; max_steps -1 (train by
    epochs) or a positive step count."""
    values = {**vars(data_args), **vars(training_args)}
    for key, minimum, what in NUMBER_RANGES:
        value = values.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < minimum:
            raise BadInput(f"{source}: {key} {value}: {what}; must be a finite number, at least {minimum}")
    if not 0 <= training_args.label_smoothing_factor < 1:
        raise BadInput(f"{source}: label_smoothing_factor {training_args.label_smoothing_factor}: a fraction below 1")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise BadInput(f"{source}: max_steps {training_args.max_steps}: a number of optimizer steps (1 or more), or "
                       "-1 to train num_train_epochs")
