"""trocr_recipe.generation.generate gives the sequences of model.generate, one line at a
time or batched, greedy or beam search, with and without the encoder-to-decoder projection,
while finished lines leave the batch; OcrTrainer's evaluation step uses it."""

import math

import pytest
import torch
from transformers import (
    LogitsProcessor, LogitsProcessorList, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrOCRConfig, ViTConfig,
    VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
)

from trocr_recipe.generation import generate, generating_per_line
from trocr_recipe.trainer import OcrTrainer


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


@pytest.mark.parametrize("encoder_width", [32, 24])  # 24: enc_to_dec_proj, as TrOCR-small and -base
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_same_sequences_as_model_generate(encoder_width, num_beams, bf16):
    model = _model(encoder_width)
    if bf16:  # mixed precision as accelerate sets it up: the model's forward under autocast
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_beams=num_beams, max_length=12, early_stopping=num_beams > 1)
    with torch.no_grad():
        one_at_a_time = [model.generate(pixel_values=pixels[i:i + 1], **kwargs)[0] for i in range(len(pixels))]
        batched = generate(model, pixels, **kwargs)
    assert [row.tolist() for row in batched] == [row.tolist() for row in one_at_a_time]
    # The decoder's attention modules are back to TrOCR's own afterwards.
    assert all("forward" not in vars(layer.encoder_attn) for layer in model.decoder.model.decoder.layers)


def test_routed_model_generate_is_restored():
    model = _model(24)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.generate(pixel_values=pixels, num_beams=2, max_length=8)
        with generating_per_line(model):
            routed = model.generate(pixel_values=pixels, num_beams=2, max_length=8)
    assert torch.equal(routed, expected)
    assert "generate" not in vars(model)


class _EndAt(LogitsProcessor):
    """Line i ends with </s> (id 2) as its lengths[i]-th token, as a trained model's lines
    would end (a random model's rarely do)."""

    def __init__(self, lengths: list[int], num_beams: int):
        self.lengths = torch.tensor(lengths).repeat_interleave(num_beams)

    def __call__(self, input_ids, scores):
        end = input_ids.shape[1] >= self.lengths
        scores[~end, 2] = -math.inf
        scores[end] = -math.inf
        scores[end, 2] = 0.0
        return scores


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_finished_lines_leave_the_batch(num_beams, bf16):
    model = _model(24)
    if bf16:
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    lengths = [3, 12, 4, 5, 3, 6, 4, 3]  # the batch runs for 12 steps; most lines end in 3 to 6
    pixels = torch.randn(len(lengths), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_beams=num_beams, max_length=16, early_stopping=num_beams > 1)
    with torch.no_grad():
        expected = []
        for i, length in enumerate(lengths):
            processor = LogitsProcessorList([_EndAt([length], num_beams)])
            expected.append(model.generate(pixel_values=pixels[i:i + 1], logits_processor=processor, **kwargs)[0])
        rows, stock_forward = [], vars(model).get("forward")
        hook = model.decoder.register_forward_pre_hook(lambda module, args, kw: rows.append(len(kw["input_ids"])),
                                                       with_kwargs=True)
        batched = generate(model, pixels, logits_processor=LogitsProcessorList([_EndAt(lengths, num_beams)]), **kwargs)
        hook.remove()
    assert [row[row != 1].tolist() for row in batched] == [row.tolist() for row in expected]
    assert [len(row[row != 1]) for row in batched] == [length + 1 for length in lengths]  # start token + text + </s>
    # All lines at first; once a quarter of them are done, only those still being decoded.
    assert rows[0] == len(lengths) * num_beams and rows[-1] == num_beams
    assert sum(rows) < 0.6 * len(rows) * len(lengths) * num_beams
    assert "_check_early_stop_heuristic" not in vars(model)
    assert vars(model).get("forward") is (stock_forward if bf16 else None)


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
