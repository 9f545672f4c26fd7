"""Batched generation for TrOCR: `generate` gives the sequences of `model.generate`, with what
the beams of a line share computed once per line and finished lines left out of the
decoder's batch (how and how much: docs/speed.md, "bench_eval.py").

It leans on a few members of transformers that are not public (docs/compatibility.md,
"## Generation"). Each part proves itself on first use in a process (generation_proof.py:
stock `generate`'s sequences on a tiny model of the same configuration, its hooks called);
a part that fails its proof, or does not engage in a call, is off: a warning once per
process, a count in FALLBACKS (a run's all_results.json: generation_fast_path_fallbacks),
stock results.
"""

from . import recipe_only  # noqa: F401, I001  (first: an older transformers is named at import)

import contextlib
import inspect
import os
import warnings
from collections import Counter
from functools import partial

import torch
import transformers
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.trocr.modeling_trocr import TrOCRAttention, TrOCRForCausalLM

from . import generation_proof

# The forward's cache keyword: `cache` from transformers 5.24, `past_key_values` before.
CACHE_KEYWORDS = ("cache", "past_key_values")
# generate's per-step beam search test, and the arguments `_Batch.watch` reads from it.
EARLY_STOP = "_check_early_stop_heuristic"
EARLY_STOP_ARGUMENTS = ("is_early_stop_heuristic_unsatisfied", "is_sent_finished", "early_stopping")
# Parts a person can turn off, to measure them or to rule them out: TROCR_GENERATION_OFF=per_line,early_stop
SWITCH = "TROCR_GENERATION_OFF"
PARTS = ("per_line", "early_stop", "leave_out")

FALLBACKS: Counter = Counter()  # part -> generate calls that ran without it
_WARNED: set = set()


def _label(part: str) -> str:
    """How the warning and FALLBACKS name a part of PARTS."""
    return {"per_line": "per-line cross-attention", "leave_out": "leaving finished lines out",
            "early_stop": f"finished beam search lines ({EARLY_STOP})"}.get(part, part)


def fallback_count() -> int:
    """Parts of the fast path off in this process's generate calls (one per part and call)."""
    return sum(FALLBACKS.values())


def _fall_back(part: str, reason: str) -> None:
    """Counts a generate call without `part`, and warns the first time per process."""
    FALLBACKS[part] += 1
    if part not in _WARNED:
        _WARNED.add(part)
        warnings.warn(f"trocr_recipe.generation, transformers {transformers.__version__}: {part} off ({reason}). "
                      "The sequences are model.generate's, evaluation is slower; see docs/compatibility.md.",
                      RuntimeWarning, stacklevel=2)


def _switched_off() -> set:
    """The parts TROCR_GENERATION_OFF names; an unknown name is an error, never ignored."""
    names = {name.strip() for name in os.environ.get(SWITCH, "").split(",") if name.strip()}
    if names - set(PARTS):
        raise ValueError(f"{SWITCH}: unknown part(s) {sorted(names - set(PARTS))}; known: {', '.join(PARTS)}")
    return names


def _cross_attentions(model) -> list[TrOCRAttention] | None:
    """The decoder's cross-attention modules; None if the decoder is not TrOCR's."""
    decoder = getattr(getattr(model.decoder, "model", None), "decoder", None)
    modules = [getattr(layer, "encoder_attn", None) for layer in getattr(decoder, "layers", [])]
    return modules if modules and all(isinstance(module, TrOCRAttention) for module in modules) else None


