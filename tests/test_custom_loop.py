"""The plain loop as a template: it imports nothing of the Trainer, `trainable` gives both
loops the same steps, the never-worse decision on the configured metric, and the worked
methods of docs/custom_loop.md applied to a copy of the script and run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import VisionEncoderDecoderModel

import run_trocr
import run_trocr_no_trainer
from conftest import ROOT
from test_no_trainer import one_thread  # noqa: F401 (autouse: one thread per run, as there)
from trocr_recipe.outputs import read_jsonl
from trocr_recipe.trainable import set_trainable

sys.path.insert(0, str(ROOT / "experiments"))
import worked_methods as methods_experiment  # noqa: E402
from worked_methods import script_with, worked_methods  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TRAINER_MODULES = ("transformers.trainer", "transformers.trainer_seq2seq", "trocr_recipe.trainer")


def test_the_plain_loop_imports_nothing_of_the_trainer(tiny_args):
    """A whole run (train, evaluate, save, resume machinery) in a fresh process: neither
    transformers' Trainer nor trocr_recipe/trainer.py is ever imported."""
    code = ("import sys, run_trocr_no_trainer\n"
            f"run_trocr_no_trainer.main({tiny_args + ['--max_steps', '2', '--eval_steps', '2', '--save_steps', '2']!r})\n"
            "print('MODULES', sorted(m for m in sys.modules if 'trainer' in m))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.split("MODULES", 1)[1]
    assert "run_trocr_no_trainer" in loaded  # the list is of the run's modules
    for name in TRAINER_MODULES:
        assert f"'{name}'" not in loaded, name


# The last encoder layer and the decoder's layers of the tiny model (one layer each), as a
# researcher freezes TrOCR: the rest frozen, weight decay on to show a frozen tensor that moves.
TRAINABLE = ["--trainable", "encoder.layers.0.*", "decoder.model.decoder.layers.*"]
TRAINED_ONLY = ["--max_steps", "6", "--learning_rate", "1e-3", "--weight_decay", "0.1", "--max_grad_norm", "0.5",
                "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2", "--do_eval", "false",
                "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_strategy", "no",
                "--do_predict", "false"]


def test_trainable_gives_both_loops_the_same_steps_and_logs_its_counts(tiny_args, tiny_model, tmp_path, caplog):
    runs = {}
    for script in (run_trocr, run_trocr_no_trainer):
        out = tmp_path / script.__name__
        caplog.clear()
        results = script.main(tiny_args + TRAINABLE + TRAINED_ONLY + ["--output_dir", str(out)])
        runs[script] = out, results
        assert re.search(r"trainable encoder.layers.0.\* decoder.model.decoder.layers.\*: (\d+) parameters train "
                         r"\(\d+\.\d%\), (\d+) frozen", caplog.text)
    (reference, results_a), (custom, results_b) = runs.values()
    rows_a, rows_b = read_jsonl(reference / "loss_log.jsonl"), read_jsonl(custom / "loss_log.jsonl")
    assert [row["step"] for row in rows_b] == list(range(1, 7))
    assert max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(rows_a, rows_b)) <= 1e-5
    start = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    total = sum(p.numel() for p in start.parameters())
    counted = {key: results_b[key] for key in ("trainable_parameters", "frozen_parameters")}
    assert counted == {key: results_a[key] for key in counted} and sum(counted.values()) == total
    assert 0 < counted["trainable_parameters"] < total

    # The frozen parameters are the starting ones, the trainable ones moved, in both loops.
    for out in (reference, custom):
        trained = VisionEncoderDecoderModel.from_pretrained(out)
        frozen, moved = [], []
        for (name, before), after in zip(start.named_parameters(), trained.parameters()):
            chosen = name.startswith(("encoder.layers.0.", "decoder.model.decoder.layers."))
            (moved if chosen else frozen).append((name, torch.equal(before, after)))
        assert all(same for _, same in frozen) and not any(same for _, same in moved)
        assert sum(p.numel() for n, p in start.named_parameters() if n in dict(moved)) == \
            counted["trainable_parameters"]


