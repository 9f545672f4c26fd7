import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from datasets import load_from_disk
from transformers import TrainerState, TrOCRProcessor, VisionEncoderDecoderModel

import run_trocr
import run_trocr_no_trainer
from conftest import ROOT
from trocr_recipe.data import encode_labels
from trocr_recipe.modeling import generation_max_length
from trocr_recipe.outputs import read_jsonl
from trocr_recipe.checkpoints import load_checkpoint_weights


def transcribe(folder, image):
    """The README's three lines."""
    processor = TrOCRProcessor.from_pretrained(folder)
    model = VisionEncoderDecoderModel.from_pretrained(folder)
    ids = model.generate(processor(images=image.convert("RGB"), return_tensors="pt").pixel_values)
    return processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]


def assert_same_weights(model_a, model_b):
    state_b = model_b.state_dict()
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


def test_tiny_run_writes_every_output(tiny_args, tiny_data, processor, tmp_path):
    results = run_trocr.main(tiny_args + ["--max_steps", "4"])
    out = tmp_path / "run"
    saved = json.loads((out / "all_results.json").read_text())
    for key in ("baseline_cer", "eval_cer", "test_cer", "eval_wer", "test_wer", "train_loss"):
        assert isinstance(saved[key], float), key
    assert saved["test_cer"] == results["test_cer"]
    assert saved["eval_cer"] <= saved["baseline_cer"]

    # One loss row per optimizer step.
    steps = [row["step"] for row in read_jsonl(out / "loss_log.jsonl")]
    assert steps == [1, 2, 3, 4]

    # Every test line scored once, in dataset order, with its raw reference.
    test = load_from_disk(str(tiny_data))["test"]
    rows = read_jsonl(out / "predictions_test.jsonl")
    assert [row["id"] for row in rows] == list(test["id"])
    assert [row["reference"] for row in rows] == list(test["text"])

    # The output folder is a checkpoint that transcribes an image as the run did.
    assert transcribe(out, test[0]["image"]) == rows[0]["prediction"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 2 and generation["num_beams"] == 2
    texts = [text for split in load_from_disk(str(tiny_data)).values() for text in split["text"]]
    labels, _ = encode_labels(processor.tokenizer, texts, max_target_length=256)
    assert generation["max_length"] == generation_max_length(max(map(len, labels)))
    # The processor is saved with every checkpoint, and a model card carries the results.
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all((c / "processor_config.json").exists() for c in checkpoints)
    assert "test_cer" in (out / "README.md").read_text()
    # Pictures a person scans: the worst lines of each split, the training curves.
    for picture in ("worst_validation.png", "worst_test.png", "training_curves.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200, picture


def test_final_model_is_the_best_checkpoint_or_the_start(tiny_args, tiny_model, tmp_path):
    run_trocr.main(tiny_args + ["--max_steps", "4", "--learning_rate", "3e-3"])
    out = tmp_path / "run"
    results = json.loads((out / "all_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    expected = tiny_model if results.get("kept_starting_model") else state["best_model_checkpoint"]
    assert_same_weights(VisionEncoderDecoderModel.from_pretrained(out), VisionEncoderDecoderModel.from_pretrained(expected))


def test_no_update_keeps_the_starting_model_and_says_so(tiny_args, tiny_model, tmp_path, caplog):
    results = run_trocr.main(tiny_args + ["--max_steps", "2", "--learning_rate", "0"])
    assert results["kept_starting_model"] is True
    assert "NEVER BEAT THE BASELINE" in caplog.text
    assert_same_weights(VisionEncoderDecoderModel.from_pretrained(tmp_path / "run"),
                        VisionEncoderDecoderModel.from_pretrained(tiny_model))


def test_checkpoint_weights_load_completely(tiny_model):
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    load_checkpoint_weights(model, str(tiny_model))
    assert_same_weights(model, VisionEncoderDecoderModel.from_pretrained(tiny_model))


def test_unknown_key_stops_the_run(tiny_args):
    with pytest.raises(SystemExit, match="no_such_key"):
        run_trocr.main(tiny_args + ["--no_such_key", "1"])


def test_accelerate_launch(tiny_args, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(ROOT / "run_trocr.py"),
               *tiny_args, "--max_steps", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert {"baseline_cer", "eval_cer", "test_cer"} <= set(results)


def test_loss_is_a_token_mean_over_the_whole_accumulated_step(tiny_args, tiny_model, tmp_path):
    """Two micro-batches of 2 accumulated = one batch of 4: the same logged loss per step
    (not the sum of two means, as the stock trainer gives this model)."""
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    model.config.decoder.dropout = 0.0  # the same forward whatever the batch split
    no_dropout = tmp_path / "no_dropout"
    model.save_pretrained(no_dropout)
    TrOCRProcessor.from_pretrained(tiny_model).save_pretrained(no_dropout)
    losses = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}x{accumulation}"
        run_trocr.main(tiny_args + [
            "--model_name_or_path", str(no_dropout), "--output_dir", str(out), "--max_steps", "3",
            "--learning_rate", "0", "--no_augment", "--do_eval", "false", "--do_predict", "false",
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
        ])
        losses[batch] = [row["loss"] for row in read_jsonl(out / "loss_log.jsonl")]
    assert len(losses[4]) == 3
    assert losses[2] == pytest.approx(losses[4], rel=1e-5)


def test_preflight_only_reports_and_stops_before_training(tiny_args, tmp_path, capsys):
    results = run_trocr.main(tiny_args + ["--preflight_only"])
    printed = capsys.readouterr().out
    assert "Preflight checks: every check passed." in printed
    assert results["preflight_findings"] == [] and results["preflight_loss"] > 0
    assert not (tmp_path / "run" / "all_results.json").exists()


def test_preflight_stops_a_run_with_a_planted_pitfall(tiny_args, tiny_model, tmp_path):
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    model.generation_config.max_length = 5  # pitfall 4: lines cut by generation
    short = tmp_path / "short"
    model.save_pretrained(short)
    TrOCRProcessor.from_pretrained(tiny_model).save_pretrained(short)
    with pytest.raises(SystemExit, match="generation_max_length"):
        run_trocr.main(tiny_args + ["--model_name_or_path", str(short), "--generation_max_length", "5"])
    assert not (tmp_path / "run" / "all_results.json").exists()


def test_wrong_column_stops_before_the_model_is_loaded(tiny_args, monkeypatch):
    import trocr_recipe.pipeline

    monkeypatch.setattr(trocr_recipe.pipeline, "load_model", lambda *a: pytest.fail("model loaded before the data check"))
    with pytest.raises(SystemExit, match=r"no column 'transcription'; its columns: image, text, id"):
        run_trocr.main(tiny_args + ["--text_column", "transcription"])
    with pytest.raises(SystemExit, match=r"no split 'dev' \(for validation\); it has: train, validation, test"):
        run_trocr.main(tiny_args + ["--validation_split", "dev"])


@pytest.mark.parametrize("logging_steps, printed", [(3, [3, 6, 9, 10]), (0.5, [5, 10])])
def test_console_shows_the_training_logs_every_logging_steps(logging_steps, printed, capsys):
    """The trainer logs every step (loss_log.jsonl, TensorBoard); the console prints the
    training logs every logging_steps of the recipe and at the last step, evaluations always."""
    printer = run_trocr.PrinterEvery(logging_steps)
    state = TrainerState(max_steps=10)
    printer.on_train_begin(None, state, None)
    for step in range(1, 11):
        state.global_step = step
        printer.on_log(None, state, None, logs={"loss": float(step)})
    printer.on_log(None, state, None, logs={"eval_cer": 1.0})
    *losses, evaluation = capsys.readouterr().out.splitlines()  # as {'loss': '3'}
    assert [int(line.split("'")[3]) for line in losses] == printed
    assert "eval_cer" in evaluation


def test_a_checkpoints_wrong_start_token_is_logged_and_reported(tiny_args, bos_start_model, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="trocr_recipe"):
        results = run_trocr.main(tiny_args + ["--model_name_or_path", str(bos_start_model), "--preflight_only"])
    logged = [record.getMessage() for record in caplog.records]
    for where in ("model.config", "model.generation_config"):
        assert any(f"{where}.decoder_start_token_id 0 -> 2" in line for line in logged), logged
    printed = capsys.readouterr().out
    assert "model.config.decoder_start_token_id 0 -> 2" in printed
    assert any("decoder_start_token_id 0 -> 2" in change for change in results["checkpoint_corrections"])


def test_a_checkpoint_already_right_is_not_reported_as_changed(tiny_args, caplog):
    with caplog.at_level(logging.WARNING, logger="trocr_recipe"):
        results = run_trocr.main(tiny_args + ["--preflight_only"])
    assert not any("_token_id" in change for change in results["checkpoint_corrections"])
    assert not any("decoder_start_token_id" in record.getMessage() for record in caplog.records)


def test_the_tiny_recipe_without_make_tiny_says_to_run_it(tiny_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/tiny here
    with pytest.raises(SystemExit, match=r"models/tiny: no such local folder.*Run `make tiny` first") as stop:
        run_trocr.main(tiny_args + ["--model_name_or_path", "models/tiny"])
    # Run from another folder, the message names the folder it looked in: paths are relative to here.
    assert f"looked in {tmp_path / 'models' / 'tiny'}: a recipe's paths are relative to the folder you run from" in str(
        stop.value)


@pytest.mark.parametrize("script", [run_trocr, run_trocr_no_trainer], ids=["trainer", "no_trainer"])
def test_baseline_test_scores_the_starting_model_on_test(script, tiny_args, tmp_path):
    """`baseline_test`: the test split read by the starting model before training, the
    before of fine-tuning beside its after; the validation curve is untouched by it."""
    trained = ["--learning_rate", "2e-2", "--load_best_model_at_end", "false", "--save_strategy", "no"]
    with_test = script.main(tiny_args + trained + ["--baseline_test", "true"])
    without = script.main(tiny_args[:-1] + [str(tmp_path / "without")] + trained)
    start = run_trocr.main(tiny_args[:-1] + [str(tmp_path / "start"), "--do_train", "false", "--do_eval", "false"])

    run = tmp_path / "run"
    before = read_jsonl(run / "predictions_baseline_test.jsonl")
    assert before == read_jsonl(tmp_path / "start" / "predictions_test.jsonl")
    assert with_test["baseline_test_cer"] == start["test_cer"]
    assert [row["prediction"] for row in read_jsonl(run / "predictions_test.jsonl")] != \
        [row["prediction"] for row in before]  # training changed the readings: before is not after
    assert (run / "worst_baseline_test.png").is_file()
    # Training is the same as without it: the test pass does not move the data order or dropout.
    assert read_jsonl(run / "loss_log.jsonl") == read_jsonl(tmp_path / "without" / "loss_log.jsonl")
    for key in ("baseline_cer", "eval_cer", "test_cer"):
        assert with_test[key] == without[key], key
    assert "baseline_test_cer" not in without


def test_baseline_test_needs_do_eval(tiny_args):
    with pytest.raises(SystemExit, match="baseline_test .* needs do_eval"):
        run_trocr.main(tiny_args + ["--baseline_test", "true", "--do_eval", "false", "--eval_strategy", "no",
                                    "--load_best_model_at_end", "false"])
