"""A deterministic reference trace a foreign training loop can replay step by step:
the exact batches the reference consumed (`ReferenceBatches`) and a loss log in the
format compare_runs.py reads (`StepLog`). See docs/step_comparison.md."""

import json
from pathlib import Path

import torch

from .outputs import LossLog

TRACE_DIR = "trace"
SETTINGS = "settings.json"
STEPS = "steps.jsonl"


class ReferenceBatches:
    """The reference run's batches, one per optimizer step in order, as
    `{"pixel_values": FloatTensor, "labels": LongTensor}` (normalized, -100 padded)."""

    def __init__(self, trace_dir):
        self.trace_dir = Path(trace_dir)
        self.settings = json.loads((self.trace_dir / SETTINGS).read_text(encoding="utf-8"))
        self.steps = [json.loads(line) for line in (self.trace_dir / STEPS).read_text(encoding="utf-8").splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        from safetensors.torch import load_file

        for row in self.steps:
            tensors = load_file(self.trace_dir / row["file"])
            yield {"pixel_values": tensors["pixel_values"], "labels": tensors["labels"].to(torch.long)}


class StepLog(LossLog):
    """`loss_log.jsonl` for a foreign loop: one row per optimizer step, `loss` the step's
    mean token loss. A context manager, or call `.close()`."""

    def __init__(self, output_dir):
        super().__init__(str(output_dir))
        self.start(0)

    def log(self, step: int, loss: float, learning_rate: float, grad_norm: float | None = None) -> None:
        row = {"step": int(step), "loss": float(loss), "learning_rate": float(learning_rate)}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        self.write(row)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
