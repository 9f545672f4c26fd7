#!/usr/bin/env python
"""The run of `run_trocr.py` written as a plain training loop on `accelerate`: the "custom
loop" of this project, and the template for a loop of your own.

    accelerate launch run_trocr_no_trainer.py recipes/small.json [--flag value ...]
    python run_trocr_no_trainer.py recipes/tiny.json

It reads the same recipe files and arguments (the `Seq2SeqTrainingArguments` fields are
reused: learning rate, schedule, batch sizes, accumulation, clipping, evaluation, saving,
mixed precision, ...), gets model, processor, data and collator from `trocr_recipe`, and
writes the same outputs as `run_trocr.py` plus `eval_log.jsonl`. Only the loop is its own.

With the same recipe it reproduces the Trainer step for step: on `recipes/tiny.json` in
float32 on a CPU, every per-step loss of `loss_log.jsonl` agrees with `run_trocr.py`'s and
the predictions are identical (tests/test_no_trainer.py). The comments marked
"Trainer:" name what the Trainer does that a hand-written loop easily misses.
"""

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, load
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import Seq2SeqTrainer, get_scheduler, set_seed
from transformers.trainer_pt_utils import get_parameter_names
from transformers.trainer_utils import align_special_tokens, enable_full_determinism, rotate_checkpoints, seed_worker

from trocr_recipe.args import parse_recipe
from trocr_recipe.generation import generate
from trocr_recipe.metrics import corpus_cer, corpus_wer, decode
from trocr_recipe.modeling import token_loss
from trocr_recipe.outputs import LossLog, StepLog, finish_run, write_training_curves
from trocr_recipe.pipeline import RESULT_PREFIX, setup_logging, start_run
from trocr_recipe.trainer import load_checkpoint_weights, restore_starting_model

logger = logging.getLogger("trocr_recipe")

EVAL_LOG = "eval_log.jsonl"
LOOP_STATE = "loop_state.json"  # global step, best metric, ... inside each checkpoint
COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint without it is incomplete


# --------------------------------------------------------------------------------------
# Arguments this loop does not implement: stop early and say so, instead of ignoring them.
# --------------------------------------------------------------------------------------
def check_supported(training_args) -> None:
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


def wants_tensorboard(training_args) -> bool:
    report_to = training_args.report_to or []
    report_to = [report_to] if isinstance(report_to, str) else report_to
    return "tensorboard" in report_to or "all" in report_to


# --------------------------------------------------------------------------------------
# Data loaders, built as the Trainer builds them (same sampler, same worker seeding).
# --------------------------------------------------------------------------------------
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
# Generate-based evaluation: batched, gathered across processes without duplicates,
# scored against the raw reference strings.
# --------------------------------------------------------------------------------------
def generate_predictions(accelerator, model, dataloader, tokenizer, training_args) -> list[str]:
    model.eval()
    generator = accelerator.unwrap_model(model)
    gen_kwargs = {"max_length": training_args.generation_max_length, "num_beams": training_args.generation_num_beams}
    predictions = []
    for batch in dataloader:
        # Batched beam search with what a line's beams share computed once per line
        # (Seq2SeqTrainer generates the same way, see OcrTrainer.prediction_step).
        with torch.no_grad():
            generated = generate(generator, batch["pixel_values"], **gen_kwargs)
        # Lengths differ between processes: pad before gathering; gather_for_metrics drops the
        # samples repeated to even out the last batch.
        generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
        generated = accelerator.gather_for_metrics(generated)
        predictions.extend(decode(tokenizer, generated.cpu().numpy()))
    return predictions


def score(accelerator, model, dataloader, tokenizer, training_args, references, prefix):
    predictions = generate_predictions(accelerator, model, dataloader, tokenizer, training_args)
    if len(predictions) != len(references):
        raise RuntimeError(f"{len(predictions)} predictions for {len(references)} references")
    return {f"{prefix}_cer": corpus_cer(references, predictions), f"{prefix}_wer": corpus_wer(references, predictions)}, predictions


# --------------------------------------------------------------------------------------
# Optimizer and scheduler, as Trainer.create_optimizer / create_scheduler.
# --------------------------------------------------------------------------------------
def decay_parameter_names(model) -> list[str]:
    # Trainer.get_decay_parameter_names: no weight decay on LayerNorm modules and on any
    # parameter whose name says bias or norm.
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return get_parameter_names(model, [torch.nn.LayerNorm], forbidden)


def create_optimizer(model, training_args):
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


