"""Pitfalls of decoding: room for the longest line (4), greedy decoding (13), and settings
that forbid a correct reading (14), on the settings generate() really uses."""

import copy

from transformers import GenerationConfig

from ..modeling import generation_max_length
from .core import EXAMPLES, Part, Subject, merge, pitfall

DEFAULT_NEW_TOKENS = 20  # what generate() allows when no config sets a length
# Values of generation settings that change nothing (transformers' defaults; 4.x keeps them on model.config).
NEUTRAL = {"max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
           "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
           "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
           "encoder_no_repeat_ngram_size": 0, "num_return_sequences": 1, "output_scores": False,
           "return_dict_in_generate": False, "remove_invalid_values": False, "output_logits": False}
NOT_SETTINGS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "output_attentions",
                "output_hidden_states", "transformers_version", "_from_model_config", "use_cache"}


def config_generation_settings(config) -> dict:
    """Generation settings held on model.config (where transformers 5 refuses them)."""
    known = set(GenerationConfig().to_dict()) - NOT_SETTINGS
    return {key: value for key, value in vars(config).items()
            if key in known and value is not None and value != NEUTRAL.get(key, None)}


def effective_generation(model, overrides: dict | None = None, source: str = "") -> tuple:
    """The GenerationConfig decoding uses: generation_config, settings left on model.config
    where it has none (what they were meant for), then `overrides` (e.g. the Trainer's), and
    where each setting comes from."""
    generation = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    sources = {key: "model.generation_config" for key, value in generation.to_dict().items() if value is not None}
    for key, value in config_generation_settings(model.config).items():
        if getattr(generation, key, None) in (None, NEUTRAL.get(key)):
            setattr(generation, key, value)
            sources[key] = "model.config"
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(generation, key, value)
            sources[key] = source
    return generation, sources


def room(generation) -> tuple[int, str]:
    """New tokens generate() may produce after the start token, and the setting that says so."""
    if getattr(generation, "max_new_tokens", None) is not None:
        return generation.max_new_tokens, f"max_new_tokens={generation.max_new_tokens}"
    if getattr(generation, "max_length", None) is not None:
        return generation.max_length - 1, f"max_length={generation.max_length}"
    return DEFAULT_NEW_TOKENS, f"max_length unset: transformers' default of {DEFAULT_NEW_TOKENS} new tokens"


def _where(subject: Subject, key: str) -> str:
    return subject.generation_sources.get(key, "model.generation_config")


def _length_parts(subject: Subject) -> list[Part]:
    rows = subject.rows or []
    lengths = [len(row) for row in rows] + [len(row) for row in (subject.corpus or {}).get("rows", [])]
    if not lengths:
        return []
    longest, (limit, setting) = max(lengths), room(subject.generation)
    wanted = generation_max_length(longest)
    if limit >= wanted - 1:
        return []
    cut = sum(length > limit for length in lengths)
    return [Part(
        "error" if limit < longest else "warning",
        f"generate() has room for {limit} tokens; the longest line needs {longest}.",
        f"{_where(subject, 'max_new_tokens' if 'new' in setting else 'max_length')}: {setting}; longest label "
        f"{longest} tokens (text and </s>), {wanted - 1} with a 10% margin; {cut} of {len(lengths)} lines longer "
        "than the room",
        "Lines longer than the room are cut in every prediction whatever the model learned: the CER has a floor "
        "set by the long lines.",
        f"model.generation_config.max_length = {wanted} or more (and generation_max_length in Seq2SeqTrainingArguments),"
        " sized on the longest label of the training set",
    )]


def _evaluation_parts(subject: Subject) -> list[Part]:
    evaluation = subject.evaluation or {}
    kinds, hit = evaluation.get("kinds", []), evaluation.get("hit_max_length", [])
    if "cut" not in kinds and not any(hit):
        return []
    limit, setting = room(subject.generation)
    parts = []
    if "cut" in kinds:
        lines = [line for line, kind in enumerate(kinds) if kind == "cut"]
        parts.append(Part(
            "error", "Your validation step cuts lines short.",
            f"{len(lines)} of {len(kinds)} predictions are beginnings of the generated lines, e.g. line {lines[0]}: "
            f"yours {evaluation['theirs'][lines[0]]!r}, generate() {evaluation['generate'][lines[0]]!r}",
            "Cut lines lose their end in every prediction, whatever the model learned.",
            "generate with the model's generation config, its max_length sized on the longest training label",
        ))
    if any(hit):
        parts.append(Part(
            "warning", "generate() runs out of room.",
            f"generate() ({setting}) used all its {limit} tokens without </s> on {sum(hit)} of {len(hit)} lines, "
            f"e.g. {evaluation['generate'][hit.index(True)]!r}",
            "A model that uses all its room without </s> either reads lines longer than the room or never learned "
            "to stop (labels without </s>).", "labels that end with </s>; a max_length sized on the data",
        ))
    return parts


@pitfall(4, "generation_too_short")
def check_generation_length(subject: Subject):
    """Room for the longest label (text + `</s>`) with a 10% margin, and no line cut in evaluation."""
    return merge(check_generation_length, _length_parts(subject) + _evaluation_parts(subject))


@pitfall(13, "single_beam")
def check_beams(subject: Subject):
    """Greedy decoding, where the paper's figures come from beam search."""
    beams = getattr(subject.generation, "num_beams", None)
    if beams is not None and beams > 1:
        return None
    return merge(check_beams, [Part(
        "warning", "generate() decodes greedily.", f"{_where(subject, 'num_beams')}.num_beams={beams}",
        "Fine for a quick validation signal, but the paper's figures come from beam search: a greedy CER is "
        "somewhat worse than the published one.",
        "model.generation_config.num_beams = 10 for the evaluation you compare with published figures",
    )])
