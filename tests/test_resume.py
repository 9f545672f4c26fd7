"""A run killed in the middle of training and started again with the same command ends
exactly as an uninterrupted run; checkpoints half-written by the kill are never resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import run_trocr
from conftest import ROOT
from trocr_recipe.checkpoints import is_complete, last_complete_checkpoint
from trocr_recipe.outputs import read_jsonl

SCHEDULE = ["--max_steps", "12", "--save_steps", "4", "--eval_steps", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def command(tiny_args, output_dir):
    # The recipe, float32 on the CPU, its seed, dropout on. Augmentation off: it draws from
    # the global `random` state in the loader, which reads one batch ahead, so the batch
    # after a checkpoint is augmented before its state is saved, and a resume in the middle
    # of an epoch (step 8 of 6-step epochs here) augments its first two batches differently.
    return [sys.executable, str(ROOT / "run_trocr.py"), *tiny_args, "--output_dir", str(output_dir), *SCHEDULE,
            "--no_augment"]


def finish(process, log):
    assert process.wait(timeout=240) == 0, log.read_text()[-3000:]


def test_killed_run_resumes_to_the_same_end(tiny_args, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    with open(tmp_path / "reference.log", "w") as ref_log, open(tmp_path / "killed.log", "w") as killed_log:
        uninterrupted = subprocess.Popen(command(tiny_args, reference), cwd=ROOT, env=ENV, stdout=ref_log,
                                         stderr=subprocess.STDOUT)
        killed = subprocess.Popen(command(tiny_args, resumed), cwd=ROOT, env=ENV, stdout=killed_log,
                                  stderr=subprocess.STDOUT)
        # SIGKILL as soon as checkpoint-8 has begun its last file: a real kill, wherever it lands.
        marker, deadline = resumed / "checkpoint-8" / "trainer_state.json", time.monotonic() + 240
        while not marker.exists():
            assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
    assert not (resumed / "all_results.json").exists()
    # The kill may land while trainer_state.json is being written: then checkpoint-8 is not complete.
    expected = 8 if is_complete(resumed / "checkpoint-8") else 4

    # The same command again, while the uninterrupted run goes on.
    done = subprocess.run(command(tiny_args, resumed), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    finish(uninterrupted, tmp_path / "reference.log")
    log = done.stdout + done.stderr
    assert re.search(rf"Resuming from \S*checkpoint-{expected}\b", log), log[-3000:]
    if expected == 4:
        assert re.search(r"Skipping \S*checkpoint-8: incomplete checkpoint", log)

    # Every step once, with the uninterrupted run's loss and learning rate, bit for bit.
    rows_a, rows_b = read_jsonl(reference / "loss_log.jsonl"), read_jsonl(resumed / "loss_log.jsonl")
    assert [row["step"] for row in rows_b] == list(range(1, 13))
    assert rows_b == rows_a
    # The same weights at the last checkpoint, the same final model, scores and predictions.
    for weights in ("checkpoint-12/model.safetensors", "model.safetensors"):
        tensors_a, tensors_b = load_file(reference / weights), load_file(resumed / weights)
        assert tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[name], tensors_b[name]) for name in tensors_a), weights
    results_a = json.loads((reference / "all_results.json").read_text())
    results_b = json.loads((resumed / "all_results.json").read_text())
    for key in ("baseline_cer", "eval_cer", "eval_wer", "test_cer", "test_wer"):
        assert results_b[key] == results_a[key], key
    assert read_jsonl(resumed / "predictions_test.jsonl") == read_jsonl(reference / "predictions_test.jsonl")
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 12


def test_half_written_checkpoint_is_skipped(tiny_args, tmp_path, caplog):
    out = tmp_path / "run"
    first = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "4"]
    run_trocr.main(tiny_args + first)
    assert is_complete(out / "checkpoint-8")
    rows = read_jsonl(out / "loss_log.jsonl")

    # Started again at max_steps, in the middle of an epoch (6 steps each): nothing left to
    # train. The stock trainer runs a 9th step and saves checkpoint-9.
    caplog.clear()
    results = run_trocr.main(tiny_args + first)
    assert re.search(r"Resuming from \S*checkpoint-8\b", caplog.text)
    assert "nothing left to train" in caplog.text
    assert not (out / "checkpoint-9").exists()
    assert read_jsonl(out / "loss_log.jsonl") == rows
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    assert results["train_loss"] == pytest.approx(sum(row["loss"] for row in rows) / len(rows))

    # What a kill while saving step 12 leaves: a folder with the config only.
    (out / "checkpoint-12").mkdir()
    (out / "checkpoint-12" / "config.json").write_text((out / "checkpoint-8" / "config.json").read_text())
    caplog.clear()
    run_trocr.main(tiny_args + SCHEDULE)
    assert re.search(r"Skipping \S*checkpoint-12: incomplete checkpoint", caplog.text)
    assert re.search(r"Resuming from \S*checkpoint-8\b", caplog.text)
    assert [row["step"] for row in read_jsonl(out / "loss_log.jsonl")] == list(range(1, 13))
    assert read_jsonl(out / "loss_log.jsonl")[:8] == rows
    assert is_complete(out / "checkpoint-12")  # saved again, whole
    assert json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["global_step"] == 12


def test_what_makes_a_checkpoint_complete(tmp_path, caplog):
    def checkpoint(step, state):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        return folder

    good = checkpoint(4, json.dumps({"global_step": 4, "log_history": []}, indent=2))
    checkpoint(8, json.dumps({"global_step": 8, "log_history": []}, indent=2)[:20])  # cut while written
    checkpoint(12, "")  # created, nothing written yet
    checkpoint(16, None)  # killed before trainer_state.json
    checkpoint(20, json.dumps({"global_step": 4}))  # not this folder's state
    (tmp_path / "checkpoint-24").write_text("a file, not a checkpoint")
    assert last_complete_checkpoint(tmp_path) == str(good)
    assert all(f"checkpoint-{step}" in caplog.text for step in (8, 12, 16, 20))
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-12", "checkpoint-16", "checkpoint-20", "checkpoint-24", "checkpoint-4", "checkpoint-8"]
    assert last_complete_checkpoint(tmp_path, remove_incomplete=True) == str(good)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-24", "checkpoint-4"]


def test_an_incomplete_checkpoint_named_on_the_command_line_stops_the_run(tiny_args, tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(SystemExit, match="checkpoint-4: not a complete checkpoint \\(no valid trainer_state.json\\)"):
        run_trocr.main(tiny_args + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-4")])


def test_loss_log_keeps_each_step_once_after_a_resume(tmp_path):
    from trocr_recipe.outputs import LossLog

    log = LossLog(str(tmp_path))
    log.start(0)
    for step in range(1, 11):
        log.append(step, 1.0 / step, 1e-4)
    with log.path.open("a") as stream:
        stream.write('{"step": 11, "lo')  # a line cut by the kill
    log.start(8)  # resumed from checkpoint-8
    log.append(9, 0.5, 1e-4)
    assert [row["step"] for row in read_jsonl(log.path)] == list(range(1, 10))
    assert not list(tmp_path.glob("*.tmp"))
