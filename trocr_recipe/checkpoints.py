"""Which checkpoint to resume from: the last COMPLETE `checkpoint-N` of an output folder;
and how a checkpoint's weights load into a model in place (`load_checkpoint_weights`).

A run killed while saving leaves a `checkpoint-N` folder with only some of its files.
Trainer's `get_last_checkpoint` looks at folder names only and would resume from it. A
checkpoint is complete here when the file its loop writes LAST is there and parses as
JSON, naming the folder's step:

- Seq2SeqTrainer (`run_trocr.py`): `trainer_state.json`. `Trainer._save_checkpoint` writes
  the model (with processor and training_args.bin), optimizer, scheduler and RNG states,
  then `trainer_state.json`; after it come only the Hub push and the rotation of old
  checkpoints. (OcrTrainer waits for every process's RNG file before it.)
- run_trocr_no_trainer.py: `checkpoint_complete.json`, written after every process saved.

Incomplete folders are removed (on the process that saves): rotation by modification time
could otherwise keep one over a good checkpoint, and a later save into the same name
would mix its files with the stale ones.

A run resumes only a run of the same recipe: `claim_output_dir` records the arguments in
`<output_dir>/run_recipe.json` and, when the folder already holds a run, compares them with
the recorded ones first.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

from .errors import BadInput, atomic_write_text, read_json_object
from .modeling import pretrained
from .outputs import RESULTS, read_results

logger = logging.getLogger("trocr_recipe")

TRAINER_MARKER = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
RUN_RECIPE = "run_recipe.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# What a resumed run must share with the run that wrote the folder: the model, the training
# lines and what shapes an update. How long to train (max_steps, num_train_epochs) may
# change, to extend a run, and so may evaluation, saving, logging and hardware.
RESUME_KEYS = (
    "model_name_or_path", "processor_name_or_path", "model_revision", "trainable", "method",
    "dataset_name", "dataset_config_name", "image_column", "text_column", "train_split", "max_train_samples",
    "max_target_length", "augment", "on_undecodable_image", "on_bad_image_size", "on_empty_text",
    "on_unknown_tokens", "on_label_too_long", "max_image_side", "max_aspect_ratio",
    "seed", "data_seed", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "label_smoothing_factor", "per_device_train_batch_size", "gradient_accumulation_steps",
    "train_sampling_strategy", "fp16", "bf16",
)


def load_checkpoint_weights(model, checkpoint: str, **from_pretrained_kwargs) -> None:
    """Load a saved checkpoint's weights into `model` in place, strictly.

    transformers 5 saves the ViT encoder layers' weights under their legacy names and renames
    them only inside `from_pretrained`; Trainer's resume and load-best paths call
    `load_state_dict` on the raw file, which leaves the encoder layers untouched (each of
    their keys 'missing' and 'unexpected'; the embeddings and final layernorm load).
    Going through `from_pretrained` applies the renaming."""
    fix = "remove that checkpoint folder to resume from an earlier one, or start afresh with --overwrite_output_dir"
    loaded = pretrained(type(model), checkpoint, "checkpoint", fix=fix, **from_pretrained_kwargs)
    model.load_state_dict(loaded.state_dict(), strict=True)


def checkpoint_step(path) -> int | None:
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete(path, marker: str = TRAINER_MARKER) -> bool:
    """`marker` is in `path`, is a JSON object, and its `global_step` (Trainer) or `step`
    (custom loop) is the folder's step."""
    try:
        with open(os.path.join(path, marker), encoding="utf-8") as stream:
            content = json.load(stream)
    except (OSError, ValueError):
        return False
    if not isinstance(content, dict):
        return False
    step = content.get("global_step", content.get("step"))
    return step is None or checkpoint_step(path) is None or step == checkpoint_step(path)