def test_a_trainable_pattern_that_matches_nothing_names_the_layers(tiny_model):
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    with pytest.raises(SystemExit, match=r"trainable: 'encoder.encoder.layer.11.\*' matches no parameter name.*"
                                         r"'encoder.layers.0.\*' and 'decoder.model.decoder.layers.0.\*'"):
        set_trainable(model, ["decoder", "encoder.encoder.layer.11.*"])
    assert set_trainable(model, ["decoder"])["frozen_parameters"] == sum(
        p.numel() for name, p in model.named_parameters() if name.startswith("encoder."))


@pytest.mark.parametrize("script", [run_trocr, run_trocr_no_trainer], ids=["trainer", "no_trainer"])
def test_no_evaluation_during_training_scores_the_trained_model_before_deciding(script, tiny_args, tiny_model,
                                                                                caplog):
    """eval_strategy no with evaluation on: the final model is scored, found better than the
    start, and kept (it was thrown away unseen before)."""
    results = script.main(tiny_args + ["--learning_rate", "2e-2", "--eval_strategy", "no", "--save_strategy", "no",
                                       "--load_best_model_at_end", "false", "--do_predict", "false"])
    assert results["final_model"] == "trained" and "kept_starting_model" not in results
    assert results["final_model_metric"] == "cer"
    assert results["final_model_trained_cer"] == results["eval_cer"] < results["final_model_baseline_cer"] == \
        results["baseline_cer"]
    assert f"keeping the trained model (validation CER {results['eval_cer']:.2f}, final model scored; the starting " \
           f"model's {results['baseline_cer']:.2f})" in caplog.text
    saved = json.loads((Path(tiny_args[-1]) / "all_results.json").read_text())
    assert saved["final_model"] == "trained" and saved["final_model_trained_cer"] == results["eval_cer"]
    trained = VisionEncoderDecoderModel.from_pretrained(tiny_args[-1]).state_dict()
    start = VisionEncoderDecoderModel.from_pretrained(tiny_model).state_dict()
    assert any(not torch.equal(tensor, start[name]) for name, tensor in trained.items())


@pytest.mark.parametrize("script", [run_trocr, run_trocr_no_trainer], ids=["trainer", "no_trainer"])
def test_metric_for_best_model_wer_compares_wer_with_the_wer_baseline(script, tiny_args, tiny_model):
    results = script.main(tiny_args + ["--learning_rate", "2e-2", "--metric_for_best_model", "wer",
                                       "--do_predict", "false"])
    assert results["final_model_metric"] == "wer" and "final_model_baseline_cer" not in results
    assert results["final_model_baseline_wer"] == results["baseline_wer"]
    evaluations = [row for row in read_jsonl(Path(tiny_args[-1]) / "eval_log.jsonl")] if script is \
        run_trocr_no_trainer else [row for row in json.loads((Path(tiny_args[-1]) / "trainer_state.json").read_text())
                                   ["log_history"] if "eval_wer" in row]
    assert results["final_model_trained_wer"] == min(row["eval_wer"] for row in evaluations)  # the best checkpoint
    kept_start = results["final_model_trained_wer"] >= results["baseline_wer"]
    assert results["final_model"] == ("starting" if kept_start else "trained")
    assert results.get("kept_starting_model", False) is kept_start
    if kept_start:
        saved = VisionEncoderDecoderModel.from_pretrained(tiny_args[-1]).state_dict()
        start = VisionEncoderDecoderModel.from_pretrained(tiny_model).state_dict()
        assert all(torch.equal(tensor, start[name]) for name, tensor in saved.items())


