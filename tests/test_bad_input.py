"""Bad input at each tool's door, one test per kind of defect: one `error:` line and exit 2
(or a correct result), never a traceback, a hang, lost work or a file outside output_dir."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import load_from_disk
from PIL import Image

import compare_runs
import predict
import prepare_iam
import run_trocr
import trocr_recipe.pipeline
from conftest import ROOT
from iam_fixture import build_iam
from test_compare_runs import fake_trace, make_run
from trocr_recipe.args import parse_recipe
from trocr_recipe.checkpoints import RUN_RECIPE, claim_output_dir
from trocr_recipe.errors import BadInput, atomic_write_text, run_cli
from trocr_recipe.checkpoints import load_checkpoint_weights
from trocr_recipe.validate import check_splits

check_loop = importlib.import_module("check_loop")


def one_error_line(err: str) -> str:
    """The tool's last stderr line, which must be its one error line."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err[-2000:]
    return last


# ---------------------------------------------------------------------------------------
# The error policy itself


def test_run_cli_turns_bad_input_into_one_line_and_2(capsys):
    def bad(argv):
        raise BadInput("x.json: line 2\nis broken")

    assert run_cli(bad) == 2
    assert capsys.readouterr().err == "error: x.json: line 2 is broken\n"
    assert run_cli(lambda argv: 1) == 1 and run_cli(lambda argv: {"cer": 1.0}) == 0


def test_run_cli_keeps_a_report_of_findings_whole(capsys):
    def findings(argv):
        raise SystemExit("Preflight found 1 error:\n- [error] something")

    assert run_cli(findings) == 1
    assert capsys.readouterr().err.splitlines() == ["Preflight found 1 error:", "- [error] something"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


# ---------------------------------------------------------------------------------------
# run_trocr.py: output_dir, state files, numbers


def recipe(tiny_args, *extra):
    return parse_recipe(tiny_args + list(extra))


@pytest.mark.parametrize("where, message", [
    ("", "output_dir is empty"),
    ("model", "is the model_name_or_path folder"),
    ("data", "is the dataset_name folder"),
    ("data/train", "is inside the dataset_name folder"),
    ("file", "a file, not a folder"),
])
def test_output_dir_that_would_write_over_inputs_is_refused(tiny_args, tiny_model, tiny_data, tmp_path, monkeypatch,
                                                           where, message):
    (tmp_path / "file").write_text("mine")
    output_dir = {"": "", "model": str(tiny_model), "data": str(tiny_data), "data/train": str(tiny_data / "train"),
                  "file": str(tmp_path / "file")}[where]
    monkeypatch.chdir(tmp_path)
    before = {path: path.stat().st_mtime_ns for path in (*tiny_model.iterdir(), *tiny_data.iterdir())}
    with pytest.raises(BadInput, match=message):
        run_trocr.main(tiny_args + ["--output_dir", output_dir, "--preflight_only"])
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "mine"
    assert {path: path.stat().st_mtime_ns for path in before} == before


@pytest.mark.parametrize("content, message", [
    ("[]", ": expected a JSON object"),
    ("{\"learning_rate\": 1", ", line 1: not valid JSON"),
    ("{}", ": records no model_name_or_path"),
])
def test_a_damaged_run_recipe_stops_the_resume(tiny_args, tmp_path, content, message):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / RUN_RECIPE).write_text(content)
    with pytest.raises(BadInput, match=f"{RUN_RECIPE}{message}"):
        claim_output_dir(*recipe(tiny_args, "--learning_rate", "1e-3"))


def test_a_broken_all_results_is_found_before_training(tiny_args, tmp_path):
    model_args, data_args, training_args = recipe(tiny_args)
    claim_output_dir(model_args, data_args, training_args)
    (tmp_path / "run" / "checkpoint-2").mkdir()
    (tmp_path / "run" / "all_results.json").write_text('{"eval_cer": 3')
    with pytest.raises(BadInput, match="all_results.json, line 1: not valid JSON.*remove it"):
        claim_output_dir(model_args, data_args, training_args)


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "-5"], "max_steps -5"),
    (["--max_steps", "0"], "max_steps 0"),
    (["--max_target_length", "0"], "max_target_length 0"),
    (["--max_target_length", "1"], "max_target_length 1"),
    (["--learning_rate", "-1"], "learning_rate -1"),
    (["--learning_rate", "nan"], "learning_rate nan"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps 0"),
    (["--generation_num_beams", "0"], "generation_num_beams 0"),
])
def test_numbers_out_of_range_stop_before_anything_loads(tiny_args, flags, message):
    with pytest.raises(BadInput, match=message):
        recipe(tiny_args, *flags)