def last_complete_checkpoint(output_dir, marker: str = TRAINER_MARKER, remove_incomplete: bool = False) -> str | None:
    """The complete `checkpoint-N` of `output_dir` with the largest N, or None. Every
    incomplete one met on the way (a larger N) is logged as skipped, and removed if asked."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete(path, marker):
            return path
        logger.warning(
            "Skipping %s: incomplete checkpoint (no valid %s, the run stopped while saving it)%s",
            path, marker, "; removing it" if remove_incomplete else "",
        )
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def find_checkpoint(training_args, marker: str = TRAINER_MARKER) -> str | None:
    """Where a run resumes: `--resume_from_checkpoint DIR` (which must be complete), else the
    last complete checkpoint in output_dir when training, else nowhere."""
    path = training_args.resume_from_checkpoint
    if path:
        if not is_complete(path, marker):
            raise SystemExit(f"{path}: not a complete checkpoint (no valid {marker})")
        return path
    if training_args.do_train:
        return last_complete_checkpoint(training_args.output_dir, marker, remove_incomplete=training_args.should_save)
    return None


def run_arguments(model_args, data_args, training_args) -> dict:
    """Every argument of the run, as JSON values (tokens masked by to_dict)."""
    arguments = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **training_args.to_dict()}
    return json.loads(json.dumps(arguments, default=str))


def holds_run(output_dir: Path) -> bool:
    return output_dir.is_dir() and (any(output_dir.glob("checkpoint-*")) or (output_dir / RESULTS).exists())


def check_output_dir(model_args, data_args, training_args) -> None:
    """BadInput for an output_dir that is empty, a file, the starting model's or the dataset's
    folder or inside one (the run would write over them), or that holds the starting model
    of a training run (checkpoint rotation and overwrite_output_dir remove folders there)."""
    name = training_args.output_dir
    if not name or not str(name).strip():
        raise BadInput("output_dir is empty: give the folder the run writes to (it would write into the current one)")
    output_dir = Path(name).expanduser().resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise BadInput(f"output_dir {name}: a file, not a folder; give another output_dir")
    for key, value in (("model_name_or_path", model_args.model_name_or_path),
                       ("processor_name_or_path", model_args.processor_name_or_path),
                       ("dataset_name", data_args.dataset_name)):
        if not value or not os.path.isdir(value):
            continue
        source = Path(value).expanduser().resolve()
        if output_dir == source or source in output_dir.parents:
            raise BadInput(f"output_dir {name} is {'' if output_dir == source else 'inside '}the {key} folder "
                           f"{value}: the run would write over it; give another output_dir")
        if output_dir in source.parents and training_args.do_train:
            raise BadInput(f"output_dir {name} holds the {key} folder {value}: training would rotate or remove "
                           "folders there; give another output_dir, or move the starting model out of it")


def read_run_recipe(path: Path) -> dict:
    """The arguments recorded by the run in a folder; a damaged record stops the run (without
    it, the check that the run resumed is of the same recipe would be skipped)."""
    fix = "it records the run's arguments: restore it, remove it to resume unchecked, or start afresh with " \
          "--overwrite_output_dir"
    recorded = read_json_object(path, fix)
    missing = [key for key in ("model_name_or_path", "dataset_name") if key not in recorded]
    if missing:
        raise BadInput(f"{path}: records no {' and no '.join(missing)}, not the arguments of a run; {fix}")
    return recorded


def claim_output_dir(model_args, data_args, training_args) -> None:
    """Stops when output_dir is no place to write (check_output_dir) or holds a run made with
    other values of RESUME_KEYS; with overwrite_output_dir, removes that run's checkpoints and
    results instead, so that nothing of it is resumed or merged. Then records this run's
    arguments in run_recipe.json."""
    check_output_dir(model_args, data_args, training_args)
    output_dir = Path(training_args.output_dir)
    arguments = run_arguments(model_args, data_args, training_args)
    with training_args.main_process_first(desc="output_dir check"):
        if holds_run(output_dir) and data_args.overwrite_output_dir:
            if training_args.should_save:
                logger.warning("overwrite_output_dir: removing the checkpoints and results of the run in %s", output_dir)
                for folder in output_dir.glob("checkpoint-*"):
                    shutil.rmtree(folder, ignore_errors=True)
                (output_dir / RESULTS).unlink(missing_ok=True)
        elif holds_run(output_dir):
            read_results(output_dir)  # found broken now, not after training
            recorded_path = output_dir / RUN_RECIPE
            if not recorded_path.exists():
                logger.warning("%s holds a run without %s: it cannot be checked to be of this recipe", output_dir, RUN_RECIPE)
            else:
                recorded = read_run_recipe(recorded_path)
                changed = [
                    f"{key} {json.dumps(recorded[key])} -> {json.dumps(arguments.get(key))}"
                    for key in RESUME_KEYS
                    if key in recorded and recorded[key] != arguments.get(key)
                ]
                if changed:
                    raise SystemExit(
                        f"{output_dir} holds a run of another recipe ({'; '.join(changed)}, see {recorded_path}): "
                        "use another output_dir, or --overwrite_output_dir to start afresh there (its checkpoints "
                        "and all_results.json are removed)"
                    )
        if training_args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output_dir / RUN_RECIPE, json.dumps(arguments, indent=2, sort_keys=True) + "\n")
