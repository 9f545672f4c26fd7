"""Everything a run needs before its loop starts, the same for both loops: logging, model
and processor with their special tokens, the splits checked (trocr_recipe/validate.py) and
with labels, the generation config, the on-the-fly image transforms and the collator."""

from . import recipe_only  # noqa: F401, I001  (first: an older transformers is named at import)

import logging
import os
import sys
from dataclasses import dataclass

import datasets
import transformers
from datasets import DatasetDict

from .checkpoints import TRAINER_MARKER, claim_output_dir, find_checkpoint
from .checks import run_preflight
from .data import (
    OcrCollator, line_ids, load_splits, longest_label, normalize_on_device, tokenize_splits, with_image_transforms,
)
from .errors import BadInput, one_line
from .modeling import check_model_source, configure_generation, load_model, load_processor
from .outputs import log_scores, write_split_report
from .validate import check_splits

logger = logging.getLogger("trocr_recipe")

# The prefix of each split's scores in all_results.json (eval_cer, test_cer).
RESULT_PREFIX = {"train": "train", "validation": "eval", "test": "test"}


@dataclass
class RunInputs:
    model: transformers.VisionEncoderDecoderModel
    processor: transformers.TrOCRProcessor
    inputs: DatasetDict  # train / validation / test, images transformed on the fly
    references: dict[str, list[str]]  # raw ground truth per split, what CER is scored on
    ids: dict[str, list[str]]
    truncated: dict[str, int]  # labels cut to max_target_length, per split
    skipped: dict[str, int]  # lines the data check skipped, per split (named in data_report.json)
    collator: OcrCollator
    corrections: list[str]  # the checkpoint's special-token settings changed on loading, `key old -> new (why)`

    def data_results(self) -> dict:
        """What the data path changed, for all_results.json: truncated labels and skipped
        lines per split, the latter next to the split's scores (test_skipped_lines)."""
        results = {f"{role}_truncated_labels": count for role, count in self.truncated.items()}
        results.update({f"{RESULT_PREFIX[role]}_skipped_lines": count for role, count in self.skipped.items()})
        return results

    def report_split(self, role: str, scores: dict, predictions: list[str], output_dir: str, image_column: str,
                     main_process: bool, prefix: str | None = None) -> None:
        """A split's scores, the same in both loops: its predictions file and report (main
        process only), then its CER and WER logged with the lines the data check skipped.
        `prefix` names the scores and files (default: the final ones, RESULT_PREFIX[role])."""
        name = prefix or role
        if main_process:
            images = self.inputs[role].with_format(None)[image_column]  # raw images, not transformed
            write_split_report(output_dir, name, self.ids[role], self.references[role], predictions, images)
        log_scores(name.replace("_", " "), prefix or RESULT_PREFIX[role], scores, self.references[role], predictions,
                   self.skipped[role])


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    # The run's own progress and results are shown on the main process whatever the
    # libraries' verbosity.
    logger.setLevel(logging.INFO if training_args.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def prepare_run(model_args, data_args, training_args) -> RunInputs:
    # Data before the model: a wrong column or split name stops the run in seconds.
    check_model_source(model_args)
    processor = load_processor(model_args)
    with training_args.main_process_first(desc="dataset loading, data check and label tokenization"):
        splits = load_dataset_splits(data_args, model_args.cache_dir)
        splits, skipped = check_splits(
            splits, processor.tokenizer, data_args, training_args.output_dir, write_report=training_args.should_save
        )
        truncated = tokenize_splits(splits, processor.tokenizer, data_args)
    for role, count in truncated.items():
        if count:
            logger.warning(
                "%d %s labels longer than max_target_length=%d were truncated", count, role, data_args.max_target_length
            )
    model, corrections = load_model(model_args, processor.tokenizer)
    collator = OcrCollator.from_image_processor(processor.image_processor)
    normalize_on_device(model, collator)  # batches from dataloader workers arrive as uint8
    configure_generation(model, training_args, longest_label(splits))
    logger.info("Generation: %s", model.generation_config.to_diff_dict())
    return RunInputs(
        model=model,
        processor=processor,
        inputs=with_image_transforms(splits, data_args, processor.image_processor),
        references={role: list(split[data_args.text_column]) for role, split in splits.items()},
        ids={role: line_ids(split, data_args.id_column) for role, split in splits.items()},
        truncated=truncated,
        skipped=skipped,
        collator=collator,
        corrections=corrections,
    )


def load_dataset_splits(data_args, cache_dir: str | None) -> DatasetDict:
    """load_splits, with a dataset that is neither a local folder nor on the Hub named as such
    (datasets reports only the failed Hub lookup)."""
    path = data_args.dataset_name
    try:
        return load_splits(data_args, cache_dir)
    except (FileNotFoundError, ConnectionError) as error:  # DatasetNotFoundError is a FileNotFoundError
        where = "" if os.path.exists(path) else f" no such local folder ({os.path.abspath(path)}), and as a Hub dataset:"
        raise SystemExit(f"dataset_name {path}:{where} {error}") from None
    except Exception as error:  # a damaged dataset_dict.json or arrow file: datasets and pyarrow raise many types
        raise BadInput(f"dataset_name {path}: cannot load it ({type(error).__name__}: {one_line(error)[:300]}); save "
                       "it again (save_to_disk, or data_scripts/prepare_iam.py) or give another dataset_name") from None


def start_run(model_args, data_args, training_args, marker: str = TRAINER_MARKER, seed=transformers.set_seed):
    """Both loops' start, in this order: output_dir claimed (only a run of the same recipe
    resumes), the checkpoint to resume from (complete ones only: `marker` is written last),
    seeded, model and data prepared, the preflight checks run. Returns the run, the
    checkpoint, and the preflight report when only the preflight was asked for."""
    claim_output_dir(model_args, data_args, training_args)
    checkpoint = find_checkpoint(training_args, marker)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    seed(training_args.seed)
    run = prepare_run(model_args, data_args, training_args)
    if data_args.preflight_only and run.corrections:
        # The checks below see the corrected model: say what the checkpoint itself had.
        print("The checkpoint as saved had settings the run corrected before the checks:")
        print("\n".join(f"- {change}" for change in run.corrections))
    report = run_preflight(run, model_args, data_args, training_args)
    if report is not None:
        report["checkpoint_corrections"] = run.corrections
    return run, checkpoint, report
