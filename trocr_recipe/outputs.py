"""What a run writes, the same for both loops: the per-step loss log, predictions files,
all_results.json and the model card."""

import json
import logging
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import atomic_write_text, read_json_object
from .figures import training_curves_figure, worst_lines_figure
from .metrics import line_cer

logger = logging.getLogger("trocr_recipe")

LOSS_LOG = "loss_log.jsonl"
RESULTS = "all_results.json"


class JsonlLog:
    """A JSONL log of one row per step (`loss_log.jsonl`, `eval_log.jsonl`). On resume, rows
    past the resumed step are dropped so the file never holds a step twice."""

    def __init__(self, output_dir: str, name: str):
        self.path = Path(output_dir) / name

    def start(self, resumed_step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if self.path.exists() and resumed_step > 0:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut by a killed run
                    pass
        # Rewritten whole, then renamed: a run killed here keeps the earlier log intact.
        partial = self.path.with_name(self.path.name + ".tmp")
        write_jsonl(partial, [row for row in rows if row.get("step", resumed_step + 1) <= resumed_step])
        os.replace(partial, self.path)

    def write(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(row) + "\n")

    def read(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []


class LossLog(JsonlLog):
    """`loss_log.jsonl`: one {"step", "loss", "learning_rate", "epoch"} per optimizer step."""

    def __init__(self, output_dir: str):
        super().__init__(output_dir, LOSS_LOG)

    def append(self, step: int, loss: float, learning_rate: float, epoch: float | None = None, **terms) -> None:
        """`terms`: parts of the loss a method logs beside it (docs/custom_loop.md)."""
        row = {"step": step, "loss": loss, "learning_rate": learning_rate}
        if epoch is not None:
            row["epoch"] = epoch
        self.write({**row, **terms})


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_predictions(output_dir: str, split: str, ids, references, predictions) -> list[dict]:
    rows = [
        {"id": i, "reference": ref, "prediction": pred, "cer": round(line_cer(ref, pred), 4)}
        for i, ref, pred in zip(ids, references, predictions)
    ]
    write_jsonl(Path(output_dir) / f"predictions_{split}.jsonl", rows)
    return rows


def write_split_report(output_dir: str, split: str, ids, references, predictions, images) -> None:
    """predictions_<split>.jsonl, and worst_<split>.png: the lines with the largest CER,
    image above reference and prediction, for a person to scan."""
    rows = write_predictions(output_dir, split, ids, references, predictions)
    worst_lines_figure(
        Path(output_dir) / f"worst_{split}.png", images, references, predictions, ids, [row["cer"] for row in rows]
    )


def log_scores(role: str, prefix: str, scores: dict, references, predictions, skipped: int = 0, samples: int = 5) -> None:
    """The split's CER and WER, with the lines the data check skipped (never a silent loss)."""
    note = f" ({skipped} lines skipped by the data check, named in data_report.json)" if skipped else ""
    logger.info("%s CER %.2f WER %.2f%s", role, scores[f"{prefix}_cer"], scores[f"{prefix}_wer"], note)
    for reference, prediction in list(zip(references, predictions))[:samples]:
        logger.info("  reference:  %s\n  prediction: %s", reference, prediction)


def write_training_curves(output_dir: str, eval_rows: list[dict]) -> None:
    """training_curves.png: loss and learning rate per step (from loss_log.jsonl) and the
    validation CER of each evaluation (`{"step", "eval_cer"}` rows)."""
    training_curves_figure(Path(output_dir) / "training_curves.png", LossLog(output_dir).read(), eval_rows)


def update_results(output_dir: str, results: dict) -> dict:
    """Merge into all_results.json (a resumed or evaluation-only run keeps earlier keys)."""
    path = Path(output_dir) / RESULTS
    merged = read_results(output_dir)
    merged.update(results)
    atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def read_results(output_dir) -> dict:
    """all_results.json of a run folder ({} when absent); a broken one stops with its fix.
    A run reads it before it trains, so that it is not found broken at the end."""
    path = Path(output_dir) / RESULTS
    if not path.exists():
        return {}
    return read_json_object(path, "remove it (the run writes it again) or start afresh with --overwrite_output_dir")


def finish_run(output_dir: str, model_args, data_args, results: dict) -> dict:
    """The end of a run, main process only: all_results.json merged, the model card, and
    the headline figures logged."""
    # Imported here, not at the top: generation loads transformers, which compare_runs.py
    # (a reader of this module's logs) does not need.
    from .generation import fallback_count

    # Parts of generation's fast path off in this process's generate calls (each warned once).
    results = update_results(output_dir, {**results, "generation_fast_path_fallbacks": fallback_count()})
    write_model_card(output_dir, model_args, data_args, results)
    shown = ("baseline_cer", "eval_cer", "eval_skipped_lines", "test_cer", "test_skipped_lines")
    logger.info("Results: %s", {key: results[key] for key in shown if key in results})
    return results


def hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id, None for a local path (the Hub rejects a card whose
    `base_model` or `datasets` is not one)."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def write_model_card(output_dir: str, model_args, data_args, results: dict) -> None:
    """README.md with the results, in the Hub's model-index format (cer / wer on the test
    split, else validation), and `base_model` / `datasets` when they are Hub ids."""
    split = "test" if "test_cer" in results else "eval"
    base_model, dataset = hub_id(model_args.model_name_or_path), hub_id(data_args.dataset_name)
    dataset_label = dataset or Path(data_args.dataset_name).name  # a local folder: its name
    eval_results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Handwritten text recognition",
            dataset_type=dataset_label,
            dataset_name=dataset_label,
            dataset_config=getattr(data_args, "dataset_config_name", None),
            dataset_split=getattr(data_args, f"{'test' if split == 'test' else 'validation'}_split"),
            metric_type=metric,
            metric_name=metric.upper(),
            metric_value=round(results[f"{split}_{metric}"], 4),
        )
        for metric in ("cer", "wer")
        if f"{split}_{metric}" in results
    ]
    data = ModelCardData(
        base_model=base_model,
        datasets=[dataset] if dataset else None,
        library_name="transformers",
        tags=["trocr", "ocr", "handwriting"],
        model_name=Path(output_dir).name,
        eval_results=eval_results or None,
        pipeline_tag="image-to-text",
    )
    rows = "\n".join(f"| {key} | {value:.4g} |" for key, value in sorted(results.items()) if isinstance(value, float))
    content = f"""---
{data.to_yaml()}
---

# {Path(output_dir).name}

TrOCR fine-tuned from `{model_args.model_name_or_path}` on `{data_args.dataset_name}`; the
model-index scores are on its `{eval_results[0].dataset_split if eval_results else "?"}` split.
CER and WER are corpus-level percentages, case-sensitive, on raw reference strings,
decoded with beam search (see `generation_config.json`).

| metric | value |
|---|---|
{rows}

## Use

```python
from PIL import Image
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

processor = TrOCRProcessor.from_pretrained("{Path(output_dir).name}")
model = VisionEncoderDecoderModel.from_pretrained("{Path(output_dir).name}")
ids = model.generate(processor(images=Image.open("line.png").convert("RGB"), return_tensors="pt").pixel_values)
print(processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0])
```
"""
    ModelCard(content).save(Path(output_dir) / "README.md")
