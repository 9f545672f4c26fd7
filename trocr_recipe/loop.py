"""The machinery of the plain training loop (run_trocr_no_trainer.py), done the way the Trainer
does it so that both runs match step for step: accelerator, data loaders, optimizer and
schedule, the count of steps and epochs, when to evaluate and save, checkpoints that resume
exactly where a run stopped, and the logs. The comments marked "Trainer:" name what the
Trainer does that a hand-written loop easily misses."""

from . import recipe_only  # noqa: F401, I001  (first: an older transformers is named at import)

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, load
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import Seq2SeqTrainer, get_scheduler, set_seed
from transformers.trainer_pt_utils import get_parameter_names
from transformers.trainer_utils import align_special_tokens, enable_full_determinism, rotate_checkpoints, seed_worker

from .outputs import JsonlLog, LossLog
from .trainer import load_checkpoint_weights, restore_starting_model

logger = logging.getLogger("trocr_recipe")

EVAL_LOG = "eval_log.jsonl"
LOOP_STATE = "loop_state.json"  # TrainState inside each checkpoint
COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint without it is incomplete


# --------------------------------------------------------------------------------------
# Arguments.
# --------------------------------------------------------------------------------------
def check_supported(training_args) -> None:
    """Arguments the plain loop does not implement stop the run, instead of being ignored."""
    unsupported = {
        "deepspeed": training_args.deepspeed,
        "fsdp": training_args.fsdp,
        "activation_checkpointing": training_args.activation_checkpointing,
        "torch_compile": training_args.torch_compile,
        "label_smoothing_factor": training_args.label_smoothing_factor,
    }
    named = [name for name, value in unsupported.items() if value]
    if training_args.train_sampling_strategy not in ("random", "sequential"):
        named.append(f"train_sampling_strategy={training_args.train_sampling_strategy}")
    if str(training_args.lr_scheduler_type).split(".")[-1].lower() in ("reduce_lr_on_plateau", "greedy"):
        named.append(f"lr_scheduler_type={training_args.lr_scheduler_type}")
    if named:
        raise SystemExit(f"run_trocr_no_trainer.py does not implement: {', '.join(named)} (use run_trocr.py)")
    if best_metric_name(training_args) not in ("cer", "wer"):
        raise SystemExit(
            f"metric_for_best_model={training_args.metric_for_best_model}: the custom loop keeps the best "
            "checkpoint by validation cer or wer"
        )


def best_metric_name(training_args) -> str:
    # Trainer leaves best_metric unset when metric_for_best_model is None; here CER is the default.
    return (training_args.metric_for_best_model or "cer").removeprefix("eval_")


def is_better(training_args, value: float, than: float) -> bool:
    return bool(np.greater(value, than) if training_args.greater_is_better else np.less(value, than))


def seed_function(training_args):
    """The Trainer's: enable_full_determinism (deterministic kernels too) or set_seed."""
    return enable_full_determinism if training_args.full_determinism else set_seed


def configure_like_trainer(model, training_args) -> None:
    """What Trainer.__init__ does once the model is loaded: seeds again, before anything draws
    from the random generators; the generation config of the arguments; use_cache."""
    seed_function(training_args)(training_args.seed)
    if training_args.generation_config is not None:
        model.generation_config = Seq2SeqTrainer.load_generation_config(training_args.generation_config)
    model.config.use_cache = training_args.use_cache


# --------------------------------------------------------------------------------------
# Accelerator and data loaders, built as the Trainer builds them.
# --------------------------------------------------------------------------------------
def make_accelerator(training_args) -> Accelerator:
    """Mixed precision, data loader sharding and seeding, TensorBoard, as the Trainer's accelerator."""
    accelerator_config = training_args.accelerator_config.to_dict()
    dataloader_config = DataLoaderConfiguration(
        split_batches=accelerator_config["split_batches"],
        dispatch_batches=accelerator_config["dispatch_batches"],
        even_batches=accelerator_config["even_batches"],
        use_seedable_sampler=accelerator_config["use_seedable_sampler"],
        data_seed=training_args.data_seed,
        non_blocking=accelerator_config["non_blocking"],
    )
    accelerator = Accelerator(
        mixed_precision=training_args.mixed_precision,
        dataloader_config=dataloader_config,
        # Gradient accumulation is done by the loop (Progress.optimizer_steps), not by accelerate.
        gradient_accumulation_steps=1,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if wants_tensorboard(training_args) else None,
        project_config=ProjectConfiguration(project_dir=training_args.output_dir, logging_dir=training_args.output_dir),
        cpu=training_args.use_cpu,
    )
    if accelerator.is_main_process:
        os.makedirs(training_args.output_dir, exist_ok=True)
    return accelerator


