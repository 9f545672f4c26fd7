"""Batched beam search for TrOCR, with what the beams of a line share computed once per line.

`model.generate` (transformers 5.23) runs beam search on lines x beams rows, each row
treated as an input of its own: the encoder output is copied once per beam, and at every
decoding step `VisionEncoderDecoderModel.forward` projects it again to the decoder's width
(`enc_to_dec_proj`, in TrOCR-small and -base) while `EncoderDecoderCache.reorder_cache`
gathers the cross-attention keys and values by beam index, although they are the same
for every beam of a line. At a batch of 32 lines, 4 beams, that gather alone copies
hundreds of MB per step, so that batching made evaluation slower, not faster.

`generate` gives the same sequences with the encoder, its projection and each layer's
cross-attention keys and values computed once per line, and the beams of a line attending
to them together (their queries side by side: one matrix product per line, not one per
beam). Nothing is reordered but the self-attention cache.
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


def _attend_per_line(attention: TrOCRAttention, keys, values, hidden_states, *args, **kwargs):
    """TrOCRAttention.forward as cross-attention, the rows of a line (line-major, as
    generate orders them: line x beams + beam) attending together to the line's keys and
    values (lines, heads, positions, head_dim). The same arithmetic: scaled query, one
    product with the keys, softmax, one product with the values, output projection."""
    rows, length, width = hidden_states.shape
    lines = keys.shape[0]
    query = attention.q_proj(hidden_states) * attention.scaling
    query = query.view(lines, rows // lines * length, attention.num_heads, attention.head_dim).transpose(1, 2)
    weights = torch.nn.functional.softmax(query @ keys.transpose(-1, -2), dim=-1)
    weights = torch.nn.functional.dropout(weights, p=attention.dropout, training=attention.training)
    output = (weights @ values).transpose(1, 2).reshape(rows, length, width)
    return attention.out_proj(output), None


def generate(model, pixel_values: torch.Tensor, **generate_kwargs) -> torch.LongTensor:
    """`model.generate(pixel_values=pixel_values, **generate_kwargs)`: the same sequences,
    computed as the module docstring says (the stock path for a decoder other than TrOCR's
    or when attentions are asked for)."""
    attentions = _cross_attentions(model)
    if attentions is None or generate_kwargs.get("output_attentions") or model.generation_config.output_attentions:
        return model.generate(pixel_values=pixel_values, **generate_kwargs)
    with torch.no_grad():
        states = model.encoder(pixel_values=pixel_values).last_hidden_state
        if (
            model.config.encoder.hidden_size != model.config.decoder.hidden_size
            and getattr(model.config.decoder, "cross_attention_hidden_size", None) is None
        ):
            states = model.enc_to_dec_proj(states)  # as VisionEncoderDecoderModel.forward, once
        lines = len(states)

        def heads(module, attention):
            return module(states).view(lines, -1, attention.num_heads, attention.head_dim).transpose(1, 2).contiguous()

        for attention in attentions:
            attention.forward = partial(
                _attend_per_line, attention, heads(attention.k_proj, attention), heads(attention.v_proj, attention)
            )
    try:
        # generate only needs the decoder now: the encoder output it carries (expanded to
        # the beams, projected at every step) is a placeholder of one position.
        placeholder = states.new_zeros(lines, 1, model.config.encoder.hidden_size)
        return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=placeholder), **generate_kwargs)
    finally:
        for attention in attentions:
            del attention.forward  # back to TrOCRAttention.forward


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
