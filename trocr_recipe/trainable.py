"""Which parameters train (`trainable`, the same in both loops): all, the encoder, the decoder,
or shell-style patterns on the parameter names; the others are frozen before the optimizer is
built, which takes only what trains. The counts are logged and kept in all_results.json."""

import fnmatch
import logging
import re

logger = logging.getLogger("trocr_recipe")

# The keywords, as patterns; a pattern of the user's must match at least one parameter.
KEYWORDS = {"all": ["*"], "encoder": ["encoder.*"], "decoder": ["decoder.*", "enc_to_dec_proj.*"]}


def set_trainable(model, trainable: list[str]) -> dict:
    """requires_grad on the parameters `trainable` names (any of a tied tensor's names counts),
    off on every other; returns the counts {"trainable_parameters", "frozen_parameters"}."""
    named = list(model.named_parameters(remove_duplicate=False))
    if list(trainable) != ["all"]:
        chosen = set()
        for pattern in trainable:
            matched = {id(p) for name, p in named if any(fnmatch.fnmatchcase(name, g) for g in KEYWORDS.get(pattern, [pattern]))}
            if not matched:
                raise SystemExit(f"trainable: {pattern!r} matches no parameter name of the model: use all, encoder, "
                                 f"decoder or patterns such as {last_layers(named)} (its last layers)")
            chosen |= matched
        for _, parameter in named:
            parameter.requires_grad_(id(parameter) in chosen)
    unique = {id(p): p for _, p in named}.values()
    counts = {"trainable_parameters": sum(p.numel() for p in unique if p.requires_grad),
              "frozen_parameters": sum(p.numel() for p in unique if not p.requires_grad)}
    total = counts["trainable_parameters"] + counts["frozen_parameters"]
    logger.info("trainable %s: %d parameters train (%.1f%%), %d frozen", " ".join(trainable),
                counts["trainable_parameters"], 100 * counts["trainable_parameters"] / max(total, 1),
                counts["frozen_parameters"])
    return counts


def last_layers(named) -> str:
    """The last encoder and decoder layers as patterns: encoder.layers.11.*, ..."""
    layers = {}
    for name, _ in named:
        match = re.match(r"((encoder|decoder)\..*?\.\d+)\.", name)
        if match:
            layers[match.group(2)] = f"'{match.group(1)}.*'"
    return " and ".join(layers.values())
