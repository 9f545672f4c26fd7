"""The custom loop (run_trocr_no_trainer.py) against the reference (run_trocr.py): the same
per-step losses, learning rates and predictions on the tiny recipe; its outputs; a loop
that departs from the reference is caught at step 1; resume from the last complete
checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from datasets import load_from_disk
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

import run_trocr
import run_trocr_no_trainer
import trocr_recipe.data
import trocr_recipe.pipeline
from conftest import ROOT
from trocr_recipe.outputs import read_jsonl

STEPS = 20
# Warmup, weight decay large enough that decaying the LayerNorm weights and biases too shows
# in the losses, clipping that bites (the tiny model's gradient norms are above 1), dropout
# (0.1 in the tiny decoder) and the augmentation on: all that draws random numbers or shapes
# an update.
PARITY_FLAGS = ["--max_steps", str(STEPS), "--warmup_steps", "3", "--weight_decay", "0.1", "--max_grad_norm", "0.5",
                "--learning_rate", "1e-3", "--eval_steps", "10", "--save_steps", "10"]
CASES = {
    # The recipe's whole flow: baseline, evaluations at steps 10 and 20 (each pass over a
    # DataLoader draws from torch's generator, so they shift the dropout masks after them),
    # best checkpoint, the starting model kept when no evaluation beats the baseline (the
    # tiny model's case in 20 steps).
    "ga1-recipe": ["--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "4"],
    # No evaluation (an eval strategy would force do_eval): the final model is the trained
    # one, so that the predictions compared come from trained weights.
    "ga2-trained": ["--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2",
                    "--eval_strategy", "no", "--load_best_model_at_end", "false", "--do_eval", "false"],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two cores shared with other jobs: one thread per run is faster and just as exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe_args(tiny_data, tiny_model, output_dir):
    """What the conftest's `tiny_args` gives, for runs shared by several tests."""
    return [str(ROOT / "recipes" / "tiny.json"), "--model_name_or_path", str(tiny_model),
            "--dataset_name", str(tiny_data), "--output_dir", str(output_dir)]


@pytest.fixture(scope="module")
def runs(tiny_data, tiny_model, tmp_path_factory):
    """Both loops on each case, run once per module: {case: (reference_dir, custom_dir)}."""
    cache = {}

    def get(case):
        if case not in cache:
            base = tmp_path_factory.mktemp(case)
            folders = base / "trainer", base / "custom"
            for main, folder in zip((run_trocr.main, run_trocr_no_trainer.main), folders):
                main(recipe_args(tiny_data, tiny_model, folder) + PARITY_FLAGS + CASES[case])
            cache[case] = folders
        return cache[case]

    return get


def losses(folder):
    return read_jsonl(folder / "loss_log.jsonl")


def relative_gaps(reference_rows, custom_rows):
    return [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(reference_rows, custom_rows)]


def assert_same_weights(model_a, model_b):
    state_b = model_b.state_dict()
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


