"""OcrTrainer against the transformers it runs on: the public hooks it goes through do what
its repairs need, and each private member it still overrides is there, with the signature
and the place in the loop it was written for (docs/compatibility.md, "## Trainer")."""

import inspect
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from accelerate.utils import DistributedType
from transformers import (
    EvalPrediction, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerState, TrOCRConfig, ViTConfig,
    VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
)
from transformers.trainer_pt_utils import LabelSmoother

from trocr_recipe.metrics import GeneratedTextMetrics
from trocr_recipe.modeling import token_loss
from trocr_recipe.trainer import (
    BaselineScore, OcrTrainer, TrainStart, step_token_loss, trains_unsynchronized_replicas,
)

TESTED = (f"found in transformers {transformers.__version__}; tested with transformers 5.23.0 and 5.24.0, "
          "accelerate 1.15.0 (docs/compatibility.md, '## Trainer')")

# Trainer members OcrTrainer overrides whose signature or call pattern it depends on.
OVERRIDDEN = {
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],  # private
    "_load_best_model": ["self"],  # private
    "_save_rng_state": ["self", "output_dir"],  # private
    "get_batch_samples": ["self", "epoch_iterator", "num_batches", "device"],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
}


def _model() -> VisionEncoderDecoderModel:
    """A ViT + TrOCR model small enough to build in a test, dropout off."""
    encoder = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    decoder = TrOCRConfig(vocab_size=40, d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                          max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, dropout=0.0)
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    model.config.decoder_start_token_id, model.config.pad_token_id = 2, 1
    return model


def _batch(seed: int, lengths: list[int]) -> dict:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full((len(lengths), max(lengths)), -100)
    for row, length in enumerate(lengths):
        labels[row, :length] = torch.randint(3, 40, (length,), generator=generator)
    return {"pixel_values": torch.randn(len(lengths), 3, 32, 32, generator=generator), "labels": labels}


def _args(tmp_path, **kwargs) -> Seq2SeqTrainingArguments:
    return Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_overridden_trainer_members_keep_their_signatures(name):
    member = getattr(Trainer, name, None)
    assert member is not None, f"Trainer.{name} no longer exists: OcrTrainer.{name} is never called ({TESTED})"
    parameters = list(inspect.signature(member).parameters)
    assert parameters == OVERRIDDEN[name], (
        f"Trainer.{name}{inspect.signature(member)} changed: OcrTrainer.{name} takes {OVERRIDDEN[name]} ({TESTED})")


def test_rng_files_come_before_trainer_state_in_a_checkpoint():
    """OcrTrainer._save_rng_state waits for every process there; it only helps if the trainer
    state is written after it."""
    source = inspect.getsource(Trainer._save_checkpoint)
    assert "self._save_rng_state(" in source and "save_to_json(" in source, (
        f"Trainer._save_checkpoint no longer calls _save_rng_state then state.save_to_json ({TESTED})")
    assert source.index("self._save_rng_state(") < source.index("save_to_json("), (
        f"Trainer._save_checkpoint writes trainer_state.json before _save_rng_state ({TESTED})")


def test_checkpoint_loads_still_go_through_the_overridden_methods():
    assert "self._load_from_checkpoint(resume_from_checkpoint)" in inspect.getsource(Trainer.train), (
        f"Trainer.train no longer loads a resumed model with _load_from_checkpoint ({TESTED})")
    assert "self._load_best_model()" in inspect.getsource(Trainer), (
        f"Trainer no longer loads the best model with _load_best_model ({TESTED})")


@pytest.mark.parametrize("method", ["_load_from_checkpoint", "_load_best_model"])
def test_checkpoint_loading_repair_loads_the_encoder_the_stock_method_leaves(method, tmp_path):
    saved = _model()
    saved.save_pretrained(tmp_path / "checkpoint")
    loaded = {}
    for trainer_class in (Seq2SeqTrainer, OcrTrainer):
        model = _model()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        trainer = trainer_class(model=model, args=_args(tmp_path / "out"))
        if method == "_load_from_checkpoint":
            trainer._load_from_checkpoint(str(tmp_path / "checkpoint"))
        else:
            trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint")
            trainer._load_best_model()
        loaded[trainer_class] = model.state_dict()
    expected = saved.state_dict()
    assert all(torch.equal(loaded[OcrTrainer][name], expected[name]) for name in expected)
    encoder = [name for name in expected if name.startswith("encoder.")]
    assert not all(torch.equal(loaded[Seq2SeqTrainer][name], expected[name]) for name in encoder), (
        f"Seq2SeqTrainer.{method} now loads a ViT encoder whole: OcrTrainer.{method} may go ({TESTED})")


def test_loss_is_the_token_mean_of_the_whole_accumulated_step(tmp_path):
    """The trainer counts the step's label tokens for `compute_loss_func` and leaves the loss
    undivided by the accumulation steps: two micro-batches add up to the step's token mean."""
    model = _model().train()
    trainer = OcrTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2))
    batches = [_batch(1, [5, 2]), _batch(2, [7, 3])]
    samples, num_items = trainer.get_batch_samples(iter(batches), 2, trainer.args.device)
    assert num_items is not None and int(num_items) == 17, "Trainer no longer counts the step's label tokens"
    step_loss = sum(float(trainer.training_step(model, batch, num_items)) for batch in samples)
    with torch.no_grad():
        summed = sum(float(token_loss(model(**batch).logits, batch["labels"], 1)) for batch in batches)
    assert step_loss == pytest.approx(summed / 17, rel=1e-5)


