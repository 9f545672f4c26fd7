"""Never keep a model worse than the start, in both loops: the final model's validation score
on the configured metric (metric_for_best_model: cer or wer) against the starting model's
score on the same metric; the starting weights are restored when training did not beat it."""

import logging

import numpy as np

from .checkpoints import load_checkpoint_weights

logger = logging.getLogger("trocr_recipe")

# The starting model's scores are `baseline_<metric>`; a final model that no evaluation during
# training scored is scored as `trained_<metric>` before the decision.
BASELINE, TRAINED = "baseline", "trained"


def metric_name(training_args) -> str:
    """cer or wer: metric_for_best_model without its eval_ prefix (CER when unset)."""
    return (training_args.metric_for_best_model or "cer").removeprefix("eval_")


def is_better(training_args, value: float, than: float) -> bool:
    return bool(np.greater(value, than) if training_args.greater_is_better else np.less(value, than))


def decide(model, model_args, training_args, trained: float, baseline: float, source: str) -> dict:
    """Keep the trained model if its score `trained` (from `source`: "best checkpoint", "last
    evaluation" or "final model scored") beats `baseline`, else restore the starting weights
    into `model`. Logs the decision with both scores; returns them for all_results.json."""
    metric = metric_name(training_args)
    keep = is_better(training_args, trained, baseline)
    results = {"final_model": "trained" if keep else "starting", "final_model_metric": metric,
               f"final_model_trained_{metric}": trained, f"final_model_baseline_{metric}": baseline}
    if keep:
        logger.info("Never worse: keeping the trained model (validation %s %.2f, %s; the starting model's %.2f)",
                    metric.upper(), trained, source, baseline)
        return results
    logger.warning(
        "\n%s\nTRAINING NEVER BEAT THE BASELINE (validation %s %.2f, %s; baseline %.2f):\n"
        "the saved model is the starting checkpoint %s, not a trained one.\n%s",
        "!" * 78, metric.upper(), trained, source, baseline, model_args.model_name_or_path, "!" * 78,
    )
    load_checkpoint_weights(
        model, model_args.model_name_or_path, revision=model_args.model_revision, cache_dir=model_args.cache_dir
    )
    return {**results, "kept_starting_model": True}