def run_with_method(tmp_path, diff: str, tiny_args, method: dict):
    """The docs' diff applied to a copy of run_trocr_no_trainer.py, run a few steps."""
    script = script_with(diff, tmp_path / "method")
    output_dir = tmp_path / "with_method"
    command = [sys.executable, str(script), *tiny_args[:-1], str(output_dir),
               *METHOD_STEPS, "--method", json.dumps(method)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return output_dir


METHOD_STEPS = ["--max_steps", "3", "--learning_rate", "1e-3", "--do_eval", "false", "--eval_strategy", "no",
                "--load_best_model_at_end", "false", "--save_strategy", "no", "--do_predict", "false"]


@pytest.fixture(scope="module")
def plain_run(tiny_data, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    run_trocr_no_trainer.main([str(ROOT / "recipes" / "tiny.json"), "--model_name_or_path", str(tiny_model),
                               "--dataset_name", str(tiny_data), "--output_dir", str(out), *METHOD_STEPS])
    return out


def test_worked_method_an_extra_loss_term_logged_beside_the_loss(plain_run, tiny_args, tmp_path):
    diffs = worked_methods()
    assert len(diffs) == 2 and "run_trocr_no_trainer.py" in diffs[0]
    out = run_with_method(tmp_path, diffs[0], tiny_args, {"entropy_weight": 0.5})
    rows, plain = read_jsonl(out / "loss_log.jsonl"), read_jsonl(plain_run / "loss_log.jsonl")
    assert [set(row) for row in rows] == [{"step", "loss", "learning_rate", "epoch", "confidence_penalty"}] * 3
    assert all(row["confidence_penalty"] < 0 for row in rows)  # minus an entropy
    # Step 1, the same weights and batch: the plain loss plus the weighted term; the term's
    # gradient moved the weights elsewhere than the plain loop's.
    assert rows[0]["loss"] == pytest.approx(plain[0]["loss"] + 0.5 * rows[0]["confidence_penalty"], rel=1e-5)
    with_term = VisionEncoderDecoderModel.from_pretrained(out).state_dict()
    without = VisionEncoderDecoderModel.from_pretrained(plain_run).state_dict()
    assert any(not torch.equal(tensor, without[name]) for name, tensor in with_term.items())


def test_worked_method_a_layer_wise_learning_rate(plain_run, tiny_args, tiny_model, tmp_path):
    out = run_with_method(tmp_path, worked_methods()[1], tiny_args, {"encoder_lr_scale": 0.0})
    rows, plain = read_jsonl(out / "loss_log.jsonl"), read_jsonl(plain_run / "loss_log.jsonl")
    assert rows[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert [row["learning_rate"] for row in rows] == [row["learning_rate"] for row in plain]  # the decoder's
    start = VisionEncoderDecoderModel.from_pretrained(tiny_model).state_dict()
    trained = VisionEncoderDecoderModel.from_pretrained(out).state_dict()
    unchanged = {name for name, tensor in trained.items() if torch.equal(tensor, start[name])}
    assert {name for name in trained if name.startswith("encoder.")} <= unchanged  # a rate of 0 x 1e-3
    assert any(name.startswith("decoder.") and name not in unchanged for name in trained)


def test_method_is_a_json_object_and_only_the_plain_loop_reads_it(tiny_args):
    with pytest.raises(SystemExit, match=r"method '\{\"entropy_weight\": ': not valid JSON"):
        run_trocr_no_trainer.main(tiny_args + ["--method", '{"entropy_weight": '])
    with pytest.raises(SystemExit, match=r"method \[0.1\]: a JSON object"):
        run_trocr_no_trainer.main(tiny_args + ["--method", "[0.1]"])
    with pytest.raises(SystemExit, match="method: run_trocr.py does not read it"):
        run_trocr.main(tiny_args + ["--method", '{"entropy_weight": 0.1}'])


def test_the_methods_experiment_runs_on_the_tiny_model(tiny_args, tmp_path):
    """experiments/worked_methods.py: every method of the docs run and tabled against the plain loop."""
    out = tmp_path / "methods"
    recipe, extra = tiny_args[0], tiny_args[1:-2]  # the tiny recipe; its model and data; not --output_dir
    methods_experiment.main(["--recipe", recipe, "--seeds", "42", "--output_dir", str(out), "--", *extra,
                             "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                             "--load_best_model_at_end", "false", "--baseline_test", "true"])
    table = (out / "methods.md").read_text()
    assert len(re.findall(r"^\| (plain|extra loss|layer-wise)", table, flags=re.M)) == 3
    assert "| plain fine-tuning |" in table and "+0.00 (+0.00 to +0.00)" in table
    runs = json.loads((out / "methods.json").read_text())["runs"]
    assert [len(rows) for rows in runs.values()] == [1, 1, 1]
    assert all("test_cer" in rows[0] for rows in runs.values())