# --------------------------------------------------------------------------------------
# Checkpoints: accelerator.save_state, with the model written by save_pretrained and the
# processor beside it, so that each checkpoint loads with from_pretrained.
# --------------------------------------------------------------------------------------
def register_checkpoint_hooks(accelerator, model):
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


def save_checkpoint(accelerator, training_args, processor, state: dict) -> str:
    folder = os.path.join(training_args.output_dir, f"checkpoint-{state['global_step']}")
    if accelerator.is_main_process and os.path.isdir(folder):
        shutil.rmtree(folder)  # a stale or incomplete one from an earlier run
    accelerator.wait_for_everyone()
    accelerator.save_state(folder)
    accelerator.wait_for_everyone()
    best_folder = os.path.join(training_args.output_dir, f"checkpoint-{state['best_step']}")
    if state["best_step"] is not None and os.path.isdir(best_folder):
        state["best_checkpoint"] = best_folder  # Trainer: best_model_checkpoint, on every process
    if accelerator.is_main_process:
        processor.save_pretrained(folder)
        Path(folder, LOOP_STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        Path(folder, COMPLETE).write_text(json.dumps({"step": state["global_step"]}) + "\n", encoding="utf-8")
        rotate_checkpoints(training_args.output_dir, training_args.save_total_limit, state.get("best_checkpoint"))
    accelerator.wait_for_everyone()
    return folder


# --------------------------------------------------------------------------------------
# The training loop.
# --------------------------------------------------------------------------------------
def train(accelerator, training_args, data_args, model, optimizer, processor, loaders, references, checkpoint, results):
    args = training_args
    train_loader = loaders["train"]
    tokenizer = processor.tokenizer

    # Steps and epochs (Trainer.set_initial_training_values): an epoch is len(train_loader)
    # micro-batches, ceil(len / accumulation) optimizer steps; the last step of an epoch
    # accumulates what is left.
    accumulation = args.gradient_accumulation_steps
    steps_in_epoch = len(train_loader)
    updates_per_epoch = max(steps_in_epoch // accumulation + int(steps_in_epoch % accumulation > 0), 1)
    if args.max_steps > 0:
        max_steps = args.max_steps
        num_epochs = max_steps // updates_per_epoch + int(max_steps % updates_per_epoch > 0)
    else:
        max_steps = math.ceil(args.num_train_epochs * updates_per_epoch)
        num_epochs = math.ceil(args.num_train_epochs)

    def absolute(steps):  # eval_steps / save_steps below 1 are a fraction of max_steps
        return math.ceil(max_steps * steps) if steps is not None and steps < 1 else steps

    eval_steps, save_steps = absolute(args.eval_steps), absolute(args.save_steps)
    eval_strategy, save_strategy = str(args.eval_strategy.value), str(args.save_strategy.value)

    # Trainer: the scheduler is stepped once per optimizer step and NOT passed through
    # accelerator.prepare: accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(max_steps),
        num_training_steps=max_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    # Its state goes into loop_state.json, not through register_for_checkpointing: accelerate
    # reads registered objects back with torch.load(weights_only=False), which runs any code a
    # crafted checkpoint holds.

    metric = best_metric_name(args)
    better = np.greater if args.greater_is_better else np.less
    state = {"global_step": 0, "epoch": 0.0, "best_metric": None, "best_step": None, "best_checkpoint": None,
             "patience_counter": 0}
    epochs_trained = steps_trained_in_epoch = 0
    if checkpoint:
        accelerator.load_state(checkpoint)
        state.update(json.loads(Path(checkpoint, LOOP_STATE).read_text(encoding="utf-8")))
        scheduler.load_state_dict(state["scheduler"])
        if state["best_checkpoint"] and not os.path.isdir(state["best_checkpoint"]):
            state["best_checkpoint"] = None
        epochs_trained = state["global_step"] // updates_per_epoch
        if not args.ignore_data_skip:
            steps_trained_in_epoch = (state["global_step"] % updates_per_epoch) * accumulation

    loss_log, eval_log = LossLog(args.output_dir), StepLog(args.output_dir, EVAL_LOG)
    if accelerator.is_main_process:
        loss_log.start(state["global_step"])
        eval_log.start(state["global_step"])

    logger.info("***** Running training (custom loop) *****")
    logger.info("  Num examples = %d, epochs = %d, optimizer steps = %d", len(train_loader.dataset), num_epochs, max_steps)
    logger.info("  Batch size per device = %d, accumulation = %d, processes = %d",
                args.train_batch_size, accumulation, accelerator.num_processes)

    def evaluate():
        scores, _ = score(accelerator, model, loaders["validation"], tokenizer, args, references["validation"], "eval")
        logger.info("Step %d: validation CER %.2f WER %.2f", state["global_step"], scores["eval_cer"], scores["eval_wer"])
        accelerator.log({"eval/cer": scores["eval_cer"], "eval/wer": scores["eval_wer"]}, step=state["global_step"])
        if accelerator.is_main_process:
            eval_log.write({"step": state["global_step"], **scores})
        value, best = scores[f"eval_{metric}"], state["best_metric"]
        # Trainer's EarlyStoppingCallback looks before the best metric is updated.
        if data_args.early_stopping_patience:
            improved = best is None or better(value, best)
            state["patience_counter"] = 0 if improved else state["patience_counter"] + 1
        if best is None or better(value, best):
            state["best_metric"], state["best_step"] = value, state["global_step"]
            return True
        return False

    def maybe_evaluate_and_save(evaluate_now, save_now):
        if evaluate_now:
            new_best = evaluate()
            if save_strategy == "best":
                save_now = new_best
        if save_now:
            state["scheduler"] = scheduler.state_dict()
            save_checkpoint(accelerator, args, processor, state)

    first_step = state["global_step"]
    total_loss = 0.0  # Trainer: train_loss is the mean of the logged per-step losses of this call
    tr_loss = torch.tensor(0.0, device=accelerator.device)
    stop = state["global_step"] >= max_steps
    start_time = time.time()
    model.zero_grad()

    for epoch in range(epochs_trained, num_epochs):
        if stop:
            break
        loader, step, first_update, rng_to_sync = train_loader, -1, 0, False
        if epoch == epochs_trained and checkpoint:
            if steps_trained_in_epoch > 0:
                loader = accelerator.skip_first_batches(train_loader, steps_trained_in_epoch)
                step = steps_trained_in_epoch - 1
                first_update = steps_trained_in_epoch // accumulation
                rng_to_sync = True
            else:
                restore_rng(checkpoint, accelerator.process_index)
        # The sampler's order depends on seed + epoch. The prepared loader reaches its sampler
        # however it is sharded; a skipping loader built from it needs the epoch too.
        train_loader.set_epoch(epoch)
        if loader is not train_loader:
            loader.set_epoch(epoch)
        batches = iter(loader)
        remainder = steps_in_epoch % accumulation or accumulation

        for update in range(first_update, updates_per_epoch):
            # Trainer: all the micro-batches of an optimizer step are fetched first, to count
            # the label tokens of the whole step: the loss is a sum over tokens divided by
            # that count (all micro-batches, all processes), not a mean of per-batch means.
            micro_batches = []
            for _ in range(accumulation if update != updates_per_epoch - 1 else remainder):
                try:
                    micro_batches.append(next(batches))
                except StopIteration:
                    break
            if not micro_batches:
                break
            num_items = sum(batch["labels"].ne(-100).sum() for batch in micro_batches)
            if args.average_tokens_across_devices and accelerator.num_processes > 1:
                num_items = accelerator.gather(num_items.to(accelerator.device)).sum()
            num_items = num_items.to(accelerator.device)
            if rng_to_sync:
                # Trainer: after skipping to the resumed position, the random states are
                # those of the checkpoint (the skipped batches were drawn from them). Dropout
                # then continues exactly as in a run never stopped; the augmentation does not:
                # the loader reads one batch ahead, so the checkpoint's `random` state already
                # includes the augmentation of the first batch after it.
                restore_rng(checkpoint, accelerator.process_index)
                rng_to_sync = False

            for index, batch in enumerate(micro_batches):
                step += 1
                # Gradients are all-reduced on the last micro-batch of the step only.
                last = index == len(micro_batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    model.train()
                    outputs = model(**batch)  # labels in: the model builds the decoder inputs from them
                    loss = token_loss(outputs.logits, batch["labels"], num_items)
                    if args.average_tokens_across_devices:
                        # num_items counts every process's tokens and DDP averages gradients.
                        loss = loss * accelerator.num_processes
                    accelerator.backward(loss)
                loss = loss.detach()
                if args.logging_nan_inf_filter and not torch.isfinite(loss):
                    # Trainer: a nan/inf loss is logged as the mean of those since the last log,
                    # tr_loss / (1 + global_step - last_logged_step), which is tr_loss here (a log
                    # every step). Only the log is filtered: the gradients are what they are.
                    tr_loss += tr_loss
                else:
                    tr_loss += loss

            grad_norm = None
            if args.max_grad_norm is not None and args.max_grad_norm > 0:
                # Unscales fp16 gradients first; only on the step's last micro-batch.
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            # Trainer: the learning rate logged for a step is the one that step used,
            # read after the optimizer step and before the scheduler step.
            learning_rate = scheduler.get_last_lr()[0]
            learning_rate = learning_rate.item() if torch.is_tensor(learning_rate) else learning_rate
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule
                scheduler.step()
            model.zero_grad()
            state["global_step"] += 1
            state["epoch"] = epoch + (step + 1) / steps_in_epoch

            # The logged loss: the sum of this step's micro-batch losses, averaged over processes.
            step_loss = accelerator.gather(tr_loss.reshape(1)).mean().item()
            tr_loss -= tr_loss
            total_loss += step_loss
            if accelerator.is_main_process:
                loss_log.append(state["global_step"], step_loss, learning_rate, state["epoch"])
            logs = {"train/loss": step_loss, "train/learning_rate": learning_rate, "train/epoch": state["epoch"]}
            if grad_norm is not None:
                logs["train/grad_norm"] = float(grad_norm)
            accelerator.log(logs, step=state["global_step"])

            # Trainer's DefaultFlowCallback: evaluate and save every eval_steps / save_steps,
            # and at the last step (evaluate there only if it was not an evaluation step).
            global_step = state["global_step"]
            stop = global_step >= max_steps
            evaluate_now = eval_strategy == "steps" and args.eval_delay <= global_step and (
                global_step % eval_steps == 0 or stop
            )
            save_now = save_strategy == "steps" and (
                (save_steps > 0 and global_step % save_steps == 0) or stop
            )
            maybe_evaluate_and_save(evaluate_now, save_now)
            if data_args.early_stopping_patience and state["patience_counter"] >= data_args.early_stopping_patience:
                logger.info("Early stopping: no improvement in %d evaluations", state["patience_counter"])
                stop = True
            if stop:
                break

        # End of an epoch (or of training inside one).
        maybe_evaluate_and_save(
            eval_strategy == "epoch" and args.eval_delay <= state["epoch"], save_strategy == "epoch"
        )
        if data_args.early_stopping_patience and state["patience_counter"] >= data_args.early_stopping_patience:
            stop = True

    steps_done = state["global_step"] - first_step
    results["train_loss"] = total_loss / max(steps_done, 0.001)
    results["train_runtime"] = round(time.time() - start_time, 4)
    results["epoch"] = state["epoch"]
    results["global_step"] = state["global_step"]

    # The best checkpoint is the final model (Trainer: load_best_model_at_end).
    if args.load_best_model_at_end and state["best_checkpoint"]:
        logger.info("Loading the best checkpoint %s (validation %s %.4f)", state["best_checkpoint"], metric,
                    state["best_metric"])
        load_checkpoint_weights(accelerator.unwrap_model(model), state["best_checkpoint"])
        if accelerator.is_main_process and args.save_total_limit == 1:
            for folder in Path(args.output_dir).glob("checkpoint-*"):
                if folder.is_dir() and not os.path.samefile(folder, state["best_checkpoint"]):
                    shutil.rmtree(folder, ignore_errors=True)
    return state


def main(argv=None):
    # 1. Arguments: the same recipe files and flags as run_trocr.py.
    model_args, data_args, training_args = parse_recipe(argv)
    training_args.logging_steps = 1  # as run_trocr.py: one loss row per optimizer step
    check_supported(training_args)
    setup_logging(training_args)
    logger.info("Training arguments %s", training_args)

    # 2. Resume, model, processor, data and preflight, exactly as run_trocr.py starts.
    seed = enable_full_determinism if training_args.full_determinism else set_seed
    run, checkpoint, report = start_run(model_args, data_args, training_args, COMPLETE, seed)
    if report is not None:
        return report
    model, processor, inputs, references = run.model, run.processor, run.inputs, run.references
    # Trainer: seeds again in its __init__, after the model is loaded and before anything
    # draws from the random generators, and sets `use_cache` from the arguments.
    seed(training_args.seed)
    if training_args.generation_config is not None:
        model.generation_config = Seq2SeqTrainer.load_generation_config(training_args.generation_config)
    model.config.use_cache = training_args.use_cache

    # 3. Accelerator: mixed precision, data loader sharding and seeding, TensorBoard.
    accelerator_config = training_args.accelerator_config.to_dict()
    dataloader_config = DataLoaderConfiguration(
        split_batches=accelerator_config["split_batches"],
        dispatch_batches=accelerator_config["dispatch_batches"],
        even_batches=accelerator_config["even_batches"],
        use_seedable_sampler=accelerator_config["use_seedable_sampler"],
        data_seed=training_args.data_seed,
        non_blocking=accelerator_config["non_blocking"],
    )
    tensorboard = wants_tensorboard(training_args)
    accelerator = Accelerator(
        mixed_precision=training_args.mixed_precision,
        dataloader_config=dataloader_config,
        # Gradient accumulation is done by this loop (see train), not by accelerate.
        gradient_accumulation_steps=1,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=training_args.output_dir, logging_dir=training_args.output_dir),
        cpu=training_args.use_cpu,
    )
    if accelerator.is_main_process:
        os.makedirs(training_args.output_dir, exist_ok=True)

    # Data loaders: train first, so that its sampler is the one accelerate's state files name.
    loaders = {}
    if training_args.do_train:
        loaders["train"] = make_dataloader(accelerator, training_args, inputs["train"], run.collator, train=True)
    for role in ("validation", "test"):
        loaders[role] = make_dataloader(accelerator, training_args, inputs[role], run.collator, train=False)

    # Prepared for training (DDP) before the baseline: accelerate prepares a model once only,
    # and one first prepared for evaluation would never be wrapped in DDP (the Trainer's
    # trap, repaired in trocr_recipe/trainer.py). Generation uses the unwrapped model.
    optimizer = None
    if training_args.do_train:
        optimizer = create_optimizer(model, training_args)  # named parameters of the unwrapped model
        model, optimizer = accelerator.prepare(model, optimizer)
        register_checkpoint_hooks(accelerator, model)
    else:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    results = run.data_results()  # truncated labels and skipped lines per split
    tokenizer = processor.tokenizer

    # 4. Baseline: the starting model on validation, before any update.
    if training_args.do_eval:
        baseline, _ = score(accelerator, model, loaders["validation"], tokenizer, training_args,
                            references["validation"], "baseline")
        results.update(baseline)
        logger.info("Baseline validation CER %.2f", baseline["baseline_cer"])

    # 5. Train; never keep a model worse than the starting one.
    if training_args.do_train:
        # Trainer.train: the tokenizer's special tokens onto config and generation config.
        align_special_tokens(accelerator.unwrap_model(model), processor)
        if tensorboard:
            from transformers.integrations.integration_utils import default_logdir

            hparams = {k: v for k, v in training_args.to_dict().items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(os.environ.get("TENSORBOARD_LOGGING_DIR") or default_logdir(), config=hparams)
            if "baseline_cer" in results:
                accelerator.log({"eval/cer": results["baseline_cer"], "eval/wer": results["baseline_wer"]}, step=0)
        state = train(accelerator, training_args, data_args, model, optimizer, processor, loaders, references,
                      checkpoint, results)
        metric = best_metric_name(training_args)
        best = state["best_metric"]
        if training_args.do_eval and (best is None or not best_is_better(training_args, best, results[f"baseline_{metric}"])):
            restore_starting_model(
                accelerator.unwrap_model(model), model_args, metric, best, results[f"baseline_{metric}"]
            )
            results["kept_starting_model"] = True
        accelerator.wait_for_everyone()
        accelerator.unwrap_model(model).save_pretrained(
            training_args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
        if accelerator.is_main_process:
            processor.save_pretrained(training_args.output_dir)
            # The baseline is step 0 of the validation-CER curve.
            eval_rows = [{"step": 0, "eval_cer": results["baseline_cer"]}] if "baseline_cer" in results else []
            write_training_curves(training_args.output_dir, eval_rows + StepLog(training_args.output_dir, EVAL_LOG).read())

    # 6. Final scores: validation and test, generate-based, with predictions files.
    for role, enabled in (("validation", training_args.do_eval), ("test", training_args.do_predict)):
        if not enabled:
            continue
        scores, predictions = score(accelerator, model, loaders[role], tokenizer, training_args, references[role],
                                    RESULT_PREFIX[role])
        results.update(scores)
        run.report_split(role, scores, predictions, training_args.output_dir, data_args.image_column,
                         accelerator.is_main_process)

    # 7. Results and model card; the Hub.
    if accelerator.is_main_process:
        results = finish_run(training_args.output_dir, model_args, data_args, results)
        if training_args.push_to_hub:
            push_to_hub(training_args)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def best_is_better(training_args, best: float, baseline: float) -> bool:
    return bool(np.greater(best, baseline) if training_args.greater_is_better else np.less(best, baseline))


def push_to_hub(training_args) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=training_args.hub_token)
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
    api.upload_folder(
        folder_path=training_args.output_dir, repo_id=repo_id, ignore_patterns=["checkpoint-*", "runs/*"],
        commit_message="TrOCR fine-tuned with run_trocr_no_trainer.py",
    )


if __name__ == "__main__":
    main()
