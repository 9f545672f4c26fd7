"""The recipe's preflight: the pitfall checks of trocr_recipe.pitfalls (the same ones that check
a loop of your own) on the recipe's model, a sample of its training labels and a probe batch
through its collator, plus what only a recipe knows (the checkpoint's own tokenizer and image
processor, the learning rate). `raise_on_errors` logs the warnings and stops the run listing
every error at once (with `strict`, warnings stop it too). `preflight_forward` is one forward
pass on one training batch, for `--preflight_only`."""

import logging
import math

import torch
from datasets import DatasetDict
from transformers import AutoImageProcessor, AutoTokenizer

from .data import image_size
from .pitfalls import PITFALLS_DOC, Finding, Subject, pitfall_doc
from .pitfalls import run_checks as run_pitfall_checks
from .pitfalls.generation import config_generation_settings, effective_generation

__all__ = ["Finding", "PITFALLS_DOC", "pitfall_doc", "run_checks", "preflight", "run_preflight"]

logger = logging.getLogger(__name__)

SAMPLE_SIZE = 64  # training lines whose labels and texts are checked
# Pitfalls a recipe cannot have: it evaluates with generate() on the corpus, and each recipe sets its beams.
PREFLIGHT_PITFALLS = [number for number in range(1, 15) if number not in (8, 10, 13)]


def probe_batch(collator, labels: list[list[int]], size: tuple[int, int]) -> tuple[list[dict], dict]:
    """The collator on the shortest and the longest sampled label (padding whenever lengths
    differ, as in any real line set) with a uint8 image whose channels differ (so that
    per-channel mean/std show)."""
    height, width = size
    ramp = torch.arange(height * width).view(1, height, width)
    pixels = ((ramp + torch.tensor([0, 85, 170]).view(3, 1, 1)) % 256).to(torch.uint8)
    features = [{"pixel_values": pixels, "labels": ids} for ids in (min(labels, key=len), max(labels, key=len))]
    return features, collator(features)


def _checkpoint_own(loader, model_args):
    """The checkpoint's own tokenizer or image processor when the processor comes from
    elsewhere; None when it is the checkpoint's or the checkpoint ships none."""
    source = model_args.processor_name_or_path
    if not source or source == model_args.model_name_or_path:
        return None
    try:
        return loader.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
            trust_remote_code=False,  # never a folder's own code (modeling.pretrained says why)
        )
    except (OSError, ValueError):
        return None


# Running the checks and acting on them.


def run_checks(
    run,
    model_args,
    data_args,
    training_args,
    *,
    sample_size: int = SAMPLE_SIZE,
    fine_tuned: bool | None = None,
) -> list[Finding]:
    """Every pitfall check on what `pipeline.prepare_run` built (a `RunInputs`): its model, the
    first `sample_size` training labels and texts, a probe batch through its collator and the
    labels of every split; never the dataset's images."""
    return run_pitfall_checks(recipe_subject(run, model_args, data_args, training_args, sample_size, fine_tuned),
                              PREFLIGHT_PITFALLS)


def recipe_subject(run, model_args, data_args, training_args, sample_size=SAMPLE_SIZE, fine_tuned=None) -> Subject:
    """The recipe's own objects as the checks see them, with what only a recipe knows: the
    checkpoint's own tokenizer and image processor, and the learning rate."""
    model, tokenizer, image_processor = run.model, run.processor.tokenizer, run.processor.image_processor
    # Without the on-the-fly image transform, reading labels decodes no image.
    splits = DatasetDict({role: split.with_format(None) for role, split in run.inputs.items()})
    labels = splits["train"]["labels"][:sample_size]
    features, batch = probe_batch(run.collator, labels, image_size(image_processor))
    generation, sources = effective_generation(model, {"max_length": training_args.generation_max_length,
                                                       "num_beams": training_args.generation_num_beams},
                                               "training_args")
    return Subject(
        model=model, tokenizer=tokenizer, image_processor=image_processor, labels=batch["labels"], rows=labels,
        texts=run.references["train"][:sample_size], pixel_values=batch["pixel_values"],
        source_images=[feature["pixel_values"] for feature in features], generation=generation,
        generation_sources=sources, config_generation_settings=config_generation_settings(model.config),
        corpus={"name": "the dataset's splits", "rows": [row for split in splits.values() for row in split["labels"]]},
        learning_rate=training_args.learning_rate, checkpoint=model_args.model_name_or_path, fine_tuned=fine_tuned,
        checkpoint_tokenizer=_checkpoint_own(AutoTokenizer, model_args),
        checkpoint_image_processor=_checkpoint_own(AutoImageProcessor, model_args),
        processor_source=model_args.processor_name_or_path, max_target_length=data_args.max_target_length,
        saved_processor=True,
    )


def format_findings(findings: list[Finding], strict: bool = False) -> str:
    if not findings:
        return "Preflight checks: every check passed."
    lines = [f"Preflight checks found {len(findings)} problem(s) that would spoil the run (see {PITFALLS_DOC}):"]
    lines += [f"- {finding}" for finding in findings]
    if strict and any(finding.level == "warning" for finding in findings):
        lines.append("(preflight_strict: warnings count as errors)")
    return "\n".join(lines)


def raise_on_errors(findings: list[Finding], strict: bool = False) -> None:
    """Logs the warnings; stops the run listing every error at once (every warning too when strict)."""
    blocking = [finding for finding in findings if strict or finding.level == "error"]
    for finding in findings:
        if finding not in blocking:
            logger.warning("Preflight %s", finding)
    if blocking:
        raise SystemExit(format_findings(blocking, strict))
    logger.info("Preflight checks passed with %d warning(s)", len(findings))


def preflight(run, model_args, data_args, training_args, strict: bool = False, **options) -> list[Finding]:
    """`run_checks` then `raise_on_errors`: what both loops call before training."""
    findings = run_checks(run, model_args, data_args, training_args, **options)
    raise_on_errors(findings, strict)
    return findings


def preflight_forward(model, collator, train_split, batch_size: int) -> float:
    """One forward pass (eval mode, no gradients) on the first training batch; stops the run
    when the loss is not finite. Reading the train split runs its augmentation, which draws
    from the global `random` state: meant for `--preflight_only`."""
    features = [train_split[index] for index in range(min(batch_size, len(train_split)))]
    batch = {key: value.to(model.device) for key, value in collator(features).items()}
    training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(training)
    if not math.isfinite(loss):
        raise_on_errors([
            Finding(
                "forward_loss",
                "error",
                f"the loss of the first training batch is {loss}, not finite: NaN or inf weights in the checkpoint, "
                "or pixel values or label ids out of range. Nothing can be trained from it.",
            )
        ])
    vocabulary = model.decoder.get_input_embeddings().num_embeddings
    logger.info(
        "Preflight forward pass: loss %.4f on %d training lines (a model that knows nothing: ln(%d) = %.2f)",
        loss, len(features), vocabulary, math.log(vocabulary),
    )
    return loss


def run_preflight(run, model_args, data_args, training_args) -> dict | None:
    """Both loops' step before training: stop on errors (and warnings, when strict). With
    `preflight_only`, also one forward pass and a printed report, returned as the result."""
    findings = preflight(run, model_args, data_args, training_args, strict=data_args.preflight_strict)
    if not data_args.preflight_only:
        return None
    loss = preflight_forward(run.model, run.collator, run.inputs["train"], training_args.per_device_train_batch_size)
    print(format_findings(findings, data_args.preflight_strict))
    print(f"One training batch forward: loss {loss:.4f}")
    return {"preflight_findings": [str(finding) for finding in findings], "preflight_loss": loss}
