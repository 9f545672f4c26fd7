"""Batched beam search for TrOCR, with what the beams of a line share computed once per line.

`model.generate` (transformers 5.23) runs beam search on lines x beams rows, each row
treated as an input of its own: the encoder output is copied once per beam, and at every
decoding step `VisionEncoderDecoderModel.forward` projects it again to the decoder's width
(`enc_to_dec_proj`, in TrOCR-small and -base) while `EncoderDecoderCache.reorder_cache`
gathers the cross-attention keys and values by beam index, although they are the same
for every beam of a line. At a batch of 32 lines, 4 beams, that gather alone copies
hundreds of MB per step, so that batching made evaluation slower, not faster.

`generate` gives the same sequences with the projection of the encoder output and each
layer's cross-attention keys and values computed once per line, and the beams of a line
attending to them together (their queries side by side: one matrix product per line, not
one per beam). Nothing is reordered but the self-attention cache. Both loops evaluate
through it (OcrTrainer.prediction_step, run_trocr_no_trainer.generate_predictions).
"""

import contextlib
from functools import partial

import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.trocr.modeling_trocr import TrOCRAttention


def _cross_attentions(model) -> list[TrOCRAttention] | None:
    """The decoder's cross-attention modules; None if the decoder is not TrOCR's."""
    decoder = getattr(getattr(model.decoder, "model", None), "decoder", None)
    modules = [getattr(layer, "encoder_attn", None) for layer in getattr(decoder, "layers", [])]
    return modules if modules and all(isinstance(module, TrOCRAttention) for module in modules) else None


class _PerLine:
    """What the beams of each line share, for one generate call: the encoder output
    projected to the decoder's width, and each cross-attention layer's keys and values
    (lines, heads, positions, head_dim). Computed at the first decoding step, inside the
    model's forward as the stock path computes them (under its autocast, if any), then
    reused at every step."""

    def __init__(self, model, states: torch.Tensor):
        self.model, self.states, self.keys_values = model, states, {}
        config = model.config
        self.project = (
            config.encoder.hidden_size != config.decoder.hidden_size
            and getattr(config.decoder, "cross_attention_hidden_size", None) is None
        )

    def attend(self, attention: TrOCRAttention, hidden_states, *args, **kwargs):
        """TrOCRAttention.forward as cross-attention, the rows of a line (line-major, as
        generate orders them: line x beams + beam) attending together to the line's keys
        and values. The same arithmetic: scaled query, one product with the keys, softmax,
        one product with the values, output projection."""
        if attention not in self.keys_values:
            if self.project:  # as VisionEncoderDecoderModel.forward, once
                self.states, self.project = self.model.enc_to_dec_proj(self.states), False
            shape = (len(self.states), -1, attention.num_heads, attention.head_dim)
            self.keys_values[attention] = [
                module(self.states).view(shape).transpose(1, 2).contiguous()
                for module in (attention.k_proj, attention.v_proj)
            ]
        keys, values = self.keys_values[attention]
        rows, length, width = hidden_states.shape
        query = attention.q_proj(hidden_states) * attention.scaling
        query = query.view(len(keys), -1, attention.num_heads, attention.head_dim).transpose(1, 2)
        weights = torch.nn.functional.softmax(query @ keys.transpose(-1, -2), dim=-1)
        weights = torch.nn.functional.dropout(weights, p=attention.dropout, training=attention.training)
        output = (weights @ values).transpose(1, 2).reshape(rows, length, width)
        return attention.out_proj(output), None


def generate(model, pixel_values: torch.Tensor, **generate_kwargs) -> torch.LongTensor:
    """`model.generate(pixel_values=pixel_values, **generate_kwargs)`: the same sequences,
    computed as the module docstring says (the stock path for a decoder other than TrOCR's,
    or when attentions or hidden states are asked for)."""
    attentions = _cross_attentions(model)
    config = model.generation_config
    outputs = ("output_attentions", "output_hidden_states")
    if attentions is None or any(generate_kwargs.get(name, getattr(config, name)) for name in outputs):
        return model.generate(pixel_values=pixel_values, **generate_kwargs)
    with torch.no_grad():  # the encoder runs outside the model's forward, as in generate
        states = model.encoder(pixel_values=pixel_values).last_hidden_state
    shared = _PerLine(model, states)
    try:
        for attention in attentions:
            attention.forward = partial(shared.attend, attention)
        # generate only needs the decoder now: the encoder output it carries (expanded to
        # the beams, projected at every step) is a placeholder of one position.
        placeholder = states.new_zeros(len(states), 1, model.config.encoder.hidden_size)
        return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=placeholder), **generate_kwargs)
    finally:
        for attention in attentions:
            vars(attention).pop("forward", None)  # back to TrOCRAttention.forward


@contextlib.contextmanager
def generating_per_line(model):
    """`model.generate(pixel_values=..., ...)` goes through `generate` above while in the
    block: for Seq2SeqTrainer, which calls it itself."""
    stock, previous = model.generate, vars(model).get("generate")

    def routed(pixel_values=None, **generate_kwargs):
        if pixel_values is None:  # generate's own call, with the placeholder encoder output
            return stock(**generate_kwargs)
        return generate(model, pixel_values, **generate_kwargs)

    model.generate = routed
    try:
        yield
    finally:
        if previous is None:
            del model.generate  # back to the class's
        else:
            model.generate = previous
