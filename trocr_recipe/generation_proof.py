"""The proof each part of generation.py's fast path gives before it is used, once per process
and configuration: on a tiny model built from the caller's decoder configuration, the
sequences and scores of stock `generate`, with the hooks the part relies on called. A part
that fails stays off (docs/compatibility.md, "## Generation": evidence instead of a list
of tested transformers versions)."""

import copy
import json

import torch
from transformers import LogitsProcessor, LogitsProcessorList, ViTConfig, VisionEncoderDecoderConfig
from transformers.modeling_outputs import BaseModelOutput

# Line i ends with </s> (id 2) as its LENGTHS[i]-th token, as a trained model's lines would:
# most lines end in 3 to 6 steps, one runs for 12, so lines leave the batch.
LENGTHS = (3, 12, 4, 5, 3, 6, 4, 3)
MAX_LENGTH, BEAMS, EOS, PAD = 16, 3, 2, 1
WIDTH, PROJECTED = 32, 24  # the tiny decoder's width; the encoder's where the caller's model projects
TINY_DECODER = dict(vocab_size=40, d_model=WIDTH, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                    max_position_embeddings=64, pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS,
                    decoder_start_token_id=EOS)
TOLERANCE = 1e-4  # on scores; float32 sums in another order differ by about 1e-6
PARTS = {False: ("per_line", "leave_out"), True: ("per_line", "leave_out", "early_stop")}  # greedy, beam search

PROOFS: dict = {}  # (configuration, beam search) -> {part: why it is off, None if proven}


class EndAt(LogitsProcessor):
    """Line i ends with </s> as its lengths[i]-th token (a random model's lines rarely end)."""

    def __init__(self, lengths, num_beams: int):
        self.lengths = torch.tensor(lengths).repeat_interleave(num_beams)

    def __call__(self, input_ids, scores):
        end = input_ids.shape[1] >= self.lengths.to(input_ids.device)
        scores[~end, EOS] = -torch.inf
        scores[end] = -torch.inf
        scores[end, EOS] = 0.0
        return scores


class Scores(LogitsProcessor):
    """Keeps the scores generate passes to the logits processors at every step."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def same_scores(ours: list, stock: list, atol: float = TOLERANCE) -> bool:
    """Every row still decoded scores as in stock generate, step by step (rows left out of
    the batch get zero logits: equal scores)."""
    if len(ours) != len(stock):
        return False
    for mine, theirs in zip(ours, stock):
        decoded = ~(mine == mine[:, :1]).all(dim=1)
        if not decoded.any() or not torch.allclose(mine[decoded], theirs[decoded], rtol=0, atol=atol):
            return False
    return True


def proven(model, beam: bool, run) -> dict:
    """{part: why it is off, or None}: the proof of the parts beam search (or greedy search)
    uses on `model`'s configuration, made at the first call. `run` is generation.run."""
    decoder, width = _tiny_decoder(model.config)
    key = (type(model), type(model.decoder), width, json.dumps(decoder.to_dict(), sort_keys=True, default=str), beam)
    if key not in PROOFS:
        PROOFS[key] = _prove(type(model), decoder, width, beam, run)
    return PROOFS[key]


def _tiny_decoder(config):
    """The caller's decoder configuration at the size of a test, and the encoder width that
    keeps its encoder-to-decoder projection (or its cross-attention width) as it is."""
    decoder = copy.deepcopy(config.decoder)
    cross = getattr(decoder, "cross_attention_hidden_size", None) is not None
    width = PROJECTED if cross or config.encoder.hidden_size != config.decoder.hidden_size else WIDTH
    for name, value in {**TINY_DECODER, "cross_attention_hidden_size": width if cross else None}.items():
        setattr(decoder, name, value)
    return decoder, width


def _tiny_model(model_class, decoder, width: int):
    encoder = ViTConfig(image_size=32, patch_size=8, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * width)
    model = model_class(config=VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = EOS, EOS, PAD
    return model.float().eval()


def _prove(model_class, decoder, width: int, beam: bool, run) -> dict:
    """Each part added to those proven before it, in PARTS order; the caller's random state
    is left as it was (the tiny model draws its weights)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.autocast("cpu", enabled=False):
        torch.manual_seed(0)
        model = _tiny_model(model_class, decoder, width)
        states = torch.randn(len(LENGTHS), 6, width)
        kwargs = dict(num_beams=BEAMS if beam else 1, max_length=MAX_LENGTH, early_stopping=beam)
        stock = _scored(lambda processors: model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states), logits_processor=processors, **kwargs), kwargs)
        reasons, parts = {}, PARTS[beam]
        for i, part in enumerate(parts):
            off = {name for name, reason in reasons.items() if reason} | set(parts[i + 1:])
            ours = _scored(lambda processors: run(model, states, off, dict(logits_processor=processors, **kwargs)),
                           kwargs)
            reasons[part] = _verdict(part, beam, ours, stock)
            if part == "leave_out" and reasons[part]:
                break  # beam search lines leave through early_stop only when they can leave at all
    return reasons


def _scored(call, kwargs: dict):
    """call(logits processors) on the lines that end at LENGTHS, and the scores of every step."""
    scores = Scores()
    return call(LogitsProcessorList([scores, EndAt(LENGTHS, kwargs["num_beams"])])), scores.steps


def _verdict(part: str, beam: bool, ours, stock) -> str | None:
    """Why `part` is not proven by this run, or None."""
    (sequences, batch), scores = ours
    if part in batch.missing:
        return batch.missing[part]
    engaged = {"per_line": batch.attends > 0,
               "leave_out": bool(batch.cache_name) and (batch.cache.reorders > 0 if beam else batch.lines_left()),
               "early_stop": batch.watched > 0 and batch.lines_left()}[part]
    if not engaged:
        return "its hooks were not called on a tiny model of this configuration"
    if sequences.shape != stock[0].shape or not torch.equal(sequences, stock[0]):
        return "its sequences differ from model.generate's on a tiny model of this configuration"
    if not same_scores(scores, stock[1]):
        return "its scores differ from model.generate's on a tiny model of this configuration"
    return None
