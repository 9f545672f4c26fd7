"""Pitfalls of the model's set-up: the start token (1), the configs (5), the tokenizer (6)
and the learning rate (9)."""

from ..metrics import decode
from .core import Part, Subject, merge, pitfall, same_id

SPECIAL_IDS = ("decoder_start_token_id", "pad_token_id", "eos_token_id")
# Checkpoint names of models already fine-tuned (Hub: microsoft/trocr-*-handwritten, -printed).
FINE_TUNED_MARKERS = ("-handwritten", "-printed")
# A learning rate above this drifts a converged checkpoint away within an epoch; the
# reference fine-tuned stage-1 checkpoints at 2e-5.
MAX_FINE_TUNED_LEARNING_RATE = 1e-4


def config_ids(model) -> dict[str, dict]:
    """Each special id as model.config, its decoder config and generation_config hold it (None: unset)."""
    configs = {"model.config": model.config, "model.config.decoder": getattr(model.config, "decoder", None),
               "model.generation_config": getattr(model, "generation_config", None)}
    return {where: {key: getattr(config, key, None) for key in SPECIAL_IDS}
            for where, config in configs.items() if config is not None}


@pitfall(1, "decoder_start_bos")
def check_decoder_start(subject: Subject):
    """The loss's label shift (model.config) and generate (generation_config) must start from `</s>`."""
    tokenizer = subject.tokenizer
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    ids = config_ids(subject.model)
    wrong = {where: held["decoder_start_token_id"] for where, held in ids.items()
             if where != "model.config.decoder" and held["decoder_start_token_id"] not in (None, eos)}
    if not wrong:
        return None
    token = "<s>" if bos in wrong.values() else "id " + "/".join(map(str, sorted(set(map(str, wrong.values())))))
    return merge(check_decoder_start, [Part(
        "error", f"The decoder starts from {token} instead of </s>.",
        "; ".join(f"{where}.decoder_start_token_id={value}" for where, value in wrong.items())
        + f"; the tokenizer's </s> is {eos}, <s> is {bos}",
        "The pretrained TrOCR decoder always read </s> first; from another token every line starts from an input "
        "it never saw, fine-tuning relearns the start instead of reading, and the CER rises while the loss falls.",
        "model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = "
        "processor.tokenizer.eos_token_id (tokenizer.sep_token_id on the TrOCR checkpoints, not cls_token_id)",
    )])


@pitfall(5, "configs_disagree")
def check_configs_agree(subject: Subject):
    """Special ids equal across the configs and the tokenizer's, present where the label shift
    reads them; generation settings on generation_config, where generate() reads them."""
    tokenizer, ids = subject.tokenizer, config_ids(subject.model)
    expected = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    problems = []
    for key in SPECIAL_IDS:
        values = {where: held[key] for where, held in ids.items() if held[key] is not None}
        wrong = key in expected and any(not same_id(value, expected[key]) for value in values.values())
        if len({str(value) for value in values.values()}) > 1 or wrong:
            held = ", ".join(f"{where}={value}" for where, value in values.items())
            problems.append(f"{key}: {held}" + (f" (the tokenizer's is {expected[key]})" if wrong else ""))
    parts = [Part(
        "error", "model.config and model.generation_config disagree on special ids.", "; ".join(problems),
        "The loss's label shift reads model.config, generate() reads model.generation_config: the model is trained "
        "one way and decoded another.",
        "set decoder_start_token_id (tokenizer.eos_token_id), pad_token_id and eos_token_id on both configs from "
        "the tokenizer",
    )] if problems else []
    missing = [key for key in ("decoder_start_token_id", "pad_token_id") if ids["model.config"][key] is None]
    if missing:
        parts.append(Part(
            "error", f"model.config has no {' and no '.join(missing)}.",
            f"model.config.{missing[0]}=None; the tokenizer's pad is {tokenizer.pad_token_id}, </s> "
            f"{tokenizer.eos_token_id}",
            "model(pixel_values=..., labels=...) cannot shift the labels right: the forward with labels fails.",
            "model.config.decoder_start_token_id = tokenizer.eos_token_id; model.config.pad_token_id = "
            "tokenizer.pad_token_id",
        ))
    if subject.config_generation_settings:
        parts.append(_settings_on_config(subject))
    return merge(check_configs_agree, parts)


