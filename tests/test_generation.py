"""trocr_recipe.generation.generate gives the sequences of model.generate, one line at a
time or batched, greedy or beam search, with and without the encoder-to-decoder projection,
while finished lines leave the batch; OcrTrainer's evaluation step uses it. Where upstream
changes what it relies on, the part it affects fails its proof on first use (a tiny model of
the same configuration), and stays off: it warns, counts and still gives model.generate's
sequences."""

import contextlib
import functools
import inspect
import json
import warnings
from collections import Counter

import pytest
import torch
import transformers
from transformers import (
    EncoderDecoderCache, GenerationMixin, LogitsProcessor, LogitsProcessorList, Seq2SeqTrainer,
    Seq2SeqTrainingArguments, TrOCRConfig, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
)
from transformers.models.trocr.modeling_trocr import TrOCRAttention

from trocr_recipe import generation, generation_proof
from trocr_recipe.generation import generate, generating_per_line
from trocr_recipe.generation_proof import LENGTHS, EndAt, Scores
from trocr_recipe.trainer import OcrTrainer


@pytest.fixture(autouse=True)
def fallbacks(monkeypatch):
    """A fresh fallback counter, warning memory and proofs per test; every test expects no
    fallback unless it says so."""
    monkeypatch.setattr(generation_proof, "PROOFS", {})
    monkeypatch.setattr(generation, "FALLBACKS", Counter())
    monkeypatch.setattr(generation, "_WARNED", set())
    monkeypatch.delenv(generation.SWITCH, raising=False)
    return generation.FALLBACKS


def _model(encoder_width: int) -> VisionEncoderDecoderModel:
    encoder = ViTConfig(image_size=32, patch_size=8, hidden_size=encoder_width, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=2 * encoder_width)
    decoder = TrOCRConfig(vocab_size=40, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                          max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2)
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = 2, 2, 1
    return model.eval()


def _autocast(model) -> VisionEncoderDecoderModel:
    """Mixed precision as accelerate sets it up: the model's forward under autocast."""
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    return model


@pytest.mark.parametrize("encoder_width", [32, 24])  # 24: enc_to_dec_proj, as TrOCR-small and -base
@pytest.mark.parametrize("num_beams", [1, 3, 4])
@pytest.mark.parametrize("bf16", [False, True])
def test_same_sequences_as_model_generate(encoder_width, num_beams, bf16, fallbacks):
    model = _autocast(_model(encoder_width)) if bf16 else _model(encoder_width)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_beams=num_beams, max_length=12, early_stopping=num_beams > 1)
    with torch.no_grad():
        one_at_a_time = [model.generate(pixel_values=pixels[i:i + 1], **kwargs)[0] for i in range(len(pixels))]
        batched = generate(model, pixels, **kwargs)
    assert [row.tolist() for row in batched] == [row.tolist() for row in one_at_a_time]
    # The decoder's attention modules are back to TrOCR's own afterwards, and nothing fell back.
    assert all("forward" not in vars(layer.encoder_attn) for layer in model.decoder.model.decoder.layers)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not fallbacks, f"fast path off on transformers {transformers.__version__}: {dict(fallbacks)}"


def test_routed_model_generate_is_restored():
    model = _model(24)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.generate(pixel_values=pixels, num_beams=2, max_length=8)
        with generating_per_line(model):
            routed = model.generate(pixel_values=pixels, num_beams=2, max_length=8)
    assert torch.equal(routed, expected)
    assert "generate" not in vars(model) and not model._forward_pre_hooks




@functools.lru_cache
def _stock_lines(num_beams: int, bf16: bool) -> list[list[int]]:
    """model.generate one line at a time on the lines that end at LENGTHS (the same weights
    in every test: `_model` seeds them; `_stock_lines.__wrapped__` where upstream changed)."""
    model, expected = _autocast(_model(24)) if bf16 else _model(24), []
    with torch.no_grad():
        for i, length in enumerate(LENGTHS):
            processor = LogitsProcessorList([EndAt([length], num_beams)])
            expected.append(model.generate(pixel_values=_PIXELS[i:i + 1], logits_processor=processor,
                                           **_ending_kwargs(num_beams))[0].tolist())
    return expected