def test_a_recipe_that_is_a_folder_or_not_utf8_is_named(tmp_path):
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "latin.json").write_bytes(b'{"learning_rate": "\xe9"}')
    with pytest.raises(BadInput, match="folder.json: cannot read"):
        parse_recipe([str(tmp_path / "folder.json")])
    with pytest.raises(BadInput, match="latin.json: not UTF-8"):
        parse_recipe([str(tmp_path / "latin.json")])


def test_a_damaged_dataset_is_named(tiny_args, tiny_data, tmp_path):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    (data / "dataset_dict.json").write_text("{broken")
    with pytest.raises(BadInput, match=f"dataset_name {data}: cannot load it"):
        trocr_recipe.pipeline.load_dataset_splits(recipe(tiny_args, "--dataset_name", str(data))[1], None)
    (data / "dataset_dict.json").write_text((tiny_data / "dataset_dict.json").read_text())
    for arrow in data.glob("train/*.arrow"):
        arrow.write_bytes(b"not arrow")
    with pytest.raises(BadInput, match=f"dataset_name {data}: cannot load it"):
        trocr_recipe.pipeline.load_dataset_splits(recipe(tiny_args, "--dataset_name", str(data))[1], None)


def test_damaged_checkpoint_weights_on_resume_are_named(tiny_model, tmp_path):
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    checkpoint = shutil.copytree(tiny_model, tmp_path / "checkpoint-4")
    (checkpoint / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(BadInput, match=r"checkpoint-4: cannot load.*remove that checkpoint folder"):
        load_checkpoint_weights(model, str(checkpoint))


def test_a_broken_data_check_cache_is_checked_again(tiny_data, processor, tmp_path, caplog):
    from trocr_recipe.args import DataTrainingArguments

    data = shutil.copytree(tiny_data, tmp_path / "data")
    splits = load_from_disk(str(data))
    check_splits(splits, processor.tokenizer, DataTrainingArguments(), str(tmp_path / "out"))
    caches = sorted(data.rglob("data_check-*.json"))
    assert caches and not list(data.rglob("*.tmp"))
    caches[0].write_text('[[0, "empty_te')  # a run killed while writing it (before writes were atomic)
    with caplog.at_level("WARNING", logger="trocr_recipe"):
        check_splits(splits, processor.tokenizer, DataTrainingArguments(), str(tmp_path / "out"))
    assert "cannot be read" in caplog.text and isinstance(json.loads(caches[0].read_text()), list)


# ---------------------------------------------------------------------------------------
# compare_runs.py


@pytest.fixture
def two_runs(tmp_path):
    return make_run(tmp_path / "a", results={"eval_cer": 80.0}), make_run(tmp_path / "b", results={"eval_cer": 80.0})


@pytest.mark.parametrize("flags, message", [
    (["--loss_rtol", "nan"], "--loss_rtol nan: must be a finite number"),
    (["--loss_rtol", "-1"], "--loss_rtol -1.0: must be a finite number at least 0"),
    (["--cer_atol", "inf"], "--cer_atol inf"),
    (["--cause_rtol", "-0.5"], "--cause_rtol -0.5"),
    (["--top_lines", "-1"], "--top_lines -1"),
    (["--max_steps", "-5"], "--max_steps -5"),
    (["--plot", "x.foo"], "format .foo not supported"),
    (["--plot", "a/loss_log.jsonl/x.png"], "loss_log.jsonl is a file"),
    (["--plot", "a"], "a folder"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_compare_runs_flags_are_checked_before_the_report(two_runs, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert compare_runs.main(["a", "b", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in one_error_line(err)


def test_compare_runs_plot_is_named_as_written(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert compare_runs.main([str(a), str(b), "--plot", str(tmp_path / "plots" / "cmp")]) == 0
    assert f"Plot: {tmp_path / 'plots' / 'cmp.png'}" in capsys.readouterr().out
    assert (tmp_path / "plots" / "cmp.png").is_file()


@pytest.mark.parametrize("damage, message", [
    (lambda a: (a / "all_results.json").write_text('{"eval_cer": NaN}'), "eval_cer is nan, not a finite number"),
    (lambda a: (a / "loss_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 1000000000000000, "loss": 2}\n'),
     "line 2: needs an integer \"step\""),
    (lambda a: (a / "loss_log.jsonl").write_text('{"step": 1, "loss": 1' + "0" * 400 + "}\n"), "line 1: needs"),
    (lambda a: (a / "loss_log.jsonl").write_text('{"step": 1, "loss": ' + "[" * 50000 + "]" * 50000 + "}\n"),
     "line 1: not valid JSON"),
    (lambda a: (a / "trainer_state.json").write_text('{"log_history": 7}'), "log_history is int"),
    (lambda a: (a / "trainer_state.json").write_text('{"log_history": [{"step": 2, "eval_cer": NaN}]}'),
     "eval_cer NaN at step 2"),
    (lambda a: (a / "trace" / "settings.json").write_text('{"format": 1, "optimizer": {"lr": "fast"}}'),
     "optimizer.lr is \"fast\""),
    (lambda a: (a / "trace" / "steps.jsonl").write_text(
        '{"step": 1, "loss": 1, "label_tokens": 4, "micro_batches": [{"file": "b.safetensors", "ids": []}]}\n'),
     "b.safetensors: cannot read the batch"),
    (lambda a: (a / "trace" / "steps.jsonl").write_text(
        '{"step": 1, "loss": 1, "label_tokens": 4, "micro_batches": [{"file": "../../x", "ids": []}]}\n'),
     "is not a file name of the trace folder"),
])
def test_compare_runs_damaged_files_are_named_without_a_report(tmp_path, capsys, damage, message):
    a = fake_trace(make_run(tmp_path / "a"))
    b = make_run(tmp_path / "b", loss={1: 5.0, 2: 4.5, 3: 9.9})
    (a / "trace" / "b.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00short")
    damage(a)
    assert compare_runs.main([str(a), str(b), "--plot", str(tmp_path / "p.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in one_error_line(err)


# ---------------------------------------------------------------------------------------
# predict.py


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "lines"
    folder.mkdir()
    for name in ("a.png", "tab\there.png", "new\nline.png"):
        Image.new("L", (96, 24), 255).save(folder / name)
    return folder


def test_predict_refuses_an_output_it_cannot_write_before_loading(tiny_model, images, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(predict, "load_for_inference", lambda name: pytest.fail("model loaded"))
    for output, message in ((images, "is a folder"), (tmp_path / "none" / "p.jsonl", "no folder")):
        assert predict.main([str(tiny_model), str(images), "--output", str(output)]) == 2
        assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--num_beams", "0"], "--num_beams 0"), (["--num_beams", "-3"], "--num_beams -3"),
    (["--max_length", "0"], "--max_length 0"), (["--batch_size", "0"], "--batch_size 0"),
])
def test_predict_numbers_are_checked(tiny_model, images, capsys, flags, message):
    assert predict.main([str(tiny_model), str(images), *flags]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_predict_names_with_tabs_and_newlines_keep_one_line_each(tiny_model, images, capsys):
    assert predict.main([str(tiny_model), str(images), "--max_length", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        str(images / "a.png"), str(images / "new\\nline.png"), str(images / "tab\\there.png")]


def test_predict_keeps_what_it_wrote_when_a_line_is_unreadable(tiny_model, images, tmp_path, capsys):
    """A FIFO (which would block a read) and a decompression bomb are skipped; the rows before
    them are in --output whatever happens after."""
    os.mkfifo(tmp_path / "z_fifo.png")  # named: a folder's search takes regular files only
    Image.new("1", (20000, 10000)).save(images / "y_bomb.png")
    output = tmp_path / "p.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(tiny_model), str(images),
                           str(tmp_path / "z_fifo.png"), "--output",
                           str(output), "--max_length", "4", "--batch_size", "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(output.read_text().splitlines()) == 3
    skipped = json.loads(output.with_name("p.jsonl.skipped.json").read_text())["skipped"]
    assert {os.path.basename(s["path"]): s["reason"].split(":")[0] for s in skipped} == {
        "z_fifo.png": "OSError", "y_bomb.png": "DecompressionBombError"}


def test_predict_partial_output_survives_a_crash(tiny_model, images, tmp_path, monkeypatch):
    """Rows are flushed as made: an error in the middle leaves the rows before it."""
    output = tmp_path / "p.jsonl"
    real = predict.decode
    calls = []

    def decode_then_fail(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(predict, "decode", decode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        predict.main([str(tiny_model), str(images), "--output", str(output), "--batch_size", "1", "--max_length", "4"])
    assert len(output.read_text().splitlines()) == 1


@pytest.mark.parametrize("dataset, flags, message", [
    ("missing", [], "no such local folder"),
    ("file", [], "a file; give a save_to_disk folder"),
    ("empty", [], "cannot load it"),
    ("tiny", ["--text_column", "txt"], "has no column 'txt' (--text_column)"),
    ("tiny", ["--image_column", "img"], "has no column 'img' (--image_column)"),
])
def test_predict_bad_datasets_are_named(tiny_model, tiny_data, tmp_path, capsys, dataset, flags, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    path = tiny_data if dataset == "tiny" else tmp_path / dataset
    assert predict.main([str(tiny_model), "--dataset", str(path), *flags]) == 2
    assert message in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------
# check_loop.py


@pytest.mark.parametrize("change, message", [
    (lambda b: b["pixel_values"].__setitem__((0, 0, 0, 0), float("nan")), "1 pixel value(s) NaN or infinite"),
    (lambda b: b["pixel_values"].__setitem__((0, 0, 0, 0), float("inf")), "NaN or infinite"),
    (lambda b: b["labels"].__setitem__((0, 0), 10**9), "not in the vocabulary: [1000000000]"),
    (lambda b: b["labels"].__setitem__((0, 0), -5), "negative (only -100 is ignored by the loss): [-5]"),
    (lambda b: b.update(pixel_values=b["pixel_values"][:0], labels=b["labels"][:0]), "an empty batch"),
    (lambda b: b.update(labels=b["labels"][:, :0]), "labels of length 0"),
])
def test_check_loop_names_values_it_cannot_check(tiny_model, processor, tmp_path, capsys, change, message):
    pixels = processor(images=[Image.new("RGB", (64, 16), "white")] * 2, return_tensors="pt").pixel_values
    batch = {"pixel_values": pixels, "labels": torch.tensor([[5, 6, 2], [7, 2, -100]])}
    change(batch)
    torch.save(batch, tmp_path / "batch.pt")
    assert check_loop.main(["--model", str(tiny_model), "--batch", str(tmp_path / "batch.pt")]) == 2
    assert message in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------
# prepare_iam.py


def prepare(paths, out):
    return prepare_iam.main(["--iam_root", str(paths.root), "--split", "aachen", "--split_dir", str(paths.aachen),
                             "--output_dir", str(out)])


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p.root / "ascii" / "lines.txt").write_text(
        (p.root / "ascii" / "lines.txt").read_text() + "\na01-000u-00 ok 154 19 408 746 1661 89 Another|text\n"),
     "line id a01-000u-00 already on line"),
    (lambda p: (p.aachen / "va.lst").write_text("# no lines\n"), "split list without a line id"),
    (lambda p: ((p.root / "ascii" / "lines.txt").unlink(), (p.root / "ascii" / "lines.txt").mkdir()), "not a file"),
])
def test_prepare_iam_damaged_inputs_are_named(tmp_path, capsys, damage, message):
    paths = build_iam(tmp_path / "iam")
    damage(paths)
    assert prepare(paths, tmp_path / "out") == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_prepare_iam_output_that_is_a_file_is_named(tmp_path, capsys):
    paths = build_iam(tmp_path / "iam")
    (tmp_path / "out").write_text("mine")
    assert prepare(paths, tmp_path / "out") == 2
    assert "is a file" in one_error_line(capsys.readouterr().err) and (tmp_path / "out").read_text() == "mine"


# ---------------------------------------------------------------------------------------
# Reading a trace from Python (ReferenceBatches): damaged files are ValueErrors naming them


@pytest.mark.parametrize("damage, message", [
    (lambda t: (t / "b.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00short"),
     "b.safetensors: cannot read"),
    (lambda t: ((t / "settings.json").unlink(), (t / "settings.json").mkdir()), "cannot read the trace settings"),
    (lambda t: (t / "steps.jsonl").write_bytes(b"\xff\xfe"), "cannot read the trace steps"),
])
def test_reference_batches_name_damaged_trace_files(tmp_path, damage, message):
    from safetensors.torch import save_file

    from trocr_recipe.steptrace import ReferenceBatches

    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "settings.json").write_text(json.dumps({"format": 1}))
    row = {"step": 1, "loss": 1.0, "label_tokens": 2, "micro_batches": [{"file": "b.safetensors", "ids": ["x"]}]}
    (trace / "steps.jsonl").write_text(json.dumps(row) + "\n")
    save_file({"pixel_values": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "labels": torch.tensor([[5, 2]])},
              trace / "b.safetensors")
    assert len(list(ReferenceBatches(trace))) == 1
    damage(trace)
    with pytest.raises(ValueError, match=message):
        list(ReferenceBatches(trace))
