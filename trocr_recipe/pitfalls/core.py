"""What every pitfall check shares: the `Finding` it returns, the `Subject` it looks at and
the registry that keeps one check per pitfall of docs/pitfalls.md."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

PITFALLS_DOC = "docs/pitfalls.md"  # one section per pitfall, anchored pitfall-<number>
IGNORE_INDEX = -100  # label positions the loss skips
EXAMPLES = 2  # lines quoted as evidence
NOT_CHECKED = "That pitfall is not checked on these objects; every other check ran."


def pitfall_doc(number: int) -> str:
    """Where pitfall `number` is explained: docs/pitfalls.md#pitfall-<number>."""
    return f"{PITFALLS_DOC}#pitfall-{number}"


@dataclass(frozen=True)
class Finding:
    """One problem found: the mistake, the evidence from the user's own objects, its effect
    on training or on the CER, and the fix."""

    name: str
    level: Literal["error", "warning"]
    message: str
    pitfall: int | None = None  # its number in docs/pitfalls.md
    evidence: str = ""
    effect: str = ""
    fix: str = ""

    @property
    def doc(self) -> str:
        return pitfall_doc(self.pitfall) if self.pitfall else ""

    def __str__(self) -> str:
        details = {"evidence": self.evidence, "effect": self.effect, "fix": self.fix, "see": self.doc}
        return "\n".join([f"[{self.level}] {self.name}: {self.message}"] + [
            f"    {label}: {value}" for label, value in details.items() if value
        ])


@dataclass
class Part:
    """One thing wrong within a pitfall; a check merges its parts into one `Finding`."""

    level: Literal["error", "warning"]
    message: str
    evidence: str
    effect: str = ""
    fix: str = ""


@dataclass
class Subject:
    """What the checks look at. Only `model` and `tokenizer` are always there; each check
    uses what it finds and says nothing about what is absent."""

    model: Any
    tokenizer: Any
    image_processor: Any = None
    labels: torch.Tensor | None = None  # (B, L) as the model receives them, -100 padded or not
    rows: list[list[int]] | None = None  # label ids of each line, padding stripped
    texts: list[str] | None = None  # the raw text of each row
    pixel_values: torch.Tensor | None = None
    source_images: list[torch.Tensor] | None = None  # uint8 images pixel_values were made from (the recipe's probe)
    generation: Any = None  # the GenerationConfig decoding really uses
    generation_sources: dict[str, str] = field(default_factory=dict)  # setting -> where it was found
    config_generation_settings: dict[str, Any] = field(default_factory=dict)  # generation keys on model.config
    generate_error: str | None = None  # what generate() said when it refused the model's settings
    evaluation: dict | None = None  # the user's predictions beside generate() and teacher forcing
    metrics: dict | None = None  # the user's compute_metrics on one batch (a Trainer script)
    corpus: dict | None = None  # {"name", "rows"}: label rows of a whole dataset, for counts
    learning_rate: float | None = None
    checkpoint: str | None = None  # the model's name or folder
    fine_tuned: bool | None = None  # None: judged by the checkpoint's name
    checkpoint_tokenizer: Any = None  # the checkpoint's own, when the processor comes from elsewhere
    checkpoint_image_processor: Any = None
    processor_source: str | None = None
    max_target_length: int | None = None  # labels this long may be truncated: not compared with their texts
    saved_processor: bool = False  # the processor is saved beside the model for inference (its resample matters)


CHECKS: dict[int, tuple[str, Callable[[Subject], Finding | None]]] = {}


def pitfall(number: int, name: str):
    """Registers a check as THE check of pitfall `number`, whose finding is called `name`."""

    def register(check):
        if number in CHECKS:
            raise ValueError(f"pitfall {number} has two checks: {CHECKS[number][1].__name__} and {check.__name__}")
        CHECKS[number] = (name, check)
        check.pitfall, check.finding_name = number, name
        return check

    return register


def merge(check, parts: list[Part]) -> Finding | None:
    """The parts a check found, as its one finding (an error when any part is one)."""
    if not parts:
        return None
    unique = lambda values: "; ".join(dict.fromkeys(value for value in values if value))  # noqa: E731
    return Finding(
        check.finding_name,
        "error" if any(part.level == "error" for part in parts) else "warning",
        " ".join(part.message for part in parts),
        pitfall=check.pitfall,
        evidence=unique(part.evidence for part in parts),
        effect=" ".join(dict.fromkeys(part.effect for part in parts if part.effect)),
        fix=unique(part.fix for part in parts),
    )


def combine(first: Finding, second: Finding) -> Finding:
    """Two findings of one check (e.g. on the training and the evaluation lines) as one."""
    join = lambda a, b, sep: sep.join(dict.fromkeys(value for value in (a, b) if value))  # noqa: E731
    level = "error" if "error" in (first.level, second.level) else "warning"
    return Finding(first.name, level, join(first.message, second.message, " "), pitfall=first.pitfall,
                   evidence=join(first.evidence, second.evidence, "; "), effect=join(first.effect, second.effect, " "),
                   fix=join(first.fix, second.fix, "; "))


def quote(row: list[int], head: bool = True) -> str:
    return f"{row[:8]}{' ...' if len(row) > 8 else ''}" if head else f"[... {str(row[-8:])[1:]}"


def same_id(value, expected) -> bool:
    """generation_config.eos_token_id may be a list of stop ids."""
    return expected in value if isinstance(value, list) else value == expected


def text_ids(row: list[int], tokenizer) -> list[int]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [token for token in row if token not in special]
