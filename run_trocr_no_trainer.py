#!/usr/bin/env python
"""The run of `run_trocr.py` written as a plain training loop on `accelerate`, whole in this
file: the template for a method of your own (docs/custom_loop.md).

    python run_trocr_no_trainer.py recipes/tiny.json [--flag value ...]
    accelerate launch run_trocr_no_trainer.py recipes/small.json

It reads the same recipe files and arguments (the `Seq2SeqTrainingArguments` fields are
reused: learning rate, schedule, batch sizes, accumulation, clipping, evaluation, saving,
mixed precision, ...) and gets model, processor, data and collator from `trocr_recipe`.
Read it from `main` down: `train` is the loop (epochs, gradient accumulation, the step, when
to evaluate, save and stop); a method of your own starts in `compute_loss`. Saving and
resuming checkpoints with their random states is in trocr_recipe/loop_checkpoints.py, the
accelerator and data loaders in trocr_recipe/loop_setup.py; neither uses the Trainer.

With the same recipe it reproduces the Trainer step for step (tests/test_no_trainer.py).
The comments marked "Trainer:" name what the Trainer does that a hand-written loop easily
misses.
"""

import contextlib
import logging
import math
import sys
import time
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from transformers import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from trocr_recipe import loop_setup
from trocr_recipe.args import parse_recipe
from trocr_recipe.errors import run_cli
from trocr_recipe.generation import generate
from trocr_recipe.loop_checkpoints import (
    COMPLETE, Resume, load_best_checkpoint, register_checkpoint_hooks, save_checkpoint,
)
from trocr_recipe.metrics import corpus_cer, corpus_wer, decode
from trocr_recipe.modeling import token_loss
from trocr_recipe.never_worse import BASELINE, TRAINED, decide, is_better, metric_name
from trocr_recipe.outputs import JsonlLog, LossLog, finish_run, write_training_curves
from trocr_recipe.pipeline import RESULT_PREFIX, setup_logging, start_run
from trocr_recipe.trainable import set_trainable

logger = logging.getLogger("trocr_recipe")

EVAL_LOG = "eval_log.jsonl"


def main(argv=None):
    # 1. Arguments: the same recipe files and flags as run_trocr.py.
    model_args, data_args, args = parse_recipe(argv, __doc__)
    args.logging_steps = 1  # as run_trocr.py: one loss row per optimizer step
    loop_setup.check_supported(args)
    setup_logging(args)
    logger.info("Training arguments %s", args)

    # 2. Resume, model, processor, data and preflight, exactly as run_trocr.py starts.
    run, checkpoint, report = start_run(model_args, data_args, args, COMPLETE, loop_setup.seed_function(args))
    if report is not None:
        return report
    model, processor = run.model, run.processor
    loop_setup.configure_like_trainer(model, args)
    method = model_args.method or {}  # the recipe's free-form `method` object, for a method of your own

    # 3. Accelerator, data loaders, optimizer. The model is wrapped in DDP before the baseline:
    # accelerate prepares a model once only. Generation uses the unwrapped model.
    accelerator = loop_setup.make_accelerator(args)
    loaders = loop_setup.make_dataloaders(accelerator, args, run.inputs, run.collator)
    results = run.data_results()  # truncated labels and skipped lines per split
    if args.do_train:
        # `trainable`: what does not train is frozen before the optimizer takes what trains.
        results.update(set_trainable(model, model_args.trainable))
        optimizer = create_optimizer(model, args, method)  # from the unwrapped model's named parameters
        model, optimizer = accelerator.prepare(model, optimizer)
        register_checkpoint_hooks(accelerator, model)  # checkpoints written by save_pretrained
    else:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    validate = partial(score, accelerator, model, loaders["validation"], processor.tokenizer, args,
                       run.references["validation"])

    # 4. Baseline: the starting model on validation (and test, with baseline_test), before any update.
    if args.do_eval:
        if data_args.baseline_test:
            with torch.random.fork_rng():  # as run_trocr.py: training stays as without it
                scores, predictions = score(accelerator, model, loaders["test"], processor.tokenizer, args,
                                            run.references["test"], "baseline_test")
            results.update(scores)
            run.report_split("test", scores, predictions, args.output_dir, data_args.image_column,
                             accelerator.is_main_process, prefix="baseline_test")
        baseline, _ = validate(BASELINE)
        results.update(baseline)
        logger.info("Baseline validation CER %.2f", baseline["baseline_cer"])

    # 5. Train; the final model is the best checkpoint, never one worse than the starting model.
    if args.do_train:
        loop_setup.before_training(accelerator, args, model, processor, results)
        state, last_scores, train_results = train(accelerator, args, method, model, optimizer, loaders["train"],
                                                  processor, validate, checkpoint, data_args.early_stopping_patience)
        results.update(train_results)
        results.update(keep_never_worse(accelerator, args, model_args, model, state, last_scores, validate, results))
        save(accelerator, args, model, processor, results)

    # 6. Final scores: validation and test, generate-based, with predictions files.
    for role, enabled in (("validation", args.do_eval), ("test", args.do_predict)):
        if enabled:
            scores, predictions = score(accelerator, model, loaders[role], processor.tokenizer, args,
                                        run.references[role], RESULT_PREFIX[role])
            results.update(scores)
            run.report_split(role, scores, predictions, args.output_dir, data_args.image_column,
                             accelerator.is_main_process)

    # 7. Results and model card; the Hub.
    if accelerator.is_main_process:
        results = finish_run(args.output_dir, model_args, data_args, results)
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


