"""Batched generation for TrOCR: what the beams of a line share computed once per line, and
lines that are finished taken out of the batch.

`model.generate` (transformers 5.23) runs beam search on lines x beams rows, each row
treated as an input of its own: the encoder output is copied once per beam, and at every
decoding step `VisionEncoderDecoderModel.forward` projects it again to the decoder's width
(`enc_to_dec_proj`, in TrOCR-small and -base) while `EncoderDecoderCache.reorder_cache`
gathers the cross-attention keys and values by beam index, although they are the same
for every beam of a line. At a batch of 32 lines, 4 beams, that gather alone copies
hundreds of MB per step, so that batching made evaluation slower, not faster. And every
line is decoded until the longest line of the batch ends: its finished rows keep going
through the decoder, their outputs thrown away.

`generate` gives the same sequences with
- the projection of the encoder output and each layer's cross-attention keys and values
  computed once per line, the beams of a line attending to them together (their queries
  side by side: one matrix product per line, not one per beam); nothing is reordered but
  the self-attention cache;
- the lines that are finished left out of the decoder's batch: a line that can no longer
  change (beam search: done by generate's own rule, which adds -1e9 to all of its later
  candidates; greedy: it has produced `</s>`, after which generate pads it) gets zero
  logits instead of a forward pass. Taking lines out means copying the keys, values and
  cache of those that remain, so it is done each time a quarter of the batch is finished;
  until then finished lines stay in the batch.
Both loops evaluate through it (OcrTrainer.prediction_step, run_trocr_no_trainer.generate_predictions);
`generating_per_line` also gives the trainer's evaluation loss the encoder output of generation.
"""

import contextlib
from functools import partial, wraps

import torch
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.trocr.modeling_trocr import TrOCRAttention


def _cross_attentions(model) -> list[TrOCRAttention] | None:
    """The decoder's cross-attention modules; None if the decoder is not TrOCR's."""
    decoder = getattr(getattr(model.decoder, "model", None), "decoder", None)
    modules = [getattr(layer, "encoder_attn", None) for layer in getattr(decoder, "layers", [])]
    return modules if modules and all(isinstance(module, TrOCRAttention) for module in modules) else None


class _Batch:
    """One generate call's lines: what their beams share, and which are still decoded.

    `lines` are the lines in the decoder's batch, in the order of its rows (line-major, as
    generate orders them: line x beams + beam), of the self-attention cache and of the
    per-line keys and values; `done` marks the lines whose outputs generate no longer reads."""

    def __init__(self, model, states: torch.Tensor, num_beams: int, eos_token_ids: torch.Tensor):
        self.model, self.states, self.keys_values = model, states, {}
        self.beams, self.eos = num_beams, eos_token_ids
        self.lines = torch.arange(len(states), device=states.device)
        self.done = torch.zeros(len(states), dtype=torch.bool, device=states.device)
        self.forward = model.forward  # the model's own (under accelerate's autocast, if any)
        self.cache = None
        config = model.config
        self.project = (
            config.encoder.hidden_size != config.decoder.hidden_size
            and getattr(config.decoder, "cross_attention_hidden_size", None) is None
        )

    def attend(self, attention: TrOCRAttention, hidden_states, *args, **kwargs):
        """TrOCRAttention.forward as cross-attention, the rows of a line attending together
        to the line's keys and values. The same arithmetic: scaled query, one product with
        the keys, softmax, one product with the values, output projection."""
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

    def rows(self, lines: torch.Tensor) -> torch.Tensor:
        return (lines[:, None] * self.beams + torch.arange(self.beams, device=lines.device)).flatten()

    def decode(self, decoder_input_ids=None, past_key_values=None, encoder_outputs=None, **kwargs):
        """The model's forward for generate, on the rows of the lines still decoded."""
        if past_key_values is None:  # no cache: generate feeds every row its whole sequence
            return self.forward(decoder_input_ids=decoder_input_ids, encoder_outputs=encoder_outputs, **kwargs)
        if self.cache is None:  # beam search reorders the cache by rows of the whole batch
            self.cache = past_key_values
            past_key_values.reorder_cache = partial(self.reorder, past_key_values)
        if self.beams == 1 and past_key_values.get_seq_length() > 0:
            self.done |= torch.isin(decoder_input_ids[:, -1], self.eos)
        self.leave_out_finished()
        if len(self.lines) == len(self.done):
            return self.forward(decoder_input_ids=decoder_input_ids, past_key_values=past_key_values,
                                encoder_outputs=encoder_outputs, **kwargs)
        rows, total = self.rows(self.lines), len(decoder_input_ids)
        kwargs = {name: value[rows] if torch.is_tensor(value) and len(value) == total else value
                  for name, value in kwargs.items()}
        outputs = self.forward(decoder_input_ids=decoder_input_ids[rows], past_key_values=past_key_values,
                               encoder_outputs=BaseModelOutput(last_hidden_state=encoder_outputs[0][rows]), **kwargs)
        logits = outputs.logits.new_zeros((total,) + outputs.logits.shape[1:])
        logits[rows] = outputs.logits
        return Seq2SeqLMOutput(logits=logits, past_key_values=outputs.past_key_values)

    def leave_out_finished(self):
        """Keeps only the unfinished lines in the decoder's batch, its cache and the keys and
        values, once a quarter of the batch is finished: taking lines out one by one would
        copy the keys and values of all the others every time. At least one line stays."""
        finished = self.done[self.lines]
        if 4 * int(finished.sum()) < len(self.lines) or bool(finished.all()):
            return
        keep = (~finished).nonzero().squeeze(1)
        type(self.cache).batch_select_indices(self.cache, self.rows(keep))
        for pair in self.keys_values.values():
            pair[:] = [tensor[keep] for tensor in pair]
        self.lines = self.lines[keep]

    def reorder(self, cache, beam_idx: torch.LongTensor):
        """EncoderDecoderCache.reorder_cache with generate's indices into the whole batch
        made indices into the rows kept (each row continues a beam of its own line)."""
        beam = beam_idx.view(-1, self.beams)[self.lines] % self.beams
        first_row = torch.arange(len(self.lines), device=beam.device)[:, None] * self.beams
        type(cache).reorder_cache(cache, (first_row + beam).flatten())

    def watch(self, check, **kwargs):
        """generate's per-step test of whether a line can still improve (beam search): a
        line that cannot, or whose beams are all finished under early_stopping=True, is
        done, and generate adds -1e9 to every later candidate of it."""
        unsatisfied = check(**kwargs)
        full = kwargs["is_sent_finished"].all(dim=-1) & (kwargs["early_stopping"] is True)
        self.done |= ~unsatisfied.squeeze(-1) | full
        return unsatisfied


