#!/usr/bin/env python
"""The run of `run_trocr.py` written as a plain training loop on `accelerate`: the "custom
loop" of this project, and the template for a loop of your own.

    accelerate launch run_trocr_no_trainer.py recipes/small.json [--flag value ...]
    python run_trocr_no_trainer.py recipes/tiny.json

It reads the same recipe files and arguments (the `Seq2SeqTrainingArguments` fields are
reused: learning rate, schedule, batch sizes, accumulation, clipping, evaluation, saving,
mixed precision, ...), gets model, processor, data and collator from `trocr_recipe`, and
writes the same outputs as `run_trocr.py` plus `eval_log.jsonl`. Read it from `main` down;
a method of your own starts in `compute_loss`. The machinery that makes the loop match the
Trainer and resume where it stopped (schedule, sampler order, random states, checkpoints)
is in trocr_recipe/loop.py.

With the same recipe it reproduces the Trainer step for step: on `recipes/tiny.json` in
float32 on a CPU, every per-step loss of `loss_log.jsonl` agrees with `run_trocr.py`'s and
the predictions are identical (tests/test_no_trainer.py). The comments marked
"Trainer:" name what the Trainer does that a hand-written loop easily misses.
"""

import contextlib
import logging
import sys
from functools import partial
from pathlib import Path

import torch

from trocr_recipe import loop
from trocr_recipe.args import parse_recipe
from trocr_recipe.errors import run_cli
from trocr_recipe.generation import generate
from trocr_recipe.loop import COMPLETE, EVAL_LOG
from trocr_recipe.metrics import corpus_cer, corpus_wer, decode
from trocr_recipe.modeling import token_loss
from trocr_recipe.outputs import JsonlLog, finish_run, write_training_curves
from trocr_recipe.pipeline import RESULT_PREFIX, setup_logging, start_run

logger = logging.getLogger("trocr_recipe")


def main(argv=None):
    # 1. Arguments: the same recipe files and flags as run_trocr.py.
    model_args, data_args, args = parse_recipe(argv)
    args.logging_steps = 1  # as run_trocr.py: one loss row per optimizer step
    loop.check_supported(args)
    setup_logging(args)
    logger.info("Training arguments %s", args)

    # 2. Resume, model, processor, data and preflight, exactly as run_trocr.py starts.
    run, checkpoint, report = start_run(model_args, data_args, args, COMPLETE, loop.seed_function(args))
    if report is not None:
        return report
    model, processor = run.model, run.processor
    loop.configure_like_trainer(model, args)

    # 3. Accelerator, data loaders, optimizer. The model is wrapped in DDP before the baseline:
    # accelerate prepares a model once only. Generation uses the unwrapped model.
    accelerator = loop.make_accelerator(args)
    loaders = loop.make_dataloaders(accelerator, args, run.inputs, run.collator)
    if args.do_train:
        optimizer = loop.create_optimizer(model, args)  # named parameters of the unwrapped model
        model, optimizer = accelerator.prepare(model, optimizer)
        loop.register_checkpoint_hooks(accelerator, model)  # checkpoints written by save_pretrained
    else:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    results = run.data_results()  # truncated labels and skipped lines per split
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
        baseline, _ = validate("baseline")
        results.update(baseline)
        logger.info("Baseline validation CER %.2f", baseline["baseline_cer"])

    # 5. Train; the final model is the best checkpoint, never one worse than the starting model.
    if args.do_train:
        loop.before_training(accelerator, args, model, processor, results)
        progress = loop.Progress(accelerator, args, optimizer, loaders["train"], processor, checkpoint,
                                 data_args.early_stopping_patience)
        train(accelerator, args, model, optimizer, progress, validate)
        results.update(progress.results())
        starting_score = results.get(f"baseline_{loop.best_metric_name(args)}")
        if progress.load_final_model(model, model_args, starting_score):
            results["kept_starting_model"] = True
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
# Training.
# --------------------------------------------------------------------------------------
def train(accelerator, args, model, optimizer, progress, validate):
    """Optimizer steps to max_steps (or num_train_epochs) from where `progress` resumes,
    evaluating and saving when the Trainer would."""
    state, schedule = progress.state, progress.schedule
    tr_loss = torch.tensor(0.0, device=accelerator.device)
    model.zero_grad()
    for epoch in progress.epochs():
        stop = False
        for step in progress.optimizer_steps(epoch):
            tr_loss = training_step(accelerator, args, model, step, tr_loss)
            grad_norm, learning_rate = optimizer_step(accelerator, args, model, optimizer, progress.scheduler)
            state.global_step += 1
            state.epoch = step.epoch

            # The logged loss: the sum of this step's micro-batch losses, averaged over processes.
            step_loss = accelerator.gather(tr_loss.reshape(1)).mean().item()
            tr_loss -= tr_loss  # zeroed in place, as the Trainer does
            progress.log_step(step_loss, learning_rate, grad_norm)

            # Trainer's DefaultFlowCallback: evaluate and save every eval_steps / save_steps,
            # and at the last step; EarlyStoppingCallback.
            stop = state.global_step >= schedule.max_steps
            evaluate_and_save(progress, validate, *schedule.due_after_step(state.global_step))
            stop = progress.should_stop_early() or stop
            if stop:
                break

        # End of an epoch (or of training inside one).
        evaluate_and_save(progress, validate, *schedule.due_at_epoch_end(state.epoch))
        if stop or progress.should_stop_early():
            break


def compute_loss(model, batch, num_items):
    """The loss of one micro-batch: the place for a method of your own."""
    # ---- Your method: the model call and the loss. ------------------------------------
    outputs = model(**batch)  # labels in: the model builds the decoder inputs from them
    # Trainer: cross-entropy summed over the label tokens and divided by `num_items`, the
    # label tokens of the whole optimizer step (all micro-batches, all processes), not a mean
    # of per-batch means.
    return token_loss(outputs.logits, batch["labels"], num_items)


def training_step(accelerator, args, model, step, tr_loss):
    """Forward and backward over the micro-batches of one optimizer step; returns `tr_loss`
    with the step's loss added, as the Trainer accumulates it."""
    for index, batch in enumerate(step.micro_batches):
        # Gradients are all-reduced on the last micro-batch of the step only.
        last = index == len(step.micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            model.train()
            loss = compute_loss(model, batch, step.num_items)
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
    return tr_loss


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


def evaluate_and_save(progress, validate, evaluate_now: bool, save_now: bool) -> None:
    """A validation score when due (save_strategy "best" saves each new best), a checkpoint when due."""
    if evaluate_now:
        scores, _ = validate("eval")
        new_best = progress.record_evaluation(scores)
        if progress.schedule.save_strategy == "best":
            save_now = new_best
    if save_now:
        progress.save_checkpoint()


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