def _cache_keyword(model) -> str | None:
    """The keyword under which the model's forward takes generate's cache."""
    parameters = inspect.signature(type(model).forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


def _early_stop_check(model):
    """generate's beam search test of whether a line can still improve, or why it cannot be watched."""
    check = getattr(model, EARLY_STOP, None)
    if check is None:
        return None, f"generate has no {EARLY_STOP}"
    missing = [name for name in EARLY_STOP_ARGUMENTS if name not in inspect.signature(check).parameters]
    return (None, f"{EARLY_STOP} takes no {', '.join(missing)}") if missing else (check, None)


class _LineCache(EncoderDecoderCache):
    """The cache `generate` is given: beam search reorders only its self-attention part (the
    cross-attention keys and values are the same for every beam of a line), in the rows of
    the lines still decoded."""

    def __init__(self, config, batch: "_Batch"):
        super().__init__(DynamicCache(config=config), DynamicCache(config=config))
        self.batch, self.reorders = batch, 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.reorders += 1
        self.self_attention_cache.reorder_cache(self.batch.kept_rows(beam_idx))


class _PerLineOff(Exception):
    """The decoder did not go through the cross-attention modules' forward."""


class _Batch:
    """One generate call's lines: what their beams share, and which are still decoded.

    `lines` are the lines in the decoder's batch, in the order of its rows (line-major, as
    generate orders them: line x beams + beam), of the self-attention cache and of the
    per-line keys and values; `done` marks the lines whose outputs generate no longer reads."""

    def __init__(self, model, states: torch.Tensor, eos_token_ids: torch.Tensor, off: set):
        self.model, self.states, self.keys_values, self.eos = model, states, {}, eos_token_ids
        self.per_line, self.leave_out = "per_line" not in off, "leave_out" not in off
        self.lines = torch.arange(len(states), device=states.device)
        self.done = torch.zeros(len(states), dtype=torch.bool, device=states.device)
        self.beams = 0  # rows per line: known at the first forward
        self.cache, self.cache_name, self.rows, self.total = None, None, None, 0
        self.attentions, self.attended, self.attends, self.watched = 0, 0, 0, 0
        self.missing = {}  # part of PARTS -> why it did not engage in this call
        config = model.config
        self.project = (
            self.per_line and config.encoder.hidden_size != config.decoder.hidden_size
            and getattr(config.decoder, "cross_attention_hidden_size", None) is None
        )

    def attend(self, attention: TrOCRAttention, hidden_states, *args, **kwargs):
        """TrOCRAttention.forward as cross-attention, the rows of a line attending together
        to the line's keys and values. The same arithmetic: scaled query, one product with
        the keys, softmax, one product with the values, output projection."""
        self.attended, self.attends = self.attended + 1, self.attends + 1
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

    def lines_left(self) -> bool:
        return len(self.lines) < len(self.done)

    def rows_of(self, lines: torch.Tensor) -> torch.Tensor:
        return (lines[:, None] * self.beams + torch.arange(self.beams, device=lines.device)).flatten()

    def kept_rows(self, beam_idx: torch.LongTensor) -> torch.LongTensor:
        """generate's beam indices into the whole batch, as indices into the rows kept (each
        row continues a beam of its own line)."""
        beam = beam_idx.view(-1, self.beams)[self.lines] % self.beams
        first_row = torch.arange(len(self.lines), device=beam.device)[:, None] * self.beams
        return (first_row + beam).flatten()

    def find_cache(self, kwargs: dict) -> None:
        """At the first forward: the keyword generate passes the cache under, if a known one,
        and the rows per line."""
        input_ids = kwargs.get("decoder_input_ids")
        self.cache_name = next((name for name in CACHE_KEYWORDS if kwargs.get(name) is self.cache), "")
        if input_ids is None or not self.cache_name:
            self.cache_name, self.leave_out = "", False
            self.missing["leave_out"] = (
                f"the model's forward got no decoder_input_ids, or the cache under none of {CACHE_KEYWORDS}")
        else:
            self.beams = len(input_ids) // len(self.states)

    def before(self, module, args, kwargs):
        """Forward pre-hook: notes the finished lines, leaves them out, and gives the forward
        the rows of the lines still decoded."""
        self.attended, self.rows = 0, None
        if self.cache is None:
            return None
        if self.cache_name is None:
            self.find_cache(kwargs)
        if not self.leave_out:
            return None
        input_ids = kwargs["decoder_input_ids"]
        if self.beams == 1 and self.cache.get_seq_length() > 0:  # greedy: a line is done at </s>
            self.done |= torch.isin(input_ids[:, -1], self.eos)
        if self.beams == 1 or self.cache.reorders:  # beam search: once the cache is known reordered here
            self.leave_out_finished()
        if len(self.lines) == len(self.done):
            return None
        self.rows, self.total = self.rows_of(self.lines), len(input_ids)
        kwargs = {name: value[self.rows] if torch.is_tensor(value) and value.dim() and len(value) == self.total
                  else value for name, value in kwargs.items()}
        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=kwargs["encoder_outputs"][0][self.rows])
        return args, kwargs

    def after(self, module, args, kwargs, outputs):
        """Forward hook: zero logits for the rows left out; stops if the decoder did not use
        the per-line cross-attention (its logits would be wrong)."""
        if self.per_line and self.attended < self.attentions:
            raise _PerLineOff
        if self.rows is None:
            return None
        logits = outputs.logits.new_zeros((self.total,) + outputs.logits.shape[1:])
        logits[self.rows] = outputs.logits
        outputs.logits = logits
        return outputs

    def leave_out_finished(self):
        """Keeps only the unfinished lines in the decoder's batch, its cache and the keys and
        values, once a quarter of the batch is finished: taking lines out one by one would
        copy the keys and values of all the others every time. At least one line stays."""
        finished = self.done[self.lines]
        if 4 * int(finished.sum()) < len(self.lines) or bool(finished.all()):
            return
        keep = (~finished).nonzero().squeeze(1)
        self.cache.batch_select_indices(self.rows_of(keep))
        for pair in self.keys_values.values():
            pair[:] = [tensor[keep] for tensor in pair]
        self.lines = self.lines[keep]

    def watch(self, check, signature: inspect.Signature, *args, **kwargs):
        """generate's per-step test of whether a line can still improve (beam search): a
        line that cannot, or whose beams are all finished under early_stopping=True, is
        done, and generate adds -1e9 to every later candidate of it."""
        self.watched += 1
        unsatisfied = check(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        full = arguments["is_sent_finished"].all(dim=-1) & (arguments["early_stopping"] is True)
        self.done |= ~unsatisfied.squeeze(-1) | full
        return unsatisfied

    def note_hooks_not_called(self, watching: bool) -> None:
        """After generate: a hook beam search never called means its lines all stayed."""
        if self.cache is None or not self.leave_out or self.beams <= 1:
            return
        if not self.cache.reorders:
            self.missing["leave_out"] = "beam search never called reorder_cache on the cache it was given"
        if watching and not self.watched:
            self.missing["early_stop"] = "beam search never called it"


def _restore(module, name: str, previous) -> None:
    """Undo an instance attribute set over a class's method (or over an earlier one)."""
    if previous is None:
        vars(module).pop(name, None)
    else:
        setattr(module, name, previous)


def _per_line_attentions(model, generate_kwargs) -> list[TrOCRAttention] | None:
    """The cross-attention modules `generate` replaces; None where it takes the stock path:
    a decoder other than TrOCR's (warned, counted), a cache of the caller's, attentions,
    hidden states, scores or logits asked for (those of finished lines would be missing)."""
    config = model.generation_config
    outputs = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
    if any(generate_kwargs.get(name, getattr(config, name)) for name in outputs):
        return None
    if any(name in generate_kwargs for name in CACHE_KEYWORDS):
        return None
    attentions = _cross_attentions(model)
    if attentions is None and isinstance(model.decoder, TrOCRForCausalLM):
        _fall_back("batched generation", "the TrOCR decoder's layers have no TrOCRAttention encoder_attn")
    return attentions


def encode(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # the encoder runs outside the model's forward, as in generate
        return model.encoder(pixel_values=pixel_values).last_hidden_state


def generate(model, pixel_values: torch.Tensor, **generate_kwargs) -> torch.LongTensor:
    """`model.generate(pixel_values=pixel_values, **generate_kwargs)`: the same sequences,
    computed as the module docstring says."""
    if _per_line_attentions(model, generate_kwargs) is None:
        return model.generate(pixel_values=pixel_values, **generate_kwargs)
    return _generate(model, encode(model, pixel_values), **generate_kwargs)


def _line_cache(model, batch: _Batch, generate_kwargs: dict) -> dict:
    """The cache keyword for generate, where one is used and the forward takes a known one."""
    config = model.generation_config
    if not generate_kwargs.get("use_cache", config.use_cache):
        return {}
    if generate_kwargs.get("cache_implementation", config.cache_implementation) is not None:
        return {}  # a cache of the caller's kind: lines stay
    name = _cache_keyword(model)
    if name is None:
        batch.missing["leave_out"] = f"{type(model).__name__}.forward takes none of {CACHE_KEYWORDS}"
        return {}
    batch.cache = _LineCache(model.config.get_text_config(decoder=True), batch)
    return {name: batch.cache}


@contextlib.contextmanager
def _engaged(model, batch: _Batch, attentions: list[TrOCRAttention], check):
    """The per-line cross-attention, the forward hooks and the beam search watch, in place
    for one generate call."""
    previous_check, previous_forwards = vars(model).get(EARLY_STOP), [vars(a).get("forward") for a in attentions]
    handles = [model.register_forward_pre_hook(batch.before, with_kwargs=True),
               model.register_forward_hook(batch.after, with_kwargs=True)]
    try:
        if batch.per_line:
            batch.attentions = len(attentions)
            for attention in attentions:
                attention.forward = partial(batch.attend, attention)
        if check is not None:
            setattr(model, EARLY_STOP, partial(batch.watch, check, inspect.signature(check)))
        yield
    finally:
        for attention, previous in zip(attentions, previous_forwards):
            _restore(attention, "forward", previous)
        _restore(model, EARLY_STOP, previous_check)
        for handle in handles:
            handle.remove()


def _beam_watch(model, batch: _Batch, num_beams: int, off: set):
    """The beam search test to watch, where lines can leave; a missing one is noted."""
    if num_beams == 1 or batch.cache is None or not batch.leave_out or "early_stop" in off:
        return None
    check, reason = _early_stop_check(model)
    if check is None:
        batch.missing["early_stop"] = reason
    return check


def run(model, states: torch.Tensor, off: set, generate_kwargs: dict) -> tuple[torch.LongTensor | None, _Batch]:
    """One generate call through the fast path less the parts in `off`: its sequences (None
    where the decoder went round the per-line cross-attention) and what engaged."""
    config = model.generation_config
    eos = generate_kwargs.get("eos_token_id", config.eos_token_id)
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=states.device)
    batch = _Batch(model, states, eos, off)
    if generate_kwargs.get("do_sample", config.do_sample):
        batch.leave_out = False  # left-out rows' logits would change what sampling draws for the others
    if batch.leave_out and not hasattr(EncoderDecoderCache, "batch_select_indices"):
        batch.leave_out, batch.missing["leave_out"] = False, "EncoderDecoderCache has no batch_select_indices"
    cache = _line_cache(model, batch, generate_kwargs)
    check = _beam_watch(model, batch, generate_kwargs.get("num_beams", config.num_beams) or 1, off)
    # With the per-line cross-attention generate only needs the decoder: the encoder output
    # it carries (expanded to the beams, projected at every step) is a placeholder of one position.
    carried = states.new_zeros(len(states), 1, states.shape[-1]) if batch.per_line else states
    try:
        with _engaged(model, batch, _cross_attentions(model), check):
            sequences = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=carried),
                                       **cache, **generate_kwargs)
    except _PerLineOff:
        batch.missing["per_line"] = "the decoder did not call its encoder_attn modules' forward"
        return None, batch
    batch.note_hooks_not_called(watching=check is not None)
    return sequences, batch


