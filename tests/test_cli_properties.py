"""Generated bad files and arguments thrown at each command-line tool, in-process: whatever
the input, a tool ends with a result (exit 0 or 1) or one `error:` line and exit 2, within a
time bound (hypothesis' deadline), never an exception."""

import importlib
import json
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import compare_runs
import predict
import prepare_iam
import run_trocr
from conftest import ROOT
from iam_fixture import build_iam
from trocr_recipe.errors import run_cli

check_loop = importlib.import_module("check_loop")


def examples(count: int, seconds: int = 30):
    """Few examples (the suite runs on 2 cores), each within `seconds`, the same on every run."""
    return settings(max_examples=count, deadline=timedelta(seconds=seconds), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def assert_clean_exit(code: int, err: str, results=(0, 1)) -> None:
    """A result, or bad input named in one `error:` line (the tool's last line on stderr)."""
    event(f"exit {code}")  # shown by --hypothesis-show-statistics: how many examples got past the door
    assert code in (*results, 2), code
    assert "Traceback" not in err
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and len(last) < 2000, err[-2000:]


def fresh(tmp_path: Path) -> Path:
    """A new folder per generated example (hypothesis reuses the test's tmp_path)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


NUMBERS = st.one_of(
    st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 1, 10**15])
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


# ---------------------------------------------------------------------------------------
# check_loop.py: any batch file


def damage(batch: dict, kind: str, draw) -> object:
    """A valid batch with one thing wrong (or nothing)."""
    pixels, labels = batch["pixel_values"], batch["labels"]
    value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]))
    changes = {
        "pixels": lambda: {**batch, "pixel_values": pixels.index_fill(0, torch.tensor([0]), value)},
        "label": lambda: {**batch, "labels": labels.index_fill(1, torch.tensor([0]), draw(st.integers(-10**12,
                                                                                                     10**12)))},
        "empty": lambda: {**batch, "pixel_values": pixels[:0], "labels": labels[:0], "texts": []},
        "short": lambda: {**batch, "labels": labels[:, :draw(st.integers(0, 1))]},
        "shape": lambda: {**batch, "pixel_values": pixels.reshape(-1)[: draw(st.integers(0, 50))].reshape(
            draw(st.sampled_from([(-1,), (1, -1), (1, 1, -1), (1, 1, 1, -1), (1, 1, 1, 1, -1)])))},
        "dtype": lambda: {**batch, "pixel_values": pixels.to(draw(st.sampled_from([torch.int64, torch.bool,
                                                                                 torch.float16])))},
        "labels": lambda: {**batch, "labels": draw(JSON_VALUES)},
        "texts": lambda: {**batch, "texts": draw(JSON_VALUES)},
        "not a dict": lambda: draw(st.sampled_from([[batch], "text", 3, {"pixel_values": pixels}])),
    }
    return changes[kind]() if kind in changes else batch


@st.composite
def batch_contents(draw, processor):
    lines = draw(st.integers(1, 2))
    size = (draw(st.integers(8, 48)), draw(st.integers(8, 160)))
    images = [Image.new("RGB", (size[1], size[0]), "white")] * lines
    pixels = processor(images=images, return_tensors="pt").pixel_values
    labels = torch.tensor([[5, 6, 2]] * lines)
    batch = {"pixel_values": pixels, "labels": labels, "texts": ["ab"] * lines}
    kind = draw(st.sampled_from(["none", "pixels", "label", "empty", "short", "shape", "dtype", "labels", "texts",
                                 "not a dict"]))
    return damage(batch, kind, draw)


@examples(30)
@given(data=st.data(), raw=st.none() | st.none() | st.none() | st.binary(max_size=64))
def test_check_loop_any_batch_file(tiny_model, processor, tmp_path, capsys, data, raw):
    path = tmp_path / "batch.pt"
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(data.draw(batch_contents(processor)), path)
    code = check_loop.main(["--model", str(tiny_model), "--batch", str(path)])
    assert_clean_exit(code, capsys.readouterr().err)


# ---------------------------------------------------------------------------------------
# compare_runs.py: any loss log, results and flags


LOSS_ROWS = st.fixed_dictionaries(
    {"step": st.one_of(st.integers(-5, 50), st.just(10**15), JSON_VALUES), "loss": st.one_of(NUMBERS, JSON_VALUES)},
    optional={"learning_rate": NUMBERS, "grad_norm": NUMBERS},
)
BAD_LINES = st.one_of(LOSS_ROWS.map(json.dumps), st.text(max_size=20), JSON_VALUES.map(json.dumps),
                      st.just('{"step": 1, "loss": ' + "[" * 5000 + "]" * 5000 + "}"))
FLAGS = ["--loss_rtol", "--cer_atol", "--cause_rtol", "--top_lines", "--max_steps", "--plot"]
FLAG_VALUES = st.one_of(st.sampled_from(["nan", "inf", "-1", "0", "1e-5", "3", "x", "-0", "out.svg", "d/"]),
                        NUMBERS.map(str))


@examples(60)
@given(extra=st.lists(BAD_LINES, max_size=2), results=st.one_of(JSON_VALUES, st.builds(
    lambda v: {"eval_cer": v}, NUMBERS)), flag=st.sampled_from(FLAGS), value=FLAG_VALUES)
def test_compare_runs_any_logs_and_flags(tmp_path, capsys, extra, results, flag, value):
    """B is A's log with up to two generated lines; its results and one flag generated."""
    root = fresh(tmp_path)
    a, b = root / "a", root / "b"
    log = [json.dumps({"step": s, "loss": 2.0 / s, "learning_rate": 1e-4}) for s in (1, 2, 3)]
    for run, lines in ((a, log), (b, log[:2] + extra + log[2:])):
        run.mkdir()
        (run / "loss_log.jsonl").write_text("\n".join(lines) + "\n")
        (run / "all_results.json").write_text(json.dumps({"eval_cer": 10.0}))
    (b / "all_results.json").write_text(json.dumps(results))
    if flag == "--plot":
        value = str(root / value)
    code = compare_runs.main([str(a), str(b), "--plot", str(root / "p.png"), f"{flag}={value}"])
    assert_clean_exit(code, capsys.readouterr().err)


# ---------------------------------------------------------------------------------------
# predict.py: any image file and generation flags

MODES = ["1", "L", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "LA"]


@st.composite
def image_files(draw, folder: Path):
    """Image files of any mode, size and format, or bytes that are no image."""
    paths = []
    for n in range(draw(st.integers(1, 3))):
        path = folder / f"{n}{draw(st.sampled_from(['.png', '.tif', '.bmp', '.gif', '.jpg']))}"
        if draw(st.integers(0, 3)) == 0:
            path.write_bytes(draw(st.binary(max_size=40)))
        else:
            mode = draw(st.sampled_from(MODES))
            size = (draw(st.integers(1, 400)), draw(st.integers(1, 60)))
            image = Image.new(mode, size, draw(st.sampled_from([0, 255, float("nan")])) if mode == "F" else 0)
            try:
                image.save(path)
            except (OSError, ValueError, KeyError):  # a mode the format cannot hold
                path.write_bytes(b"not an image")
        paths.append(str(path))
    return paths


@examples(20, seconds=60)
@given(data=st.data(), beams=st.sampled_from([None, None, None, 1, 2, 0, -3]),
       length=st.sampled_from([None, None, None, 2, 6, 1, 0]), batch=st.sampled_from([1, 2, 3, 16, 16, 0]))
def test_predict_any_images_and_flags(tiny_model, tmp_path, capsys, data, beams, length, batch):
    folder = fresh(tmp_path)
    files = data.draw(image_files(folder))
    argv = [str(tiny_model), *files, "--batch_size", str(batch), "--output", str(folder / "out.jsonl")]
    argv += ["--num_beams", str(beams)] if beams is not None else []
    argv += ["--max_length", str(length)] if length is not None else []
    code = predict.main(argv)
    assert_clean_exit(code, capsys.readouterr().err)
    if code == 0:
        rows = [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]
        assert len(rows) == len(files) - json.loads((folder / "out.jsonl.skipped.json").read_text())["count"]


# ---------------------------------------------------------------------------------------
# run_trocr.py: any recipe values (preflight only: a valid recipe stops after its checks)

RECIPE_KEYS = [
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "max_target_length",
    "generation_num_beams", "generation_max_length", "warmup_steps", "max_train_samples", "label_smoothing_factor",
    "gradient_accumulation_steps", "max_bad_fraction", "max_image_side", "output_dir", "model_name_or_path",
]


@examples(25, seconds=120)
@given(values=st.dictionaries(st.sampled_from(RECIPE_KEYS), st.integers(-3, 3) | NUMBERS | JSON_VALUES, max_size=2),
       raw=st.none() | st.none() | st.binary(max_size=30),
       output=st.sampled_from(["run", "", "model", "data", "file"]))
def test_run_trocr_any_recipe(tiny_model, tiny_data, tmp_path, monkeypatch, capsys, values, raw, output):
    folder = fresh(tmp_path)
    monkeypatch.chdir(folder)
    (folder / "file").write_text("mine")
    recipe = json.loads((ROOT / "recipes" / "tiny.json").read_text())
    recipe.update(model_name_or_path=str(tiny_model), dataset_name=str(tiny_data), preflight_only=True)
    recipe.update(output_dir={"run": str(folder / "run"), "": "", "model": str(tiny_model), "data": str(tiny_data),
                              "file": str(folder / "file")}[output])
    recipe.update(values)
    (folder / "recipe.json").write_bytes(raw if raw is not None else json.dumps(recipe).encode())
    code = run_cli(run_trocr.main, [str(folder / "recipe.json")])
    assert_clean_exit(code, capsys.readouterr().err)
    assert set(p.name for p in folder.iterdir()) <= {"file", "recipe.json", "run"}  # nothing written elsewhere
    assert (folder / "file").read_text() == "mine"


# ---------------------------------------------------------------------------------------
# prepare_iam.py: any damage to lines.txt and a split list


@pytest.fixture(scope="module")
def iam_copy(tmp_path_factory):
    return build_iam(tmp_path_factory.mktemp("iam_props"))


LINE_IDS = ["a01-000u-00", "b01-014-00", "z99-999-99"]


@examples(20, seconds=60)
@given(extra=st.lists(st.one_of(
    st.text(max_size=60),
    st.builds(lambda i, status, text: f"{i} {status} 154 19 408 746 1661 89 {text}", st.sampled_from(LINE_IDS),
              st.sampled_from(["ok", "ok", "err", "??"]), st.text(min_size=1, max_size=20))), max_size=1),
       keep=st.sampled_from([32, 32, 32, 25]),
       split_list=st.sampled_from([None, None, None, "", "b01-014-00\nz99-999-99", "b01-014-00 b01-014-01\n"]),
       allow_missing=st.booleans())
def test_prepare_iam_any_damage(iam_copy, tmp_path, capsys, extra, keep, split_list, allow_missing):
    """lines.txt cut to its first `keep` lines plus generated ones; the validation list generated."""
    folder = fresh(tmp_path)
    paths = iam_copy
    lines_txt, va = paths.root / "ascii" / "lines.txt", paths.aachen / "va.lst"
    original_lines, original_va = lines_txt.read_bytes(), va.read_bytes()
    try:
        lines_txt.write_text("\n".join(original_lines.decode().split("\n")[:keep] + extra) + "\n")
        if split_list is not None:
            va.write_text(split_list)
        code = prepare_iam.main(["--iam_root", str(paths.root), "--split", "aachen", "--split_dir",
                                 str(paths.aachen), "--output_dir", str(folder / "out"),
                                 *(["--allow_missing"] if allow_missing else [])])
    finally:
        lines_txt.write_bytes(original_lines)
        va.write_bytes(original_va)
    assert_clean_exit(code, capsys.readouterr().err, results=(0,))
    if code == 2:
        assert not (folder / "out").exists()
    shutil.rmtree(folder)