@pytest.mark.parametrize("case", list(CASES))
def test_per_step_parity_with_the_trainer(runs, case, tiny_model):
    reference, custom = runs(case)
    rows_a, rows_b = losses(reference), losses(custom)
    assert [row["step"] for row in rows_a] == [row["step"] for row in rows_b] == list(range(1, STEPS + 1))
    gap = max(relative_gaps(rows_a, rows_b))
    print(f"{case}: largest relative gap between the per-step losses over {STEPS} steps: {gap:.3g}")
    assert gap <= 1e-5
    assert [row["learning_rate"] for row in rows_a] == [row["learning_rate"] for row in rows_b]
    assert [row["epoch"] for row in rows_a] == pytest.approx([row["epoch"] for row in rows_b], abs=1e-12)
    assert rows_a[0]["learning_rate"] == 0.0 and rows_a[3]["learning_rate"] == pytest.approx(1e-3)  # the warmup

    # The same text out of the final model, line for line; the same final weights.
    predictions_a = [row["prediction"] for row in read_jsonl(reference / "predictions_test.jsonl")]
    predictions_b = [row["prediction"] for row in read_jsonl(custom / "predictions_test.jsonl")]
    assert predictions_a == predictions_b
    assert_same_weights(VisionEncoderDecoderModel.from_pretrained(reference),
                        VisionEncoderDecoderModel.from_pretrained(custom))
    results_a = json.loads((reference / "all_results.json").read_text())
    results_b = json.loads((custom / "all_results.json").read_text())
    assert results_b["train_loss"] == pytest.approx(results_a["train_loss"], rel=1e-6)
    assert results_b["test_cer"] == results_a["test_cer"]
    assert results_b.get("kept_starting_model") == results_a.get("kept_starting_model")

    if case == "ga1-recipe":
        # The validation CER during training, generated from trained weights, step for step.
        history = json.loads((reference / "trainer_state.json").read_text())["log_history"]
        curve_a = {entry["step"]: entry["eval_cer"] for entry in history if "eval_cer" in entry}
        curve_b = {row["step"]: row["eval_cer"] for row in read_jsonl(custom / "eval_log.jsonl")}
        assert curve_a == curve_b and sorted(curve_b) == [10, 20]
        assert results_b["baseline_cer"] == results_a["baseline_cer"]
        if results_b.get("kept_starting_model"):
            assert_same_weights(VisionEncoderDecoderModel.from_pretrained(custom),
                                VisionEncoderDecoderModel.from_pretrained(tiny_model))
    else:
        # The comparison means something: training moved the weights both loops agree on.
        trained = VisionEncoderDecoderModel.from_pretrained(custom).state_dict()
        start = VisionEncoderDecoderModel.from_pretrained(tiny_model).state_dict()
        assert any(not torch.equal(tensor, start[name]) for name, tensor in trained.items())
        assert results_b.get("kept_starting_model") is None


def test_custom_loop_writes_every_output(runs, tiny_data, processor):
    _, out = runs("ga1-recipe")
    results = json.loads((out / "all_results.json").read_text())
    for key in ("baseline_cer", "baseline_wer", "eval_cer", "eval_wer", "test_cer", "test_wer", "train_loss"):
        assert isinstance(results[key], float), key

    rows = losses(out)
    assert all(set(row) == {"step", "loss", "learning_rate", "epoch"} for row in rows)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["epoch"] == pytest.approx(STEPS / 6)  # 24 lines, batches of 4
    assert results["train_loss"] == pytest.approx(sum(row["loss"] for row in rows) / STEPS)
    evaluations = read_jsonl(out / "eval_log.jsonl")
    assert [set(row) for row in evaluations] == [{"step", "eval_cer", "eval_wer"}] * 2

    # Every line scored once, in dataset order, against its raw reference.
    dataset = load_from_disk(str(tiny_data))
    for split, role in (("test", "test"), ("validation", "validation")):
        predictions = read_jsonl(out / f"predictions_{role}.jsonl")
        assert [row["id"] for row in predictions] == list(dataset[split]["id"])
        assert [row["reference"] for row in predictions] == list(dataset[split]["text"])

    # The output folder and every checkpoint load with from_pretrained, processor included.
    VisionEncoderDecoderModel.from_pretrained(out)
    assert TrOCRProcessor.from_pretrained(out).tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 2 and generation["num_beams"] == 2
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-10", "checkpoint-20"]  # save_total_limit 2
    for checkpoint in checkpoints:
        assert (checkpoint / run_trocr_no_trainer.COMPLETE).exists()
        assert (checkpoint / "processor_config.json").exists() and (checkpoint / "optimizer.bin").exists()
        VisionEncoderDecoderModel.from_pretrained(checkpoint)
    assert "test_cer" in (out / "README.md").read_text()
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"


