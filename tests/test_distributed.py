"""The distributed path on the CPU: two gloo processes against one, same global batch."""

import json
import os
import subprocess
import sys

import pytest
from datasets import load_from_disk
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

from conftest import ROOT
from trocr_recipe.outputs import read_jsonl


def launch(config: str, args: list[str]) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / config), str(ROOT / "run_trocr.py"), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.fixture
def no_dropout_model(tiny_model, tmp_path):
    """Dropout masks are drawn per process: with them off, a rank's half batch computes
    exactly what the same lines compute in one process."""
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    model.config.decoder.dropout = 0.0
    path = tmp_path / "no_dropout"
    model.save_pretrained(path)
    TrOCRProcessor.from_pretrained(tiny_model).save_pretrained(path)
    return path


def test_two_processes_match_one(tiny_args, tiny_data, no_dropout_model, tmp_path):
    common = tiny_args + ["--model_name_or_path", str(no_dropout_model), "--no_augment", "--max_steps", "6",
                          "--eval_steps", "3", "--save_steps", "3"]
    launch("single_gpu.yaml", common + ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4",
                                        "--use_cpu"])
    launch("cpu_2proc.yaml", common + ["--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2",
                                      "--use_cpu"])

    one, two = (read_jsonl(tmp_path / name / "loss_log.jsonl") for name in ("one", "two"))
    assert [row["step"] for row in one] == [row["step"] for row in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-6)

    results = {name: json.loads((tmp_path / name / "all_results.json").read_text()) for name in ("one", "two")}
    for key in ("baseline_cer", "eval_cer", "test_cer"):
        assert results["two"][key] == pytest.approx(results["one"][key], abs=1e-9), key

    # 7 test lines over 2 ranks: every line scored once, none twice, in dataset order.
    test_ids = list(load_from_disk(str(tiny_data))["test"]["id"])
    assert len(test_ids) % 2 == 1
    for name in ("one", "two"):
        assert [row["id"] for row in read_jsonl(tmp_path / name / "predictions_test.jsonl")] == test_ids
    # Only the main process writes: one copy of each output, no per-rank files.
    assert sorted(p.name for p in (tmp_path / "two").glob("*.json*")) == sorted(
        p.name for p in (tmp_path / "one").glob("*.json*"))
