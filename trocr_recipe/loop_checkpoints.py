"""Checkpoints of the plain loop (run_trocr_no_trainer.py): saved with the optimizer, the
random states and where training stands, loadable by `from_pretrained`, and resumed exactly
where a run stopped. Nothing here imports the Trainer."""

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import load
from transformers.trainer_utils import rotate_checkpoints

from .checkpoints import load_checkpoint_weights

LOOP_STATE = "loop_state.json"  # TrainState inside each checkpoint
COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint without it is incomplete


@dataclass
class TrainState:
    """Where training stands; loop_state.json in each checkpoint (Trainer: trainer_state.json)."""

    global_step: int = 0
    epoch: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None  # Trainer: best_model_checkpoint
    patience_counter: int = 0
    scheduler: dict | None = None  # the scheduler's state_dict


class Resume:
    """Where a run starts: at step 0, or where `checkpoint` stopped, with the model, optimizer,
    scheduler and random states of that checkpoint loaded into the prepared objects."""

    def __init__(self, accelerator, training_args, checkpoint, scheduler, steps_per_epoch: int):
        self.accelerator, self.checkpoint, self.state = accelerator, checkpoint, TrainState()
        self.epoch = self.skip = 0  # the epoch it starts in, and the batches of it already trained
        self.rng_pending = False
        if not checkpoint:
            return
        accelerator.load_state(checkpoint)  # model (load hook), optimizer, sampler
        saved = json.loads(Path(checkpoint, LOOP_STATE).read_text(encoding="utf-8"))
        self.state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
        scheduler.load_state_dict(self.state.scheduler)
        if self.state.best_checkpoint and not os.path.isdir(self.state.best_checkpoint):
            self.state.best_checkpoint = None
        self.epoch = self.state.global_step // steps_per_epoch
        if not training_args.ignore_data_skip:
            self.skip = (self.state.global_step % steps_per_epoch) * training_args.gradient_accumulation_steps

    def batches(self, train_loader, epoch: int):
        """An iterator over the epoch's batches, past those a resumed run already trained."""
        loader = train_loader
        if epoch == self.epoch and self.checkpoint:
            if self.skip:
                loader = self.accelerator.skip_first_batches(train_loader, self.skip)
                self.rng_pending = True  # restored once the skipped batches are drawn
            else:
                restore_rng(self.checkpoint, self.accelerator.process_index)
        # The sampler's order depends on seed + epoch. The prepared loader reaches its sampler
        # however it is sharded; a skipping loader built from it needs the epoch too.
        train_loader.set_epoch(epoch)
        if loader is not train_loader:
            loader.set_epoch(epoch)
        return iter(loader)

    def sync_random_states(self) -> None:
        """Trainer: after skipping to the resumed position, the random states are those of the
        checkpoint (the skipped batches were drawn from them). Dropout then continues exactly as
        in a run never stopped; the augmentation does not: the loader reads one batch ahead, so
        the checkpoint's `random` state already includes the augmentation of the next batch."""
        if self.rng_pending:
            restore_rng(self.checkpoint, self.accelerator.process_index)
            self.rng_pending = False


def register_checkpoint_hooks(accelerator, model) -> None:
    """accelerator.save_state / load_state write and read the model through save_pretrained and
    from_pretrained, so that every checkpoint loads with from_pretrained."""

    def save_model_hook(models, weights, output_dir):
        # Clearing `weights` stops accelerate writing its raw state dict as well.
        accelerator.unwrap_model(model).save_pretrained(
            output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
        weights.clear()

    def load_model_hook(models, input_dir):
        # transformers 5 saves ViT weights under legacy names and renames them only inside
        # from_pretrained: load through it (as trocr_recipe.trainer does for the Trainer).
        load_checkpoint_weights(accelerator.unwrap_model(model), input_dir)
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def restore_rng(checkpoint: str, process_index: int) -> None:
    """The random states accelerator.save_state wrote (python, numpy, torch, cuda), read with
    weights_only=True (numpy's arrays allowed, as accelerate reads them): a checkpoint runs no code."""
    states = load(os.path.join(checkpoint, f"random_states_{process_index}.pkl"))
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def save_checkpoint(accelerator, training_args, processor, state: TrainState, scheduler) -> str:
    """checkpoint-N: model, optimizer and random states, processor, loop_state.json with the
    scheduler's state, and last the COMPLETE marker; then old checkpoints rotated out (the best
    kept). The scheduler is not registered with accelerate: it would read it back with
    torch.load(weights_only=False), which runs any code a crafted checkpoint holds."""
    state.scheduler = scheduler.state_dict()
    folder = os.path.join(training_args.output_dir, f"checkpoint-{state.global_step}")
    if accelerator.is_main_process and os.path.isdir(folder):
        shutil.rmtree(folder)  # a stale or incomplete one from an earlier run
    accelerator.wait_for_everyone()
    accelerator.save_state(folder)
    accelerator.wait_for_everyone()
    best_folder = os.path.join(training_args.output_dir, f"checkpoint-{state.best_step}")
    if state.best_step is not None and os.path.isdir(best_folder):
        state.best_checkpoint = best_folder  # Trainer: best_model_checkpoint, on every process
    if accelerator.is_main_process:
        processor.save_pretrained(folder)
        Path(folder, LOOP_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        Path(folder, COMPLETE).write_text(json.dumps({"step": state.global_step}) + "\n", encoding="utf-8")
        rotate_checkpoints(training_args.output_dir, training_args.save_total_limit, state.best_checkpoint)
    accelerator.wait_for_everyone()
    return folder


def load_best_checkpoint(accelerator, training_args, model, state: TrainState) -> bool:
    """The best checkpoint's weights into `model` (Trainer: load_best_model_at_end), the others
    removed when save_total_limit is 1. True when it was loaded."""
    if not (training_args.load_best_model_at_end and state.best_checkpoint):
        return False
    load_checkpoint_weights(accelerator.unwrap_model(model), state.best_checkpoint)
    if accelerator.is_main_process and training_args.save_total_limit == 1:
        for folder in Path(training_args.output_dir).glob("checkpoint-*"):
            if folder.is_dir() and not os.path.samefile(folder, state.best_checkpoint):
                shutil.rmtree(folder, ignore_errors=True)
    return True