def test_loss_with_label_smoothing_is_the_trainers(tmp_path):
    """label_smoothing_factor reaches the loss, smoothed as the trainer's LabelSmoother does."""
    model = _model().eval()
    batch = _batch(3, [6, 4, 1])
    with torch.no_grad():
        outputs = model(**batch)
    trainer = OcrTrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1))
    expected = LabelSmoother(epsilon=0.1)(outputs, batch["labels"])
    assert float(trainer.compute_loss_func(outputs, batch["labels"])) == pytest.approx(float(expected), rel=1e-5)
    assert float(step_token_loss(0.0)(outputs, batch["labels"])) != pytest.approx(float(expected), rel=1e-5)


def test_no_batch_is_drawn_once_max_steps_is_reached(tmp_path):
    trainer = OcrTrainer(model=_model(), args=_args(tmp_path))
    trainer.state.max_steps, trainer.state.global_step = 8, 8
    batches = iter([_batch(1, [3]), _batch(2, [3])])
    assert trainer.get_batch_samples(batches, 1, trainer.args.device) == ([], None)
    assert trainer.control.should_training_stop
    trainer.state.global_step = 7
    (batch,), _ = trainer.get_batch_samples(batches, 1, trainer.args.device)
    assert torch.equal(batch["labels"], _batch(1, [3])["labels"])  # nothing was drawn at step 8


def test_resumed_at_max_steps_neither_evaluates_nor_saves_again(caplog):
    caplog.set_level(logging.INFO, logger="trocr_recipe")
    start, state = TrainStart(SimpleNamespace(accelerator=SimpleNamespace(num_processes=1))), TrainerState()
    state.max_steps, state.global_step = 8, 8
    control = SimpleNamespace(should_evaluate=True, should_save=True)
    start.on_train_begin(None, state, control)
    start.on_epoch_end(None, state, control)
    assert not control.should_evaluate and not control.should_save
    assert "nothing left to train" in caplog.text


def test_training_unsynchronized_replicas_is_refused():
    model, ddp = object(), object()

    def trainer(processes, kind, wrapped):
        return SimpleNamespace(accelerator=SimpleNamespace(num_processes=processes, distributed_type=kind),
                               model=model, model_wrapped=wrapped)

    assert trains_unsynchronized_replicas(trainer(2, DistributedType.MULTI_CPU, model))
    assert not trains_unsynchronized_replicas(trainer(2, DistributedType.MULTI_GPU, ddp))
    assert not trains_unsynchronized_replicas(trainer(1, DistributedType.NO, model))
    assert not trains_unsynchronized_replicas(trainer(2, DistributedType.DEEPSPEED, model))
    with pytest.raises(RuntimeError, match="2 unsynchronized copies"):
        TrainStart(trainer(2, DistributedType.MULTI_CPU, model)).on_train_begin(None, TrainerState(), None)


def test_on_train_begin_comes_after_the_model_is_wrapped_and_before_any_step():
    """BaselineScore and TrainStart run in on_train_begin: after DDP wrapping, before step 1."""
    source = inspect.getsource(Trainer._inner_training_loop)
    places = [source.find(call) for call in ("_prepare_for_training(", "on_train_begin(", "_run_epoch(")]
    assert -1 not in places and places == sorted(places), (
        f"Trainer._inner_training_loop no longer calls on_train_begin between _prepare_for_training and "
        f"_run_epoch ({TESTED})")


def test_baseline_is_taken_once_and_a_resumed_run_reports_its_first_starts(caplog):
    scores = {"baseline_cer": 12.5, "baseline_wer": 30.0}
    calls = []
    first, state = BaselineScore(lambda: calls.append(1) or dict(scores)), TrainerState()
    first.on_train_begin(None, state, None)
    assert calls == [1] and first.metrics == scores
    assert state.log_history == [{**scores, "step": 0}]

    resumed = TrainerState(global_step=8, log_history=state.log_history + [{"loss": 1.0, "step": 1}])
    again = BaselineScore(lambda: pytest.fail("the resumed checkpoint was scored as the baseline"))
    again.on_train_begin(None, resumed, None)
    assert again.metrics == scores

    unrecorded = BaselineScore(lambda: pytest.fail("the resumed checkpoint was scored as the baseline"))
    unrecorded.on_train_begin(None, TrainerState(global_step=8), None)
    assert unrecorded.metrics == {} and "records no baseline score" in caplog.text


def test_metrics_score_each_line_once_when_gathered_rows_repeat(processor):
    """Seq2SeqTrainer gathers generations with plain `gather`: over two processes the rows
    repeated to even out the last batch come after the last line."""
    tokenizer = processor.tokenizer
    references = ["hey presto !", "You 're a star .", "one more"]
    ids = [[tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] for text in references]
    ids.append(ids[0])  # the repeat of the first line
    width = max(map(len, ids))
    padded = np.array([row + [-100] * (width - len(row)) for row in ids])
    metrics = GeneratedTextMetrics(tokenizer, references)
    assert metrics(EvalPrediction(predictions=padded, label_ids=None)) == {"cer": 0.0, "wer": 0.0}
    assert metrics.predictions == references
    with pytest.raises(ValueError, match="2 generated rows for 3 references"):
        metrics(EvalPrediction(predictions=padded[:2], label_ids=None))
