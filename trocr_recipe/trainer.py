"""The Seq2SeqTrainer of the reference recipe, repaired for VisionEncoderDecoderModel."""

import logging
import os

from transformers import Seq2SeqTrainer
from transformers.utils import SAFE_WEIGHTS_NAME

from .generation import generating_per_line
from .modeling import token_loss

logger = logging.getLogger("trocr_recipe")


def load_checkpoint_weights(model, checkpoint: str, **from_pretrained_kwargs) -> None:
    """Load a saved checkpoint's weights into `model` in place, strictly.

    transformers 5 saves ViT encoder weights under their legacy names and renames them only
    inside `from_pretrained`; Trainer's resume and load-best paths call `load_state_dict`
    on the raw file, which silently leaves the whole encoder untouched (every key is
    'missing' and 'unexpected'). Going through `from_pretrained` applies the renaming."""
    loaded = type(model).from_pretrained(checkpoint, **from_pretrained_kwargs)
    model.load_state_dict(loaded.state_dict(), strict=True)


def restore_starting_model(model, model_args, metric: str, best, baseline: float) -> None:
    """Training never beat the baseline: the run keeps the checkpoint it started from,
    and says so loudly."""
    logger.warning(
        "\n%s\nTRAINING NEVER BEAT THE BASELINE (best validation %s %s, baseline %.2f):\n"
        "the saved model is the starting checkpoint %s, not a trained one.\n%s",
        "!" * 78, metric.upper(), best, baseline, model_args.model_name_or_path, "!" * 78,
    )
    load_checkpoint_weights(
        model, model_args.model_name_or_path, revision=model_args.model_revision, cache_dir=model_args.cache_dir
    )


class OcrTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer with four repairs for VisionEncoderDecoderModel in transformers 5.

    The loss: the model's forward takes **kwargs, so the trainer assumes it normalizes
    by `num_items_in_batch` and neither divides by the accumulation steps nor undoes the
    multi-process scaling, while the model returns a plain per-batch mean: gradients come
    out accumulation-steps x processes too large. Here the loss is summed over tokens and
    divided by the step's token count, the normalization the trainer expects.

    DDP after an evaluation: train() wraps the model even when the baseline evaluation
    prepared it first (see train).

    Evaluation across processes: every line is scored once (see evaluation_loop).

    Speed, the same results: generation computes what the beams of a line share once per
    line and leaves finished lines out of the batch, and the evaluation loss reuses the
    encoder output of generation (see prediction_step); the per-step FLOP count does not
    walk the model's modules (see floating_point_ops).

    Checkpoints: resume and best-model loading go through `from_pretrained` for plain
    (non-DeepSpeed, non-FSDP) models; the trainer's own paths stay for sharded engines.
    `trainer_state.json` is the last file of a checkpoint on every process (it marks it
    complete, see trocr_recipe.checkpoints), and a run resumed from its last step does not
    train one step more.

    The Hub token: the trainer pickles its arguments into every `training_args.bin`, which
    push_to_hub uploads, `hub_token` included. It is moved out of the arguments into the
    process environment (`HF_TOKEN`, where huggingface_hub looks for it) once the repo exists."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # creates the Hub repo with args.hub_token (push_to_hub)
        # compute_loss below normalizes by num_items_in_batch: the trainer must count them.
        self.model_accepts_loss_kwargs = True
        self._parameter_count = None  # see floating_point_ops
        if self.args.hub_token:
            os.environ["HF_TOKEN"] = self.args.hub_token
            self.args.hub_token = None

    def train(self, *args, **kwargs):
        # accelerate (1.15) prepares a model once only (`_is_accelerate_prepared`). The
        # baseline evaluation before train() prepared it for evaluation, without DDP, so
        # train() would run each process on its own replica with unsynchronized gradients.
        if self.model is self.model_wrapped:
            self.model.__dict__.pop("_is_accelerate_prepared", None)
        output = super().train(*args, **kwargs)
        losses = [row["loss"] for row in self.state.log_history if "loss" in row]
        if self.state.global_step == getattr(self, "_initial_global_step", None) and losses:
            # No step in this call: train_loss is the run's, the mean of its logged losses (not 0).
            train_loss = sum(losses) / len(losses)
            output = output._replace(training_loss=train_loss, metrics={**output.metrics, "train_loss": train_loss})
        return output

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint at max_steps, the stock loop runs one step before it
        # checks max_steps (and saves checkpoint-<max_steps + 1>): stop before it instead.
        if 0 < self.state.max_steps <= self.state.global_step:
            logger.info("Resumed at step %d of max_steps=%d: nothing left to train", self.state.global_step,
                        self.state.max_steps)
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_rng_state(self, output_dir):
        # Process 0 writes trainer_state.json next, the mark of a complete checkpoint: every
        # process's rng_state_<i>.pth must be on disk before it.
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def floating_point_ops(self, inputs):
        # The total_flos statistic, every step: the stock method counts the parameters again
        # each time, walking every module (0.15 ms a step for the tiny model, about 1 ms for
        # TrOCR-small), which the plain loop does not pay. They do not change: counted once.
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        # Pixels as the model sees them: three channels, also for a one-channel uint8 batch.
        pixels = inputs[self.model.main_input_name]
        return 6 * pixels[:, :1].numel() * self.model.config.encoder.num_channels * self._parameter_count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)  # labels in: the model shifts them into decoder inputs itself
        loss = token_loss(outputs.logits, inputs["labels"], num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens; DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args, **kwargs):
        # Seq2SeqTrainer gathers generations with plain `gather`, which keeps the lines
        # repeated to even out the last batch across processes: they would be scored twice.
        self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        # Generation as the custom loop's (trocr_recipe.generation: what a line's beams share
        # computed once, finished lines out of the batch; the same sequences, several times
        # faster), and one encoder pass per batch for generation and evaluation loss together.
        with generating_per_line(self.model):
            return super().prediction_step(*args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """The run writes its own card, with the results in the Hub's model-index form,
        before pushing; the trainer's generic card would replace it."""

    def _plain_checkpoint(self, checkpoint: str) -> bool:
        return (
            not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME))
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._plain_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self):
        if not self._plain_checkpoint(self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_checkpoint_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)
