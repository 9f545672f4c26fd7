#!/usr/bin/env python
"""Fine-tune and evaluate TrOCR (VisionEncoderDecoderModel) on handwritten text lines the
way the TrOCR paper did, with Seq2SeqTrainer and generate-based CER.

    accelerate launch run_trocr.py recipes/small.json [--flag value ...]

The recipe JSON gives the defaults, flags override them; `--help` lists every argument.
"""

import logging
import math
import sys

import torch
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from trocr_recipe.args import parse_recipe
from trocr_recipe.errors import run_cli
from trocr_recipe.metrics import GeneratedTextMetrics
from trocr_recipe.outputs import LossLog, finish_run, write_training_curves
from trocr_recipe.pipeline import RESULT_PREFIX, setup_logging, start_run
from trocr_recipe.steptrace import configure_trace_run
from trocr_recipe.never_worse import BASELINE, TRAINED, decide, metric_name
from trocr_recipe.trainable import set_trainable
from trocr_recipe.trainer import BaselineScore, OcrTrainer

logger = logging.getLogger("trocr_recipe")


class LossLogCallback(TrainerCallback):
    """Writes the trainer's per-step loss to loss_log.jsonl (main process only)."""

    def __init__(self, output_dir: str):
        self.log = LossLog(output_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.log.start(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.log.append(state.global_step, logs["loss"], logs.get("learning_rate"), logs.get("epoch"))


class _PrintEvery:
    """The trainer's console output of the training logs (its progress bar's or its
    printer's) every `logging_steps` of the recipe, while the trainer logs every step for
    loss_log.jsonl and TensorBoard: a dict printed at every step floods the console and costs
    time (docs/speed.md). Other logs (evaluation) always print."""

    def __init__(self, logging_steps: float):
        super().__init__()
        self.logging_steps, self.every = logging_steps, 1

    def on_train_begin(self, args, state, control, **kwargs):
        # As TrainingArguments: a logging_steps below 1 is a fraction of the training steps.
        steps = self.logging_steps
        self.every = max(1, math.ceil(state.max_steps * steps) if steps < 1 else int(steps))
        return super().on_train_begin(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.global_step % self.every and state.global_step != state.max_steps:
            return None
        return super().on_log(args, state, control, logs=logs, **kwargs)


class ProgressEvery(_PrintEvery, ProgressCallback):
    pass


class PrinterEvery(_PrintEvery, PrinterCallback):
    pass


def evaluate_split(trainer, metrics, split, references, prefix):
    """Generate on one split and score it against its raw reference strings."""
    metrics.references = references
    output = trainer.predict(split, metric_key_prefix=prefix)
    return output.metrics, metrics.predictions


def keep_never_worse(trainer, metrics, model_args, validation, references, results) -> dict:
    """The final model (the best checkpoint with load_best_model_at_end, else the last) kept
    only if it scores better than the starting model on the configured metric (scored now if
    no evaluation saw it), else the starting model restored (trocr_recipe/never_worse.py)."""
    args, state, metric = trainer.args, trainer.state, metric_name(trainer.args)
    if f"{BASELINE}_{metric}" not in results:  # no baseline without do_eval
        return {}
    last = next((row for row in reversed(state.log_history) if f"eval_{metric}" in row), {})
    if args.load_best_model_at_end and state.best_model_checkpoint:
        trained, source = state.best_metric, f"best checkpoint {state.best_model_checkpoint}"
    elif last.get("step") == state.global_step:
        trained, source = last[f"eval_{metric}"], "last evaluation"
    else:
        scores, _ = evaluate_split(trainer, metrics, validation, references, TRAINED)
        trained, source = scores[f"{TRAINED}_{metric}"], "final model scored"
    model = trainer.accelerator.unwrap_model(trainer.model)
    return decide(model, model_args, args, trained, results[f"{BASELINE}_{metric}"], source)


def main(argv=None):
    # 1. Arguments: recipe JSON as defaults, flags override, unknown keys are errors.
    model_args, data_args, training_args = parse_recipe(argv, __doc__)
    if model_args.method is not None:
        raise SystemExit("method: run_trocr.py does not read it; it is handed to run_trocr_no_trainer.py's "
                         "compute_loss and create_optimizer (docs/custom_loop.md): run that script, or drop the key")
    # The image transform reads the raw image and text columns: the trainer must not drop them.
    training_args.remove_unused_columns = False
    # loss_log.jsonl holds one row per optimizer step: it is what runs are compared on. The
    # console still shows the training logs every logging_steps of the recipe.
    console_logging_steps, training_args.logging_steps = training_args.logging_steps, 1
    setup_logging(training_args)
    # --trace_steps N: N deterministic steps recorded in output_dir/trace (docs/step_comparison.md).
    trace = configure_trace_run(model_args, data_args, training_args)
    logger.info("Training arguments %s", training_args)

    # 2. Resume from the last complete checkpoint in output_dir, if any (only a run of the
    #    same recipe); model, processor and data: special tokens on config and
    #    generation_config, labels tokenized once (text + </s>), images transformed on the fly,
    #    generation sized to the data; then the preflight checks for the known pitfalls.
    run, checkpoint, report = start_run(model_args, data_args, training_args)
    if report is not None:
        return report
    if trace:
        trace.prepare(run, checkpoint)
    model, processor, inputs, references = run.model, run.processor, run.inputs, run.references
    # `trainable`: the parameters that do not train are frozen before the trainer builds its optimizer.
    trainable = set_trainable(model, model_args.trainable) if training_args.do_train else {}

    # Trainer: generate-based CER on validation, the best checkpoint kept by it.
    metrics = GeneratedTextMetrics(processor.tokenizer, references["validation"])
    trainer = OcrTrainer(
        model=model,
        args=training_args,
        train_dataset=inputs["train"] if training_args.do_train else None,
        eval_dataset=inputs["validation"],
        processing_class=processor,
        data_collator=run.collator,
        compute_metrics=metrics,
        callbacks=[LossLogCallback(training_args.output_dir)] + ([trace] if trace else []),
    )
    for stock, every in ((ProgressCallback, ProgressEvery), (PrinterCallback, PrinterEvery)):
        if trainer.pop_callback(stock) is not None:
            trainer.add_callback(every(console_logging_steps))
    if data_args.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(data_args.early_stopping_patience))
    results = {**run.data_results(), **trainable}  # truncated labels and skipped lines per split

    # 3. Baseline: the starting model on validation (and test, with baseline_test), before any
    #    update; when training, as train() begins, once the model is wrapped for DDP (BaselineScore).
    def score_starting_model():
        scores = {}
        if data_args.baseline_test:
            with torch.random.fork_rng():  # a data loader draws its seed: training stays as without it
                scores, predictions = evaluate_split(trainer, metrics, inputs["test"], references["test"],
                                                     "baseline_test")
            run.report_split("test", scores, predictions, training_args.output_dir, data_args.image_column,
                             trainer.is_world_process_zero(), prefix="baseline_test")
        # Validation last: the evaluations during training score against these references.
        return {**evaluate_split(trainer, metrics, inputs["validation"], references["validation"], "baseline")[0],
                **scores}

    baseline = BaselineScore(score_starting_model)
    if training_args.do_eval and training_args.do_train:
        trainer.add_callback(baseline)
    elif training_args.do_eval:
        results.update(baseline.take())

    # 4. Train; never keep a model worse than the starting one.
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        results.update({**baseline.metrics, **train_result.metrics})
        results.update(keep_never_worse(trainer, metrics, model_args, inputs["validation"], references["validation"],
                                        results))
        trainer.save_model()
        trainer.save_state()
        if trainer.is_world_process_zero():
            # The baseline is step 0 of the validation-CER curve.
            eval_rows = [{"step": 0, "eval_cer": results["baseline_cer"]}] if "baseline_cer" in results else []
            eval_rows += [row for row in trainer.state.log_history if "eval_cer" in row]
            write_training_curves(training_args.output_dir, eval_rows)

    # 5. Final scores: validation and test, generate-based, with predictions files.
    for role, enabled in (("validation", training_args.do_eval), ("test", training_args.do_predict)):
        if not enabled:
            continue
        scores, predictions = evaluate_split(trainer, metrics, inputs[role], references[role], RESULT_PREFIX[role])
        results.update(scores)
        run.report_split(role, scores, predictions, training_args.output_dir, data_args.image_column,
                         trainer.is_world_process_zero())

    # 6. Results, model card, processor and generation config beside the model; the Hub.
    if trainer.is_world_process_zero():
        results = finish_run(training_args.output_dir, model_args, data_args, results)
    if training_args.push_to_hub:
        # The output folder but its checkpoint-* folders: model, processor, generation config,
        # the model card above, results, predictions and TensorBoard logs (runs/).
        trainer.push_to_hub(commit_message="TrOCR fine-tuned with run_trocr.py")
        if trainer.is_world_process_zero():
            logger.info("Pushed %s to the Hub repo %s", training_args.output_dir, trainer.hub_model_id)
    # Every rank leaves the process group together: a gloo rank that exits with it still
    # open can abort at interpreter shutdown after all its work is done.
    trainer.accelerator.end_training()
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