def wants_tensorboard(training_args) -> bool:
    report_to = training_args.report_to or []
    report_to = [report_to] if isinstance(report_to, str) else report_to
    return "tensorboard" in report_to or "all" in report_to


def before_training(accelerator, training_args, model, processor, results: dict) -> None:
    """What Trainer.train does before its first step: the tokenizer's special tokens onto config
    and generation config; TensorBoard started, with the baseline as step 0 of eval/cer."""
    align_special_tokens(accelerator.unwrap_model(model), processor)
    if not wants_tensorboard(training_args):
        return
    from transformers.integrations.integration_utils import default_logdir

    hparams = {k: v for k, v in training_args.to_dict().items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(os.environ.get("TENSORBOARD_LOGGING_DIR") or default_logdir(), config=hparams)
    if "baseline_cer" in results:
        accelerator.log({"eval/cer": results["baseline_cer"], "eval/wer": results["baseline_wer"]}, step=0)


def make_dataloaders(accelerator, training_args, inputs, collator) -> dict:
    """Prepared loaders per split: train first, so that its sampler is the one accelerate's
    state files name."""
    loaders = {}
    if training_args.do_train:
        loaders["train"] = make_dataloader(accelerator, training_args, inputs["train"], collator, train=True)
    for role in ("validation", "test"):
        loaders[role] = make_dataloader(accelerator, training_args, inputs[role], collator, train=False)
    return loaders


def make_dataloader(accelerator, training_args, dataset, collator, train: bool):
    args = training_args
    params = dict(
        batch_size=args.train_batch_size if train else args.eval_batch_size,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        prefetch_factor=args.dataloader_prefetch_factor,
        in_order=args.dataloader_in_order,
        drop_last=args.dataloader_drop_last,
    )
    if train:
        # Trainer: a plain RandomSampler, which accelerate's `prepare` replaces by its
        # SeedableRandomSampler (use_seedable_sampler, seeded by data_seed or the seed) and
        # whose order `set_epoch` changes per epoch. Workers reseed `random`, numpy and torch
        # with seed_worker: the augmentation draws from the global `random`.
        sampler_type = RandomSampler if args.train_sampling_strategy == "random" else SequentialSampler
        params["sampler"] = sampler_type(dataset)
        params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)
    elif args.world_size <= 1:
        params["sampler"] = SequentialSampler(dataset)
    # Note: every pass over a torch DataLoader draws its base seed from the global torch RNG,
    # so each evaluation consumes one draw, as the Trainer's evaluations do.
    return accelerator.prepare(DataLoader(dataset, **params))


# --------------------------------------------------------------------------------------
# Optimizer and scheduler, as Trainer.create_optimizer / create_scheduler.
# --------------------------------------------------------------------------------------
def decay_parameter_names(model) -> list[str]:
    # Trainer.get_decay_parameter_names: no weight decay on LayerNorm modules and on any
    # parameter whose name says bias or norm.
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return get_parameter_names(model, [torch.nn.LayerNorm], forbidden)