def _settings_on_config(subject: Subject) -> Part:
    settings = subject.config_generation_settings
    refused = f"; generate() refused the model: {subject.generate_error}" if subject.generate_error else ""
    return Part(
        "error", "Generation settings are on model.config.",
        f"model.config holds {settings}{refused}",
        "Transformers 5 decodes with model.generation_config only: with settings on model.config generate() and "
        "save_pretrained() raise, and moved there unchecked they decode exactly as written (see "
        "generation_forbids_lines for what they forbid).",
        "move each onto model.generation_config (model.generation_config.num_beams = 4, ...) and delete it from "
        "model.config (del model.config.num_beams); keep only settings that let every line be read",
    )


def _vocabulary_parts(subject: Subject, table: int) -> list[Part]:
    tokenizer, rows = subject.tokenizer, subject.rows or []
    ids = [token for row in rows for token in row]
    outside = sorted({token for token in ids if token < 0 or token >= table})
    parts = []
    if outside:
        parts.append(Part(
            "error", f"{len(outside)} distinct label ids lie outside the decoder's embedding table [0, {table}).",
            f"label ids {outside[:5]}{' ...' if len(outside) > 5 else ''}; -100 is the only value the loss ignores",
            "The embedding lookup of the shifted labels fails with an index error, or, on a GPU, a device assert.",
            "build labels with the checkpoint's own tokenizer; pad with -100 only",
        ))
    if len(tokenizer) != table:
        parts.append(Part(
            "error" if len(tokenizer) > table else "warning",
            f"The tokenizer has {len(tokenizer)} ids, the decoder's embedding table {table}.",
            f"len(processor.tokenizer)={len(tokenizer)}, model.decoder embeddings={table} (TrOCR-small has 64044 ids, "
            "base and large 50265)",
            "With another checkpoint's tokenizer each id names another piece than the decoder learned: the first "
            "epochs look like a collapse.",
            "load the processor from the same checkpoint as the model",
        ))
    return parts


@pitfall(6, "tokenizer_mismatch")
def check_tokenizer(subject: Subject):
    """The tokenizer and the label ids must fit the decoder's embeddings, give the texts back,
    and be the checkpoint's own."""
    table = subject.model.decoder.get_input_embeddings().num_embeddings
    parts = _vocabulary_parts(subject, table)
    own = subject.checkpoint_tokenizer
    if own is not None and own.get_vocab() != subject.tokenizer.get_vocab():
        same = sum(own.get_vocab().get(piece) == index for piece, index in subject.tokenizer.get_vocab().items())
        parts.append(Part(
            "error", f"The tokenizer from {subject.processor_source} is not the checkpoint's.",
            f"{len(subject.tokenizer)} ids against {len(own)} of {subject.checkpoint}, {same} pieces with the same id",
            "The decoder's embeddings belong to the checkpoint's tokenizer: with another one the model relearns its "
            "vocabulary.", "leave processor_name_or_path unset",
        ))
    if subject.texts:
        encoded = subject.tokenizer(subject.texts, add_special_tokens=False)["input_ids"]
        lost = [(text, back) for text, ids in zip(subject.texts, encoded)
                if (back := decode(subject.tokenizer, [ids])[0]) != text]
        if lost:
            parts.append(Part(
                "error", f"The tokenizer does not give back {len(lost)} of {len(subject.texts)} texts.",
                "; ".join(f"{text!r} -> {back!r}" for text, back in lost[:2]),
                "What the tokenizer loses (unknown characters, lower-casing) the model can never write: the CER "
                "has a floor above zero.", "use the checkpoint's own tokenizer",
            ))
    return merge(check_tokenizer, parts)


@pitfall(9, "learning_rate_high")
def check_learning_rate(subject: Subject):
    """An already fine-tuned checkpoint (by name unless said) wants a small learning rate."""
    fine_tuned = subject.fine_tuned
    if fine_tuned is None:
        fine_tuned = any(marker in (subject.checkpoint or "") for marker in FINE_TUNED_MARKERS)
    rate = subject.learning_rate
    if not fine_tuned or rate is None or rate <= MAX_FINE_TUNED_LEARNING_RATE:
        return None
    return merge(check_learning_rate, [Part(
        "warning", f"learning rate {rate:g} on {subject.checkpoint}, a checkpoint already fine-tuned.",
        f"learning_rate={rate:g}, above {MAX_FINE_TUNED_LEARNING_RATE:g}; the reference fine-tuned stage-1 "
        "checkpoints at 2e-5",
        "A rate that suits training from a pretrained start moves a converged model away from its optimum within "
        "an epoch: the CER rises from its baseline while the loss falls.",
        "a rate near 2e-5 or below, or start from a -stage1 checkpoint",
    )])