def _generate(model, states: torch.Tensor, **generate_kwargs) -> torch.LongTensor:
    """`run` without the parts switched off or not proven on this model's configuration."""
    off = _switched_off()
    beam = (generate_kwargs.get("num_beams", model.generation_config.num_beams) or 1) > 1
    for part, reason in generation_proof.proven(model, beam, run).items():
        if reason is not None and part not in off:
            _fall_back(_label(part), reason)
            off.add(part)
    sequences, batch = run(model, states, off, generate_kwargs)
    for part, reason in batch.missing.items():
        if part not in off:  # counted above
            _fall_back(_label(part), reason)
    if sequences is None:
        return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), **generate_kwargs)
    return sequences


@contextlib.contextmanager
def generating_per_line(model):
    """While in the block, `model.generate(pixel_values=..., ...)` goes through `generate`
    above, and the model's forward on the very pixel values generate was last given takes
    their encoder output instead of running the encoder again: for Seq2SeqTrainer's
    prediction step, which generates, then computes the evaluation loss on the same batch.
    (Under mixed precision that loss then sees the encoder's float32 output, the one
    generation uses, where the stock step ran the encoder again under autocast.)"""
    previous_generate = vars(model).get("generate")
    stock_generate = model.generate
    encoded = []  # [pixel values, encoder output] of the last generate call

    def routed(pixel_values=None, **generate_kwargs):
        if pixel_values is None or _per_line_attentions(model, generate_kwargs) is None:
            return stock_generate(pixel_values=pixel_values, **generate_kwargs)  # e.g. generate's own call
        encoded[:] = [pixel_values, encode(model, pixel_values)]
        return _generate(model, encoded[1], **generate_kwargs)

    def reuse_encoder_output(module, args, kwargs):
        if encoded and kwargs.get("pixel_values") is encoded[0] and kwargs.get("encoder_outputs") is None:
            encoder_outputs = BaseModelOutput(last_hidden_state=encoded[1])
            return args, {**kwargs, "pixel_values": None, "encoder_outputs": encoder_outputs}
        return None

    model.generate = routed
    handle = model.register_forward_pre_hook(reuse_encoder_output, with_kwargs=True)
    try:
        yield
    finally:
        _restore(model, "generate", previous_generate)
        handle.remove()