def create_optimizer(model, training_args):
    """The Trainer's optimizer over the parameters of the unwrapped model (prepare it after)."""
    decay = set(decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decay and p.requires_grad], "weight_decay": training_args.weight_decay},
        {"params": [p for n, p in named if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    if optim in ("adamw_torch", "adamw_torch_fused"):
        # Trainer default on torch >= 2.8 is the fused AdamW kernel; same kernel, same numbers.
        return torch.optim.AdamW(
            groups,
            lr=training_args.learning_rate,
            betas=(training_args.adam_beta1, training_args.adam_beta2),
            eps=training_args.adam_epsilon,
            fused=optim == "adamw_torch_fused",
        )
    # Any other `optim`: the class and keyword arguments the Trainer would use.
    optimizer_cls, optimizer_kwargs = Seq2SeqTrainer.get_optimizer_cls_and_kwargs(training_args, model)
    return optimizer_cls(groups, **optimizer_kwargs)


def create_scheduler(training_args, optimizer, max_steps: int):
    """Trainer: stepped once per optimizer step and NOT passed through accelerator.prepare,
    whose wrapper would step it once per process. Its state is saved in loop_state.json, not
    through register_for_checkpointing: accelerate reads registered objects back with
    torch.load(weights_only=False), which runs any code a crafted checkpoint holds."""
    return get_scheduler(
        training_args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=training_args.get_warmup_steps(max_steps),
        num_training_steps=max_steps,
        scheduler_specific_kwargs=training_args.lr_scheduler_kwargs,
    )


# --------------------------------------------------------------------------------------
# How long to train, and when to evaluate and save.
# --------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """Steps and epochs as Trainer.set_initial_training_values counts them: an epoch is
    `micro_batches` batches, ceil(micro_batches / accumulation) optimizer steps; the last
    step of an epoch accumulates what is left. Evaluations and saves as DefaultFlowCallback."""

    micro_batches: int
    accumulation: int
    updates_per_epoch: int
    max_steps: int
    num_epochs: int
    eval_strategy: str
    eval_steps: int | None
    eval_delay: float
    save_strategy: str
    save_steps: int | None

    @classmethod
    def from_args(cls, args, micro_batches: int) -> "Schedule":
        accumulation = args.gradient_accumulation_steps
        updates_per_epoch = max(micro_batches // accumulation + int(micro_batches % accumulation > 0), 1)
        if args.max_steps > 0:
            max_steps = args.max_steps
            num_epochs = max_steps // updates_per_epoch + int(max_steps % updates_per_epoch > 0)
        else:
            max_steps = math.ceil(args.num_train_epochs * updates_per_epoch)
            num_epochs = math.ceil(args.num_train_epochs)

        def absolute(steps):  # eval_steps / save_steps below 1 are a fraction of max_steps
            return math.ceil(max_steps * steps) if steps is not None and steps < 1 else steps

        return cls(micro_batches, accumulation, updates_per_epoch, max_steps, num_epochs,
                   str(args.eval_strategy.value), absolute(args.eval_steps), args.eval_delay,
                   str(args.save_strategy.value), absolute(args.save_steps))

    def micro_batches_of(self, update: int) -> int:
        if update == self.updates_per_epoch - 1:
            return self.micro_batches % self.accumulation or self.accumulation
        return self.accumulation

    def due_after_step(self, global_step: int) -> tuple[bool, bool]:
        """(evaluate, save) after an optimizer step: every eval_steps / save_steps, and at the
        last step."""
        last = global_step >= self.max_steps
        evaluate = self.eval_strategy == "steps" and self.eval_delay <= global_step and (
            global_step % self.eval_steps == 0 or last
        )
        save = self.save_strategy == "steps" and ((self.save_steps > 0 and global_step % self.save_steps == 0) or last)
        return evaluate, save

    def due_at_epoch_end(self, epoch: float) -> tuple[bool, bool]:
        return self.eval_strategy == "epoch" and self.eval_delay <= epoch, self.save_strategy == "epoch"


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

    def record(self, value: float, training_args, patience: int | None) -> bool:
        """A validation score at this step; True if it is the best so far."""
        improved = self.best_metric is None or is_better(training_args, value, self.best_metric)
        # Trainer's EarlyStoppingCallback looks before the best metric is updated.
        if patience:
            self.patience_counter = 0 if improved else self.patience_counter + 1
        if improved:
            self.best_metric, self.best_step = value, self.global_step
        return improved


@dataclass
class Step:
    """One optimizer step's micro-batches and the label tokens of them all, on every process."""

    micro_batches: list[dict]
    num_items: torch.Tensor
    epoch: float  # the epoch reached once this step is done, as the Trainer counts it


# --------------------------------------------------------------------------------------
# A training run's progress: steps, resume, logs, evaluations recorded, checkpoints.
# --------------------------------------------------------------------------------------
class Progress:
    """The bookkeeping of one training run: its schedule, learning-rate scheduler and state,
    where it resumes (`checkpoint`), its logs and checkpoints."""

    def __init__(self, accelerator, training_args, optimizer, train_loader, processor, checkpoint=None, patience=None):
        self.accelerator, self.args, self.processor = accelerator, training_args, processor
        self.train_loader, self.checkpoint, self.patience = train_loader, checkpoint, patience
        self.schedule = Schedule.from_args(training_args, len(train_loader))
        self.scheduler = create_scheduler(training_args, optimizer, self.schedule.max_steps)
        self.state = TrainState()
        self.first_epoch = self.skip = 0  # the epoch it starts in, and the batches of it already trained
        if checkpoint:
            self.resume(checkpoint)
        self.loss_log, self.eval_log = LossLog(training_args.output_dir), JsonlLog(training_args.output_dir, EVAL_LOG)
        if accelerator.is_main_process:
            self.loss_log.start(self.state.global_step)
            self.eval_log.start(self.state.global_step)
        self.first_step, self.total_loss = self.state.global_step, 0.0
        self.start_time = time.time()
        schedule = self.schedule
        logger.info("***** Running training (custom loop) *****")
        logger.info("  Num examples = %d, epochs = %d, optimizer steps = %d", len(train_loader.dataset),
                    schedule.num_epochs, schedule.max_steps)
        logger.info("  Batch size per device = %d, accumulation = %d, processes = %d",
                    training_args.train_batch_size, schedule.accumulation, accelerator.num_processes)

    def resume(self, checkpoint: str) -> None:
        """Model, optimizer and random states from `checkpoint`, then the state and scheduler."""
        self.accelerator.load_state(checkpoint)
        saved = json.loads(Path(checkpoint, LOOP_STATE).read_text(encoding="utf-8"))
        self.state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
        self.scheduler.load_state_dict(self.state.scheduler)
        if self.state.best_checkpoint and not os.path.isdir(self.state.best_checkpoint):
            self.state.best_checkpoint = None
        self.first_epoch = self.state.global_step // self.schedule.updates_per_epoch
        if not self.args.ignore_data_skip:
            self.skip = (self.state.global_step % self.schedule.updates_per_epoch) * self.schedule.accumulation

    def epochs(self) -> range:
        """The epochs left to train (none when resumed at max_steps)."""
        if self.state.global_step >= self.schedule.max_steps:
            logger.info("Resumed at step %d of max_steps=%d: nothing left to train", self.state.global_step,
                        self.schedule.max_steps)
            return range(0)
        return range(self.first_epoch, self.schedule.num_epochs)

    def optimizer_steps(self, epoch: int):
        """The optimizer steps of `epoch`, or of its rest when the run resumes in it."""
        accelerator, schedule, loader = self.accelerator, self.schedule, self.train_loader
        first_update, done, rng_to_sync = 0, 0, False
        if epoch == self.first_epoch and self.checkpoint:
            if self.skip > 0:
                loader = accelerator.skip_first_batches(self.train_loader, self.skip)
                first_update, done, rng_to_sync = self.skip // schedule.accumulation, self.skip, True
            else:
                restore_rng(self.checkpoint, accelerator.process_index)
        # The sampler's order depends on seed + epoch. The prepared loader reaches its sampler
        # however it is sharded; a skipping loader built from it needs the epoch too.
        self.train_loader.set_epoch(epoch)
        if loader is not self.train_loader:
            loader.set_epoch(epoch)
        batches = iter(loader)
        for update in range(first_update, schedule.updates_per_epoch):
            # Trainer: all the micro-batches of an optimizer step are fetched first, to count
            # the label tokens of the whole step (all micro-batches, all processes).
            micro_batches = list(islice(batches, schedule.micro_batches_of(update)))
            if not micro_batches:
                return
            num_items = self.count_label_tokens(micro_batches)
            if rng_to_sync:
                # Trainer: after skipping to the resumed position, the random states are
                # those of the checkpoint (the skipped batches were drawn from them). Dropout
                # then continues exactly as in a run never stopped; the augmentation does not:
                # the loader reads one batch ahead, so the checkpoint's `random` state already
                # includes the augmentation of the first batch after it.
                restore_rng(self.checkpoint, accelerator.process_index)
                rng_to_sync = False
            done += len(micro_batches)
            yield Step(micro_batches, num_items, epoch + done / schedule.micro_batches)

    def count_label_tokens(self, micro_batches) -> torch.Tensor:
        accelerator = self.accelerator
        num_items = sum(batch["labels"].ne(-100).sum() for batch in micro_batches)
        if self.args.average_tokens_across_devices and accelerator.num_processes > 1:
            num_items = accelerator.gather(num_items.to(accelerator.device)).sum()
        return num_items.to(accelerator.device)

    def log_step(self, loss: float, learning_rate: float, grad_norm) -> None:
        """The step's loss and learning rate: loss_log.jsonl (main process) and TensorBoard."""
        state = self.state
        self.total_loss += loss
        if self.accelerator.is_main_process:
            self.loss_log.append(state.global_step, loss, learning_rate, state.epoch)
        logs = {"train/loss": loss, "train/learning_rate": learning_rate, "train/epoch": state.epoch}
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        self.accelerator.log(logs, step=state.global_step)

    def record_evaluation(self, scores: dict) -> bool:
        """Validation scores at this step: logged (eval_log.jsonl, TensorBoard) and kept as the
        best and for early stopping. True if they are the best so far."""
        step = self.state.global_step
        logger.info("Step %d: validation CER %.2f WER %.2f", step, scores["eval_cer"], scores["eval_wer"])
        self.accelerator.log({"eval/cer": scores["eval_cer"], "eval/wer": scores["eval_wer"]}, step=step)
        if self.accelerator.is_main_process:
            self.eval_log.write({"step": step, **scores})
        return self.state.record(scores[f"eval_{best_metric_name(self.args)}"], self.args, self.patience)

    def should_stop_early(self) -> bool:
        """Trainer's EarlyStoppingCallback: `patience` evaluations in a row without a new best."""
        if self.patience and self.state.patience_counter >= self.patience:
            logger.info("Early stopping: no improvement in %d evaluations", self.state.patience_counter)
            return True
        return False

    def save_checkpoint(self) -> str:
        self.state.scheduler = self.scheduler.state_dict()
        return save_checkpoint(self.accelerator, self.args, self.processor, self.state)

    def results(self) -> dict:
        """train_loss (Trainer: the mean of the logged per-step losses of this call), runtime, epoch, step."""
        steps_done = self.state.global_step - self.first_step
        return {
            "train_loss": self.total_loss / max(steps_done, 0.001),
            "train_runtime": round(time.time() - self.start_time, 4),
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
        }

    def load_final_model(self, model, model_args, baseline: float | None) -> bool:
        """The best checkpoint's weights (Trainer: load_best_model_at_end), or the starting
        model's when no evaluation beat its `baseline` score: then True."""
        self.load_best_model(model)
        metric, best = best_metric_name(self.args), self.state.best_metric
        if baseline is None or (best is not None and is_better(self.args, best, baseline)):
            return False
        restore_starting_model(self.accelerator.unwrap_model(model), model_args, metric, best, baseline)
        return True

    def load_best_model(self, model) -> None:
        args, state = self.args, self.state
        if not (args.load_best_model_at_end and state.best_checkpoint):
            return
        logger.info("Loading the best checkpoint %s (validation %s %.4f)", state.best_checkpoint,
                    best_metric_name(args), state.best_metric)
        load_checkpoint_weights(self.accelerator.unwrap_model(model), state.best_checkpoint)
        if self.accelerator.is_main_process and args.save_total_limit == 1:
            for folder in Path(args.output_dir).glob("checkpoint-*"):
                if folder.is_dir() and not os.path.samefile(folder, state.best_checkpoint):
                    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Checkpoints: accelerator.save_state, with the model written by save_pretrained and the
# processor beside it, so that each checkpoint loads with from_pretrained.
# --------------------------------------------------------------------------------------
def register_checkpoint_hooks(accelerator, model) -> None:
    def save_model_hook(models, weights, output_dir):
        # The model goes through save_pretrained (loadable by from_pretrained) instead of
        # accelerate's raw state dict; popping `weights` stops accelerate writing it again.
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


def save_checkpoint(accelerator, training_args, processor, state: TrainState) -> str:
    """checkpoint-N: model, optimizer and random states, processor, loop_state.json, and last
    the COMPLETE marker; then old checkpoints rotated out (the best one kept)."""
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
