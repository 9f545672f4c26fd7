"""The Seq2SeqTrainer of the reference recipe, repaired for VisionEncoderDecoderModel.

Each repair, the Trainer hook it goes through and the test that covers it are listed in
docs/compatibility.md ("## Trainer"), with the few private members still overridden."""

from . import recipe_only  # noqa: F401, I001  (first: an older transformers is named at import)

import logging
import os

from transformers import Seq2SeqTrainer, TrainerCallback
from transformers.utils import SAFE_WEIGHTS_NAME

from .checkpoints import load_checkpoint_weights
from .generation import generating_per_line
from .modeling import token_loss

logger = logging.getLogger("trocr_recipe")

BASELINE = "baseline"  # metric prefix of the starting model's scores


def step_token_loss(label_smoothing: float = 0.0):
    """The trainer's `compute_loss_func`: cross-entropy summed over the label tokens and divided
    by those of the whole optimizer step (`num_items_in_batch`), as fairseq's TrOCR did, with
    the recipe's label smoothing (tests/test_trainer_compat.py::test_loss_*)."""

    def loss(outputs, labels, num_items_in_batch=None):
        return token_loss(outputs.logits, labels, num_items_in_batch, label_smoothing)

    return loss


def trains_unsynchronized_replicas(trainer) -> bool:
    """Several DDP processes, and train() left the model unwrapped: a model prepared for
    evaluation before train() is never wrapped in DDP, accelerate prepares a model once
    (tests/test_trainer_compat.py::test_training_unsynchronized_replicas_is_refused)."""
    accelerator = trainer.accelerator
    return (
        accelerator.num_processes > 1
        and accelerator.distributed_type.name.startswith("MULTI_")
        and not getattr(trainer, "is_distributed_loading_by_transformers", False)  # tensor parallel: no DDP
        and trainer.model_wrapped is trainer.model
    )


class TrainStart(TrainerCallback):
    """Where a train() call starts: the step it resumes at (for its train_loss), nothing more
    to train when that is max_steps (tests/test_resume.py), no unsynchronized replicas."""

    def __init__(self, trainer):
        self.trainer, self.step = trainer, None

    @staticmethod
    def nothing_left(state) -> bool:
        return 0 < state.max_steps <= state.global_step

    def on_train_begin(self, args, state, control, **kwargs):
        if trains_unsynchronized_replicas(self.trainer):
            raise RuntimeError(
                f"train() would run {self.trainer.accelerator.num_processes} unsynchronized copies of the model: it "
                "was prepared for evaluation before train() (evaluate() or predict()), and accelerate prepares a "
                "model once. Evaluate the starting model from inside train() instead (BaselineScore)."
            )
        self.step = state.global_step
        if self.nothing_left(state):
            logger.info("Resumed at step %d of max_steps=%d: nothing left to train", state.global_step, state.max_steps)

    def on_epoch_end(self, args, state, control, **kwargs):
        # Resumed at max_steps: no evaluation or checkpoint again, the resumed checkpoint has them.
        if state.global_step == self.step and self.nothing_left(state):
            control.should_evaluate = control.should_save = False


class BaselineScore(TrainerCallback):
    """The starting model's scores (`baseline_*`), taken as train() begins: after the trainer
    wrapped the model in DDP, before any update (tests/test_distributed.py). Kept in the
    trainer state, so a resumed run reports those of its first start
    (tests/test_trainer_compat.py::test_baseline_is_taken_once_and_a_resumed_run_reports_its_first_starts)."""

    def __init__(self, evaluate):
        self.evaluate, self.metrics = evaluate, {}

    def take(self) -> dict:
        """Evaluate now (a run that does not train)."""
        self.metrics = self.evaluate()
        logger.info("Baseline validation CER %.2f", self.metrics[f"{BASELINE}_cer"])
        return self.metrics

    def on_train_begin(self, args, state, control, **kwargs):
        recorded = [row for row in state.log_history if f"{BASELINE}_cer" in row]
        if recorded:
            self.metrics = {key: value for key, value in recorded[0].items() if key.startswith(f"{BASELINE}_")}
            logger.info("Baseline validation CER %.2f (taken at the run's first start)",
                        self.metrics[f"{BASELINE}_cer"])
        elif state.global_step:
            logger.warning("The resumed checkpoint records no baseline score: the run reports none, and keeps "
                           "its best checkpoint without comparing it with the starting model")
        else:
            state.log_history.append({**self.take(), "step": state.global_step})


class OcrTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer with the repairs VisionEncoderDecoderModel needs in transformers 5
    (docs/compatibility.md, "## Trainer")."""

    # compute_loss divides by the label tokens of the whole step: no division by the steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        if kwargs.get("compute_loss_func") is None:
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            kwargs["compute_loss_func"] = step_token_loss(getattr(training_args, "label_smoothing_factor", 0.0))
        super().__init__(*args, **kwargs)  # creates the Hub repo with args.hub_token (push_to_hub)
        self._parameter_count = None  # see floating_point_ops
        self.train_start = TrainStart(self)
        self.add_callback(self.train_start)
        if self.args.hub_token:
            self.keep_hub_token_out_of_the_arguments()

    def keep_hub_token_out_of_the_arguments(self) -> None:
        """The trainer pickles its arguments into every `training_args.bin`, which push_to_hub
        uploads: the token moves to `HF_TOKEN`, where huggingface_hub looks for it."""
        os.environ["HF_TOKEN"] = self.args.hub_token
        self.args.hub_token = None
        logger.info("hub_token: moved from the training arguments to HF_TOKEN (training_args.bin is uploaded)")

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        losses = [row["loss"] for row in self.state.log_history if "loss" in row]
        if self.state.global_step == self.train_start.step and losses:
            # No step in this call: train_loss is the run's, the mean of its logged losses (not 0).
            train_loss = sum(losses) / len(losses)
            output = output._replace(training_loss=train_loss, metrics={**output.metrics, "train_loss": train_loss})
        return output

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """No batch once max_steps is reached: the stock loop takes a step before it checks
        max_steps, so a run resumed at its last step would train one more (tests/test_resume.py)."""
        if TrainStart.nothing_left(self.state):
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The labels go into the model, which builds the decoder inputs from them (the stock
        method hands them to `compute_loss_func` only); the loss is `compute_loss_func`'s
        (tests/test_no_trainer.py: the plain loop's losses, step by step)."""
        outputs = model(**inputs)
        loss = self.compute_loss_func(outputs, inputs["labels"], num_items_in_batch=num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens; DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs):
        """The total_flos statistic with the parameters counted once: the stock method walks
        every module at every step (its cost: docs/speed.md), which the plain loop does not."""
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        # Pixels as the model sees them: three channels, also for a one-channel uint8 batch.
        pixels = inputs[self.model.main_input_name]
        return 6 * pixels[:, :1].numel() * self.model.config.encoder.num_channels * self._parameter_count

    def prediction_step(self, *args, **kwargs):
        """Generation as the custom loop's (trocr_recipe.generation: the same sequences,
        several times faster), one encoder pass for generation and evaluation loss together."""
        with generating_per_line(self.model):
            return super().prediction_step(*args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """The run writes its own card, with the results in the Hub's model-index form,
        before pushing; the trainer's generic card would replace it."""

    def _save_rng_state(self, output_dir):
        """Private (docs/compatibility.md): every process's RNG file is on disk before process 0
        writes trainer_state.json, the mark of a complete checkpoint (tests/test_trainer_compat.py)."""
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def _plain_checkpoint(self, checkpoint: str) -> bool:
        return (
            not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME))
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Private (docs/compatibility.md): a resumed plain model loads through from_pretrained,
        the encoder included (tests/test_trainer_compat.py)."""
        if not self._plain_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self):
        """Private (docs/compatibility.md): the best checkpoint loads through from_pretrained,
        the encoder included (tests/test_trainer_compat.py)."""
        if not self._plain_checkpoint(self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_checkpoint_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)
