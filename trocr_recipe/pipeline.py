"""Everything a run needs before its loop starts, the same for both loops: logging, model
and processor with their special tokens, the splits with labels, the generation config,
the on-the-fly image transforms and the collator."""

import logging
import sys
from dataclasses import dataclass

import datasets
import transformers
from datasets import DatasetDict

from .data import OcrCollator, line_ids, load_splits, longest_label, tokenize_splits, with_image_transforms
from .modeling import configure_generation, load_model, load_processor

logger = logging.getLogger("trocr_recipe")


@dataclass
class RunInputs:
    model: transformers.VisionEncoderDecoderModel
    processor: transformers.TrOCRProcessor
    inputs: DatasetDict  # train / validation / test, images transformed on the fly
    references: dict[str, list[str]]  # raw ground truth per split, what CER is scored on
    ids: dict[str, list[str]]
    truncated: dict[str, int]  # labels cut to max_target_length, per split
    collator: OcrCollator


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
    processor = load_processor(model_args)
    with training_args.main_process_first(desc="dataset loading and label tokenization"):
        splits = load_splits(data_args, model_args.cache_dir)
        truncated = tokenize_splits(splits, processor.tokenizer, data_args)
    for role, count in truncated.items():
        if count:
            logger.warning(
                "%d %s labels longer than max_target_length=%d were truncated", count, role, data_args.max_target_length
            )
    model = load_model(model_args, processor.tokenizer)
    configure_generation(model, training_args, longest_label(splits))
    logger.info("Generation: %s", model.generation_config.to_diff_dict())
    return RunInputs(
        model=model,
        processor=processor,
        inputs=with_image_transforms(splits, data_args, processor.image_processor),
        references={role: list(split[data_args.text_column]) for role, split in splits.items()},
        ids={role: line_ids(split, data_args.id_column) for role, split in splits.items()},
        truncated=truncated,
        collator=OcrCollator.from_image_processor(processor.image_processor),
    )