# --------------------------------------------------------------------------------------
# The optimizer, as Trainer.create_optimizer builds it.
# --------------------------------------------------------------------------------------
def create_optimizer(model, args, method):
    """AdamW over the parameters that train (requires_grad); no weight decay on LayerNorm
    weights and on any parameter whose name says bias or norm (Trainer.get_decay_parameter_names).
    `method`: the recipe's `method` object, for parameter groups of your own."""
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], forbidden))
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trained if name in decay], "weight_decay": args.weight_decay},
        {"params": [p for name, p in trained if name not in decay], "weight_decay": 0.0},
    ]
    # Trainer: the fused AdamW kernel by default on torch >= 2.8; the same numbers as unfused.
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, fused=str(getattr(args.optim, "value", args.optim)).endswith("fused"))


# --------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------
def train(accelerator, args, method, model, optimizer, train_loader, processor, validate, checkpoint, patience):
    """Optimizer steps to max_steps (or num_train_epochs), from where `checkpoint` stopped,
    evaluating and saving when the Trainer would. Returns the state, the last validation
    scores and the training results (train_loss, ...)."""
    # How long, as the Trainer counts: an epoch is len(train_loader) micro-batches grouped into
    # optimizer steps of gradient_accumulation_steps; an epoch's last step takes what is left.
    accumulation, batches_per_epoch = args.gradient_accumulation_steps, len(train_loader)
    steps_per_epoch = max(math.ceil(batches_per_epoch / accumulation), 1)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    eval_steps, save_steps = (math.ceil(max_steps * n) if n is not None and n < 1 else n
                              for n in (args.eval_steps, args.save_steps))  # below 1: a fraction of max_steps
    eval_strategy, save_strategy = str(args.eval_strategy.value), str(args.save_strategy.value)
    # Trainer: stepped once per optimizer step, and not through accelerator.prepare (whose
    # wrapper would step it once per process).
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_training_steps=max_steps,
                              num_warmup_steps=args.get_warmup_steps(max_steps),
                              scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    resume = Resume(accelerator, args, checkpoint, scheduler, steps_per_epoch)
    state, first_step, last_scores = resume.state, resume.state.global_step, {}
    loss_log, eval_log = LossLog(args.output_dir), JsonlLog(args.output_dir, EVAL_LOG)
    if accelerator.is_main_process:
        loss_log.start(state.global_step)  # rows past the resumed step dropped
        eval_log.start(state.global_step)
    logger.info("***** Running training (custom loop) *****: %d examples, %d epochs, %d optimizer steps, batch "
                "size %d per device, accumulation %d, %d processes", len(train_loader.dataset), num_epochs,
                max_steps, args.train_batch_size, accumulation, accelerator.num_processes)
    epochs = range(resume.epoch, num_epochs)
    if state.global_step >= max_steps:
        logger.info("Resumed at step %d of max_steps=%d: nothing left to train", state.global_step, max_steps)
        epochs = range(0)

    def evaluate_and_save(evaluate_now: bool, save_now: bool) -> bool:
        """A validation score when due (save_strategy "best" saves each new best), a checkpoint
        when due. True when early stopping is due."""
        if evaluate_now:
            scores, _ = validate("eval")
            last_scores.update(scores, step=state.global_step)
            new_best = record_evaluation(accelerator, args, state, scores, eval_log, patience)
            save_now = new_best if save_strategy == "best" else save_now
        if save_now:
            save_checkpoint(accelerator, args, processor, state, scheduler)
        if patience and state.patience_counter >= patience:
            logger.info("Early stopping: no improvement in %d evaluations", state.patience_counter)
            return True
        return False

    tr_loss, total_loss, start_time = torch.tensor(0.0, device=accelerator.device), 0.0, time.time()
    model.zero_grad()
    for epoch in epochs:
        batches = resume.batches(train_loader, epoch)  # past the batches a resumed run already trained
        batches_done, stop = resume.skip if epoch == resume.epoch else 0, False
        for step_in_epoch in range(batches_done // accumulation, steps_per_epoch):
            # Trainer: all the micro-batches of a step are fetched first, to count the label
            # tokens of the whole step (all micro-batches, all processes).
            last_of_epoch = step_in_epoch == steps_per_epoch - 1
            micro_batches = list(islice(batches, (batches_per_epoch % accumulation or accumulation)
                                        if last_of_epoch else accumulation))
            if not micro_batches:
                break
            num_items = count_label_tokens(accelerator, args, micro_batches)
            resume.sync_random_states()  # once, on the first step after a resume mid-epoch

            # The step: forward and backward over the micro-batches, clipping, the update.
            tr_loss, terms = training_step(accelerator, args, method, model, micro_batches, num_items, tr_loss)
            grad_norm, learning_rate = optimizer_step(accelerator, args, model, optimizer, scheduler)
            state.global_step += 1
            batches_done += len(micro_batches)
            state.epoch = epoch + batches_done / batches_per_epoch  # as the Trainer counts epochs

            # The logged loss: the sum of this step's micro-batch losses, averaged over processes.
            step_loss = accelerator.gather(tr_loss.reshape(1)).mean().item()
            tr_loss -= tr_loss  # zeroed in place, as the Trainer does
            total_loss += step_loss
            log_step(accelerator, loss_log, state, step_loss, learning_rate, grad_norm, terms)

            # Trainer's DefaultFlowCallback: evaluate every eval_steps, save every save_steps,
            # both at the last step; EarlyStoppingCallback.
            step, last = state.global_step, state.global_step >= max_steps
            evaluate_now = eval_strategy == "steps" and args.eval_delay <= step and (step % eval_steps == 0 or last)
            save_now = save_strategy == "steps" and ((save_steps > 0 and step % save_steps == 0) or last)
            stop = evaluate_and_save(evaluate_now, save_now) or last
            if stop:
                break

        # The end of an epoch (or of training inside one).
        stop = evaluate_and_save(eval_strategy == "epoch" and args.eval_delay <= state.epoch,
                                 save_strategy == "epoch") or stop
        if stop:
            break

    # Trainer: train_loss is the mean of the logged per-step losses of this call.
    train_results = {"train_loss": total_loss / max(state.global_step - first_step, 0.001), "epoch": state.epoch,
                     "train_runtime": round(time.time() - start_time, 4), "global_step": state.global_step}
    return state, last_scores, train_results


def count_label_tokens(accelerator, args, micro_batches) -> torch.Tensor:
    """The label tokens of an optimizer step (not -100), of every process when
    average_tokens_across_devices."""
    num_items = sum(batch["labels"].ne(-100).sum() for batch in micro_batches)
    if args.average_tokens_across_devices and accelerator.num_processes > 1:
        num_items = accelerator.gather(num_items.to(accelerator.device)).sum()
    return num_items.to(accelerator.device)


def compute_loss(model, batch, num_items, method):
    """The loss of one micro-batch, and the terms to log beside it: the place for a method of
    your own, weighted by the recipe's `method` object (docs/custom_loop.md)."""
    # ---- Your method: the model call and the loss. ------------------------------------
    outputs = model(**batch)  # labels in: the model builds the decoder inputs from them
    # Trainer: cross-entropy summed over the label tokens and divided by `num_items`, the
    # label tokens of the whole optimizer step (all micro-batches, all processes), not a mean
    # of per-batch means.
    loss = token_loss(outputs.logits, batch["labels"], num_items)
    terms = {}  # name -> a term of this micro-batch (divided by num_items too), logged in loss_log.jsonl
    return loss, terms


def training_step(accelerator, args, method, model, micro_batches, num_items, tr_loss):
    """Forward and backward over the micro-batches of one optimizer step; returns `tr_loss`
    with the step's loss added, as the Trainer accumulates it, and the step's terms summed."""
    step_terms = {}
    for index, batch in enumerate(micro_batches):
        # Gradients are all-reduced on the last micro-batch of the step only.
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            model.train()
            loss, terms = compute_loss(model, batch, num_items, method)
            if args.average_tokens_across_devices:
                # num_items counts every process's tokens and DDP averages gradients.
                loss = loss * accelerator.num_processes
            accelerator.backward(loss)
        loss = loss.detach()
        for name, term in terms.items():
            step_terms[name] = step_terms.get(name, 0.0) + term.detach()
        if args.logging_nan_inf_filter and not torch.isfinite(loss):
            # Trainer: a nan/inf loss is logged as the mean of those since the last log,
            # tr_loss / (1 + global_step - last_logged_step), which is tr_loss here (a log
            # every step). Only the log is filtered: the gradients are what they are.
            tr_loss += tr_loss
        else:
            tr_loss += loss
    return tr_loss, step_terms


def optimizer_step(accelerator, args, model, optimizer, scheduler):
    """Clipping, the update and the schedule. Returns the gradient norm (None without
    clipping) and the learning rate the step used."""
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
    return grad_norm, learning_rate


def log_step(accelerator, loss_log, state, loss: float, learning_rate: float, grad_norm, terms: dict) -> None:
    """The step's loss, learning rate and the terms of a method (each averaged over processes):
    loss_log.jsonl (main process) and TensorBoard."""
    terms = {name: accelerator.gather(term.reshape(1)).mean().item() for name, term in terms.items()}
    if accelerator.is_main_process:
        loss_log.append(state.global_step, loss, learning_rate, state.epoch, **terms)
    logs = {"train/loss": loss, "train/learning_rate": learning_rate, "train/epoch": state.epoch,
            **{f"train/{name}": value for name, value in terms.items()}}
    if grad_norm is not None:
        logs["train/grad_norm"] = float(grad_norm)
    accelerator.log(logs, step=state.global_step)


def record_evaluation(accelerator, args, state, scores: dict, eval_log, patience) -> bool:
    """Validation scores at this step: logged (eval_log.jsonl, TensorBoard), kept as the best
    and counted for early stopping. True if they are the best so far."""
    step, value = state.global_step, scores[f"eval_{metric_name(args)}"]
    logger.info("Step %d: validation CER %.2f WER %.2f", step, scores["eval_cer"], scores["eval_wer"])
    accelerator.log({"eval/cer": scores["eval_cer"], "eval/wer": scores["eval_wer"]}, step=step)
    if accelerator.is_main_process:
        eval_log.write({"step": step, **scores})
    improved = state.best_metric is None or is_better(args, value, state.best_metric)
    if patience:  # Trainer's EarlyStoppingCallback looks before the best metric is updated
        state.patience_counter = 0 if improved else state.patience_counter + 1
    if improved:
        state.best_metric, state.best_step = value, step
    return improved


def keep_never_worse(accelerator, args, model_args, model, state, last_scores, validate, results) -> dict:
    """The final model: the best checkpoint (load_best_model_at_end), else the last; kept only if
    it scores better than the starting model on the configured metric (scored now if no
    evaluation saw it), else the starting model is restored."""
    loaded_best, metric = load_best_checkpoint(accelerator, args, model, state), metric_name(args)
    if f"{BASELINE}_{metric}" not in results:  # no baseline without do_eval
        return {}
    if loaded_best:
        trained, source = state.best_metric, f"best checkpoint {state.best_checkpoint}"
    elif last_scores and last_scores.get("step") == state.global_step:
        trained, source = last_scores[f"eval_{metric}"], "last evaluation"
    else:
        trained, source = validate(TRAINED)[0][f"{TRAINED}_{metric}"], "final model scored"
    return decide(accelerator.unwrap_model(model), model_args, args, trained, results[f"{BASELINE}_{metric}"], source)


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
# Saving.
# --------------------------------------------------------------------------------------
def save(accelerator, args, model, processor, results) -> None:
    """The final model and processor in output_dir, loadable by from_pretrained; the training
    curves, with the baseline as step 0 of the validation CER."""
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(
        args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        processor.save_pretrained(args.output_dir)
        eval_rows = [{"step": 0, "eval_cer": results["baseline_cer"]}] if "baseline_cer" in results else []
        write_training_curves(args.output_dir, eval_rows + JsonlLog(args.output_dir, EVAL_LOG).read())


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
    sys.exit(run_cli(main))