def _ending_kwargs(num_beams: int) -> dict:
    return dict(num_beams=num_beams, max_length=16, early_stopping=num_beams > 1)


_PIXELS = torch.randn(len(LENGTHS), 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _ending_lines(model, num_beams: int, bf16: bool = False, stock=_stock_lines) -> tuple[list, list, list[int]]:
    """Lines that end at LENGTHS: `generate` on the batch, with the rows of each decoder step
    (padding dropped), and model.generate one line at a time."""
    rows = []
    hook = model.decoder.register_forward_pre_hook(lambda module, args, kw: rows.append(len(kw["input_ids"])),
                                                   with_kwargs=True)
    with torch.no_grad():
        batched = generate(model, _PIXELS, logits_processor=LogitsProcessorList([EndAt(LENGTHS, num_beams)]),
                           **_ending_kwargs(num_beams))
    hook.remove()
    return [row[row != 1].tolist() for row in batched], stock(num_beams, bf16), rows


def _assert_same_scores(model, num_beams: int) -> None:
    """Every row still decoded scores as in model.generate on the batch, step by step (the
    rows left out get zero logits: equal scores). Sequences alone would not show a cache
    reordered wrongly: a random model's tokens hardly depend on it."""
    steps = {}
    for path in ("stock", "ours"):
        scores = Scores()
        processors = LogitsProcessorList([scores, EndAt(LENGTHS, num_beams)])
        with torch.no_grad():
            if path == "ours":
                generate(model, _PIXELS, logits_processor=processors, **_ending_kwargs(num_beams))
            else:
                model.generate(pixel_values=_PIXELS, logits_processor=processors, **_ending_kwargs(num_beams))
        steps[path] = scores.steps
    assert generation_proof.same_scores(steps["ours"], steps["stock"], atol=1e-5)


def _lines_left(rows: list[int], num_beams: int) -> bool:
    """All lines at first; once a quarter of them are done, only those still being decoded."""
    assert rows[0] == len(LENGTHS) * num_beams
    return rows[-1] == num_beams and sum(rows) < 0.6 * len(rows) * len(LENGTHS) * num_beams


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_finished_lines_leave_the_batch(num_beams, bf16, fallbacks):
    model = _autocast(_model(24)) if bf16 else _model(24)
    stock_forward = vars(model).get("forward")
    batched, expected, rows = _ending_lines(model, num_beams, bf16)
    assert batched == expected
    assert [len(row) for row in batched] == [length + 1 for length in LENGTHS]  # start token + text + </s>
    assert _lines_left(rows, num_beams), rows
    _assert_same_scores(model, num_beams)
    assert not fallbacks, f"fast path off on transformers {transformers.__version__}: {dict(fallbacks)}"
    assert "_check_early_stop_heuristic" not in vars(model)
    assert vars(model).get("forward") is (stock_forward if bf16 else None)


def test_generate_gets_a_cache_that_reorders_only_self_attention(monkeypatch):
    """The cache goes to generate under the forward's keyword (`cache` from transformers 5.24,
    `past_key_values` before); beam search calls its reorder_cache, a method of its class."""
    model, caches = _model(24), []
    generation_proof.proven(model, True, generation.run)  # before the spies below
    stock_generate = model.generate

    def spy(**kwargs):
        caches.extend((name, value) for name, value in kwargs.items() if name in generation.CACHE_KEYWORDS)
        return stock_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    reorders = []
    monkeypatch.setattr(EncoderDecoderCache, "reorder_cache", lambda cache, beam_idx: reorders.append(cache))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        generate(model, pixels, num_beams=3, max_length=6)
    (name, cache), = caches
    assert name == ("past_key_values" if transformers.__version__.startswith("5.23.") else "cache")
    assert isinstance(cache, EncoderDecoderCache) and "reorder_cache" not in vars(cache)
    assert cache.reorders > 0 and not reorders  # its own reorder_cache, not EncoderDecoderCache's
    assert cache.cross_attention_cache.get_seq_length() == 0  # never filled: per-line keys and values instead


# What trocr_recipe.generation uses of transformers beyond its public API (docs/compatibility.md,
# "## Generation"): each test below names the member upstream changed when it fails.
def test_beam_search_early_stop_member():
    member, version = generation.EARLY_STOP, transformers.__version__
    assert hasattr(GenerationMixin, member), f"GenerationMixin.{member} is gone in transformers {version}"
    parameters = inspect.signature(getattr(GenerationMixin, member)).parameters
    for name in generation.EARLY_STOP_ARGUMENTS:
        assert name in parameters, f"GenerationMixin.{member} has no parameter {name} in transformers {version}"


def test_cache_members():
    version = transformers.__version__
    for name in ("reorder_cache", "batch_select_indices"):
        assert callable(getattr(EncoderDecoderCache, name, None)), f"EncoderDecoderCache.{name} is gone in {version}"
    assert generation._cache_keyword(_model(24)) is not None, (
        f"VisionEncoderDecoderModel.forward takes none of {generation.CACHE_KEYWORDS} in transformers {version}")


def test_trocr_cross_attention_members():
    version = transformers.__version__
    attention = _model(24).decoder.model.decoder.layers[0].encoder_attn
    assert isinstance(attention, TrOCRAttention), f"TrOCRDecoderLayer.encoder_attn is no TrOCRAttention in {version}"
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scaling", "dropout"):
        assert hasattr(attention, name), f"TrOCRAttention.{name} is gone in transformers {version}"
    assert list(inspect.signature(TrOCRAttention.forward).parameters)[1] == "hidden_states", (
        f"TrOCRAttention.forward's first argument is no longer hidden_states in transformers {version}")


def _unknown_cache_keyword(monkeypatch):
    monkeypatch.setattr(generation, "CACHE_KEYWORDS", ("kv_cache",))


def _early_stop_renamed(monkeypatch):
    monkeypatch.setattr(generation, "EARLY_STOP", "_check_early_stop")


def _early_stop_never_called(monkeypatch):
    """The member renamed upstream, the old name kept but no longer called by beam search."""
    old = staticmethod(GenerationMixin._check_early_stop_heuristic)
    monkeypatch.setattr(GenerationMixin, "_old_check", old, raising=False)
    monkeypatch.setattr(generation, "EARLY_STOP", "_old_check")


def _reordered_by_the_model(monkeypatch):
    """generate prefers a model's own `_reorder_cache`: the cache's reorder_cache is never called."""
    def reorder(cache, beam_idx):
        EncoderDecoderCache.reorder_cache(cache, beam_idx)
        return cache
    monkeypatch.setattr(VisionEncoderDecoderModel, "_reorder_cache", staticmethod(reorder), raising=False)


def _cross_attention_not_through_forward(monkeypatch):
    """The decoder calling TrOCRAttention's class function, not the module's forward attribute."""
    def call(self, *args, **kwargs):
        return TrOCRAttention.forward(self, *args, **kwargs)
    monkeypatch.setattr(TrOCRAttention, "__call__", call)


def _cross_attention_arithmetic_changed(monkeypatch):
    """TrOCRAttention computing cross-attention otherwise: every hook still called, the
    per-line arithmetic no longer the decoder's."""
    stock = TrOCRAttention.forward

    def changed(self, hidden_states, key_value_states=None, **kwargs):
        output, weights = stock(self, hidden_states, key_value_states=key_value_states, **kwargs)
        return (output if key_value_states is None else 2 * output), weights
    monkeypatch.setattr(TrOCRAttention, "forward", changed)


@contextlib.contextmanager
def _no_warning():
    """Fails if trocr_recipe.generation warns inside the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [warning for warning in caught if "trocr_recipe.generation" in str(warning.message)]


# change, the part it turns off, whether greedy search is affected, whether lines still leave the batch
UPSTREAM_CHANGES = [
    (_unknown_cache_keyword, "leaving finished lines out", True, False),
    (_cross_attention_not_through_forward, "per-line cross-attention", True, True),
    (_cross_attention_arithmetic_changed, "per-line cross-attention", True, True),
    (_early_stop_renamed, "_check_early_stop", False, False),  # beam search only
    (_early_stop_never_called, "_old_check", False, False),
    (_reordered_by_the_model, "leaving finished lines out", False, False),
]


@pytest.mark.parametrize("change, part, greedy_too, lines_leave", UPSTREAM_CHANGES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_upstream_change_warns_counts_and_keeps_the_sequences(change, part, greedy_too, lines_leave, num_beams,
                                                              monkeypatch, fallbacks):
    """A simulated upstream change: the part it affects fails its proof; the sequences of
    model.generate, a warning naming the transformers version and the part off (once per
    process) and a count per generate call; the other parts still on. Greedy search needs
    no beam search member."""
    model = _model(24)
    change(monkeypatch)
    stock = _stock_lines.__wrapped__ if change is _cross_attention_arithmetic_changed else _stock_lines
    if num_beams == 1 and not greedy_too:
        with _no_warning():
            batched, expected, rows = _ending_lines(model, num_beams, stock=stock)
        assert batched == expected and _lines_left(rows, num_beams) and not fallbacks
        return
    with pytest.warns(RuntimeWarning, match=f"transformers {transformers.__version__}: .*{part}.* off"):
        batched, expected, rows = _ending_lines(model, num_beams, stock=stock)
    assert batched == expected
    assert _lines_left(rows, num_beams) is lines_leave
    assert list(fallbacks.values()) == [1] and part in next(iter(fallbacks)), dict(fallbacks)
    with _no_warning():  # warned once per process, counted at every call
        assert _ending_lines(model, num_beams, stock=stock)[0] == expected
    assert list(fallbacks.values()) == [2]
    assert not model._forward_hooks and not model._forward_pre_hooks and "generate" not in vars(model)


def _engaged_parts(batch, beam: bool) -> set:
    """The parts that took effect in a generate call, seen from what its hooks did."""
    leave_out = batch.leave_out and (batch.cache.reorders > 0 if beam else batch.lines_left())
    return {part for part, engaged in [("per_line", batch.attends > 0), ("leave_out", leave_out),
                                       ("early_stop", batch.watched > 0 and batch.lines_left())] if engaged}


@pytest.mark.parametrize("failing", [None, "per_line", "leave_out", "early_stop"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_part_engages_exactly_when_its_proof_holds(failing, num_beams, monkeypatch, fallbacks):
    """Whatever the proof says of each part (here: one part's verdict made to fail), that part
    is on exactly when it is proven, counted when it is not, and the sequences are stock."""
    verdict, beam, runs = generation_proof._verdict, num_beams > 1, []
    monkeypatch.setattr(generation_proof, "_verdict",
                        lambda part, *args: "simulated" if part == failing else verdict(part, *args))
    model, stock_run = _model(24), generation.run

    def spy(run_model, *args):
        sequences, batch = stock_run(run_model, *args)
        runs.extend([batch] if run_model is model else [])  # not the proof's tiny model
        return sequences, batch

    monkeypatch.setattr(generation, "run", spy)
    batched, expected, rows = _ending_lines(model, num_beams)
    assert batched == expected
    proof = generation_proof.proven(model, beam, stock_run)  # made at the call above, kept
    proven = {part for part, reason in proof.items() if reason is None}
    assert proven == set(generation_proof.PARTS[beam]) - {failing} - ({"early_stop"} if failing == "leave_out" else set())
    (batch,) = runs
    assert _engaged_parts(batch, beam) == proven
    off = set(proof) - proven
    assert set(fallbacks) == {generation._label(part) for part in off} and all(n == 1 for n in fallbacks.values())


def test_proven_once_per_configuration_leaving_the_random_state(monkeypatch):
    """The proof runs at the first call per configuration and search (greedy, beam) and
    draws its tiny model's weights without moving the caller's random state."""
    proofs = []
    prove = generation_proof._prove
    monkeypatch.setattr(generation_proof, "_prove", lambda *args, **kwargs: proofs.append(args) or prove(*args, **kwargs))
    with torch.no_grad():
        for width, num_beams in [(24, 1), (24, 1), (24, 2), (32, 2), (24, 2)]:
            model, state = _model(width), torch.get_rng_state()
            generate(model, _PIXELS[:2], num_beams=num_beams, max_length=6)
            assert torch.equal(torch.get_rng_state(), state)
    assert [(width, beam) for _, _, width, beam, _ in proofs] == [(24, False), (24, True), (32, True)]
    assert all(reason is None for proof in generation_proof.PROOFS.values() for reason in proof.values())


@pytest.mark.parametrize("off, lines_leave", [("early_stop", {1: True, 3: False}), ("leave_out", {1: False, 3: False}),
                                              ("per_line", {1: True, 3: True})])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_parts_switched_off_keep_the_sequences(off, lines_leave, num_beams, monkeypatch, fallbacks):
    """TROCR_GENERATION_OFF (for measuring each part): the same sequences, nothing counted."""
    monkeypatch.setenv(generation.SWITCH, off)
    model = _model(24)
    batched, expected, rows = _ending_lines(model, num_beams)
    assert batched == expected
    assert _lines_left(rows, num_beams) is lines_leave[num_beams]
    _assert_same_scores(model, num_beams)
    assert not fallbacks


def test_unknown_part_switched_off_is_an_error(monkeypatch):
    monkeypatch.setenv(generation.SWITCH, "early-stop")
    with pytest.raises(ValueError, match="early-stop"):
        generate(_model(24), _PIXELS[:2], num_beams=2, max_length=4)


def test_trainer_prediction_step_runs_the_encoder_once(tmp_path):
    """OcrTrainer's evaluation step: the sequences and evaluation loss of Seq2SeqTrainer's,
    with one encoder pass per batch where the stock step makes two (generate, then the loss)."""
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100], [5, 2, -100, -100], [7, 7, 7, 2]])
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, report_to=[], use_cpu=True)
    results = {}
    for trainer_class in (Seq2SeqTrainer, OcrTrainer):
        model = _model(24)  # the same weights; a fresh generation config (the step sets its defaults)
        trainer = trainer_class(model=model, args=args)
        passes = []
        hook = model.encoder.register_forward_hook(lambda *_: passes.append(1))
        loss, generated, _ = trainer.prediction_step(model, {"pixel_values": pixels, "labels": labels},
                                                     prediction_loss_only=False, num_beams=2, max_length=10)
        hook.remove()
        results[trainer_class] = loss, generated, len(passes)
    (stock_loss, stock_generated, stock_passes), (loss, generated, passes) = results.values()
    assert torch.equal(generated, stock_generated)
    assert torch.allclose(loss, stock_loss, atol=1e-6)
    assert (stock_passes, passes) == (2, 1)
    assert "forward" not in vars(model) and "generate" not in vars(model)


def test_a_run_with_a_fallback_says_so_in_all_results(tiny_args, tmp_path, monkeypatch):
    """A whole run (run_trocr.py, one step) where the forward takes the cache under an unknown keyword."""
    import run_trocr

    _unknown_cache_keyword(monkeypatch)
    with pytest.warns(RuntimeWarning, match="leaving finished lines out"):
        run_trocr.main(tiny_args + ["--max_steps", "1", "--do_predict", "false"])
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["generation_fast_path_fallbacks"] >= 2  # the baseline and the validation after the step