def _restore(module, name: str, previous) -> None:
    """Undo an instance attribute set over a class's method (or over an earlier one)."""
    if previous is None:
        vars(module).pop(name, None)
    else:
        setattr(module, name, previous)


def _per_line_attentions(model, generate_kwargs) -> list[TrOCRAttention] | None:
    """The cross-attention modules `generate` replaces; None where it takes the stock path:
    a decoder other than TrOCR's, or attentions, hidden states, scores or logits asked for
    (those of finished lines would be missing)."""
    config = model.generation_config
    outputs = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
    if any(generate_kwargs.get(name, getattr(config, name)) for name in outputs):
        return None
    return _cross_attentions(model)


def encode(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # the encoder runs outside the model's forward, as in generate
        return model.encoder(pixel_values=pixel_values).last_hidden_state


def generate(model, pixel_values: torch.Tensor, **generate_kwargs) -> torch.LongTensor:
    """`model.generate(pixel_values=pixel_values, **generate_kwargs)`: the same sequences,
    computed as the module docstring says."""
    attentions = _per_line_attentions(model, generate_kwargs)
    if attentions is None:
        return model.generate(pixel_values=pixel_values, **generate_kwargs)
    return _generate(model, attentions, encode(model, pixel_values), **generate_kwargs)


def _generate(model, attentions: list[TrOCRAttention], states: torch.Tensor, **generate_kwargs) -> torch.LongTensor:
    config = model.generation_config
    eos = generate_kwargs.get("eos_token_id", config.eos_token_id)
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=states.device)
    batch = _Batch(model, states, generate_kwargs.get("num_beams", config.num_beams) or 1, eos)
    previous_forward = vars(model).get("forward")
    try:
        for attention in attentions:
            attention.forward = partial(batch.attend, attention)
        # generate checks its keyword arguments against the forward's signature: the model's.
        model.forward = wraps(batch.forward)(lambda *args, **kwargs: batch.decode(*args, **kwargs))
        check = getattr(model, "_check_early_stop_heuristic", None)  # transformers 5's beam search
        if check is not None:  # without it, beam search keeps every line in the batch
            model._check_early_stop_heuristic = partial(batch.watch, check)
        # generate only needs the decoder now: the encoder output it carries (expanded to
        # the beams, projected at every step) is a placeholder of one position.
        placeholder = states.new_zeros(len(states), 1, model.config.encoder.hidden_size)
        return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=placeholder), **generate_kwargs)
    finally:
        for attention in attentions:
            _restore(attention, "forward", None)  # back to TrOCRAttention.forward
        _restore(model, "_check_early_stop_heuristic", None)
        _restore(model, "forward", previous_forward)


@contextlib.contextmanager
def generating_per_line(model):
    """While in the block, `model.generate(pixel_values=..., ...)` goes through `generate`
    above, and the model's forward on the very pixel values generate was last given takes
    their encoder output instead of running the encoder again: for Seq2SeqTrainer's
    prediction step, which generates, then computes the evaluation loss on the same batch.
    (Under mixed precision that loss then sees the encoder's float32 output, the one
    generation uses, where the stock step ran the encoder again under autocast.)"""
    previous_generate, previous_forward = vars(model).get("generate"), vars(model).get("forward")
    stock_generate, stock_forward = model.generate, model.forward
    encoded = []  # [pixel values, encoder output] of the last generate call

    def routed(pixel_values=None, **generate_kwargs):
        attentions = _per_line_attentions(model, generate_kwargs)
        if pixel_values is None or attentions is None:  # e.g. generate's own call, with the placeholder
            return stock_generate(pixel_values=pixel_values, **generate_kwargs)
        encoded[:] = [pixel_values, encode(model, pixel_values)]
        return _generate(model, attentions, encoded[1], **generate_kwargs)

    def forward(*args, pixel_values=None, encoder_outputs=None, **kwargs):
        if encoded and pixel_values is encoded[0] and encoder_outputs is None:
            pixel_values, encoder_outputs = None, BaseModelOutput(last_hidden_state=encoded[1])
        return stock_forward(*args, pixel_values=pixel_values, encoder_outputs=encoder_outputs, **kwargs)

    model.generate, model.forward = routed, wraps(stock_forward)(forward)
    try:
        yield
    finally:
        _restore(model, "generate", previous_generate)
        _restore(model, "forward", previous_forward)