def test_a_loop_that_keeps_bos_departs_at_step_1(runs, tiny_args, tmp_path, monkeypatch):
    """Pitfalls 1 and 2 together (decoder starting from <s>, <s> kept in the labels): the
    comparison with the reference sees it at the first step."""
    reference, _ = runs("ga1-recipe")
    encode_labels, prepare_run = trocr_recipe.data.encode_labels, trocr_recipe.pipeline.prepare_run

    def labels_with_bos(tokenizer, texts, max_target_length):
        labels, truncated = encode_labels(tokenizer, texts, max_target_length)
        return [[tokenizer.bos_token_id] + ids for ids in labels], truncated

    def start_from_bos(*args):
        run = prepare_run(*args)
        for config in (run.model.config, run.model.generation_config):
            config.decoder_start_token_id = run.processor.tokenizer.bos_token_id
        return run

    monkeypatch.setattr(trocr_recipe.data, "encode_labels", labels_with_bos)
    monkeypatch.setattr(trocr_recipe.pipeline, "prepare_run", start_from_bos)
    # A loop of one's own has no preflight: these are exactly the mistakes it would stop.
    monkeypatch.setattr(trocr_recipe.pipeline, "run_preflight", lambda *args, **kwargs: None)
    datasets.disable_caching()  # the label map must run again, not come from the cache
    try:
        run_trocr_no_trainer.main(tiny_args + PARITY_FLAGS + CASES["ga1-recipe"] + [
            "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
            "--do_predict", "false"])
    finally:
        datasets.enable_caching()
    departing = losses(tmp_path / "run")
    assert [row["step"] for row in departing] == [1, 2]
    assert relative_gaps(losses(reference)[:1], departing[:1])[0] > 1e-3


def test_resume_from_the_last_complete_checkpoint(tiny_args, tmp_path, caplog):
    """Stopped after step 4, started again: it skips the incomplete checkpoint-6, resumes
    from checkpoint-4, and steps 5-8 are those of the run that was never stopped (dropout
    on; augmentation off: see the resume comments in trocr_recipe/loop_checkpoints.py,
    Resume)."""
    flags = ["--no_augment", "--eval_steps", "4", "--save_steps", "4", "--do_predict", "false"]
    whole = tmp_path / "whole"
    run_trocr_no_trainer.main(tiny_args + flags + ["--max_steps", "8", "--output_dir", str(whole)])

    out = tmp_path / "run"  # tiny_args' output_dir
    run_trocr_no_trainer.main(tiny_args + flags + ["--max_steps", "4"])
    # A checkpoint that was being written when the run died: no completion marker.
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    (out / "checkpoint-6" / run_trocr_no_trainer.COMPLETE).unlink()
    caplog.clear()
    run_trocr_no_trainer.main(tiny_args + flags + ["--max_steps", "8"])

    assert f"Skipping {out / 'checkpoint-6'}: incomplete checkpoint" in caplog.text
    assert f"Resuming from {out / 'checkpoint-4'}" in caplog.text
    resumed, reference = losses(out), losses(whole)
    assert [row["step"] for row in resumed] == list(range(1, 9))
    assert resumed == reference
    assert read_jsonl(out / "eval_log.jsonl") == read_jsonl(whole / "eval_log.jsonl")


def test_two_processes_match_the_trainer(tiny_args, tiny_data, tmp_path):
    """DDP on two CPU processes: the same per-step losses (averaged over processes) and the
    same validation CER curve (generations gathered without duplicates). Catches a loop,
    or a Trainer, whose processes train unsynchronized replicas."""
    flags = ["--use_cpu", "--max_steps", "12", "--eval_steps", "6", "--save_steps", "6", "--do_predict", "false",
             "--weight_decay", "0.1", "--max_grad_norm", "0.5", "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", "2"]
    folders = {}
    for script in ("run_trocr.py", "run_trocr_no_trainer.py"):
        folders[script] = tmp_path / script
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(ROOT / script), *tiny_args, *flags, "--output_dir", str(folders[script])]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    reference, custom = folders["run_trocr.py"], folders["run_trocr_no_trainer.py"]
    rows_a, rows_b = losses(reference), losses(custom)
    assert [row["step"] for row in rows_b] == list(range(1, 13))
    assert [row["epoch"] for row in rows_b][-1] == pytest.approx(4.0)  # 12 lines per process, 3 steps an epoch
    assert max(relative_gaps(rows_a, rows_b)) <= 1e-5
    history = json.loads((reference / "trainer_state.json").read_text())["log_history"]
    assert {e["step"]: e["eval_cer"] for e in history if "eval_cer" in e} == {
        row["step"]: row["eval_cer"] for row in read_jsonl(custom / "eval_log.jsonl")}
    validation = load_from_disk(str(tiny_data))["validation"]
    assert [row["id"] for row in read_jsonl(custom / "predictions_validation.jsonl")] == list(validation["id"])
