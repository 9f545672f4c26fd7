"""Which checkpoint to resume from: the last COMPLETE `checkpoint-N` of an output folder.

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
"""

import json
import logging
import os
import re
import shutil

logger = logging.getLogger("trocr_recipe")

TRAINER_MARKER = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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
