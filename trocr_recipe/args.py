"""Arguments of a run and the recipe parser: one JSON file gives the defaults, command-line
flags override them, and an unknown key in either place stops the run naming it."""

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Seq2SeqTrainingArguments


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
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop when validation CER has not improved for this many evaluations (paper: 20 epochs)."},
    )


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments)


def _field_names(parser) -> set[str]:
    return {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}


def load_recipe(path: str, known: set[str]) -> dict:
    try:
        recipe = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"{path}: recipe file not found") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}") from None
    if not isinstance(recipe, dict):
        raise SystemExit(f"{path}: a recipe is a JSON object of argument names to values")
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown recipe key(s): {', '.join(unknown)}")
    if recipe.get("bf16") == "auto":
        # One recipe serves every machine: bf16 on GPUs that have it, float32 elsewhere.
        recipe["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return recipe


def parse_recipe(argv: list[str] | None = None):
    """`RECIPE.json [--flag value ...]` or flags alone -> (model, data, training) arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)
    if argv and argv[0].endswith(".json"):
        parser.set_defaults(**load_recipe(argv.pop(0), _field_names(parser)))
    model_args, data_args, training_args, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if remaining:
        flags = [item for item in remaining if item.startswith("-")] or remaining
        raise SystemExit(f"unknown argument(s): {' '.join(flags)}")
    if model_args.model_name_or_path is None:
        raise SystemExit("model_name_or_path is required (in the recipe or as --model_name_or_path)")
    if data_args.dataset_name is None:
        raise SystemExit("dataset_name is required (in the recipe or as --dataset_name)")
    return model_args, data_args, training_args
