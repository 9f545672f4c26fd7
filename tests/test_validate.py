"""The data check (trocr_recipe/validate.py): bad lines skipped, counted and named, or the
run stopped naming them; 16-bit images pass, named as converted; results cached. And the recipe errors caught
before any model is loaded: a wrong type, a missing dataset, an output_dir of another recipe."""

import io
import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import run_trocr
import trocr_recipe.pipeline
from trocr_recipe.args import DataTrainingArguments
from trocr_recipe.checkpoints import RUN_RECIPE
from trocr_recipe.outputs import read_jsonl
from trocr_recipe.validate import REPORT, BadDataError, LineCheck, check_splits

# Which line of the tiny data is made bad, and how.
TRUNCATED, EMPTY, SIXTEEN_BIT = ("test", 2), ("train", 5), ("validation", 1)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_data(tiny_data, tmp_path_factory):
    """The tiny data with a truncated PNG in test, a whitespace-only text in train and a
    16-bit grayscale image (PIL mode I;16, not a bad line: a converted one) in validation; and
    their ids."""
    splits = load_from_disk(str(tiny_data))
    columns = {name: split.cast_column("image", ImageFeature(decode=False)).to_dict() for name, split in splits.items()}
    image = columns[TRUNCATED[0]]["image"][TRUNCATED[1]]
    image["bytes"] = image["bytes"][: len(image["bytes"]) // 2]
    columns[EMPTY[0]]["text"][EMPTY[1]] = "   "
    image = columns[SIXTEEN_BIT[0]]["image"][SIXTEEN_BIT[1]]
    gray = np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("L"), dtype=np.uint16)
    sixteen = Image.fromarray(gray * 257)
    assert sixteen.mode == "I;16"
    image["bytes"] = png(sixteen)
    features = splits["train"].features.copy()  # image, text, id and whatever else the data has
    path = tmp_path_factory.mktemp("bad") / "data"
    DatasetDict({name: Dataset.from_dict(rows, features=features) for name, rows in columns.items()}).save_to_disk(path)
    ids = {name: columns[split]["id"][row] for name, (split, row) in
           {"truncated": TRUNCATED, "empty": EMPTY, "sixteen": SIXTEEN_BIT}.items()}
    return path, ids


def named_lines(report_path) -> set[tuple[str, str, str, str]]:
    report = json.loads(report_path.read_text())
    return {(line["split"], line["id"], line["problem"], line["action"]) for line in report["lines"]}


def test_bad_lines_are_skipped_counted_and_named(tiny_args, bad_data, tmp_path, caplog):
    path, ids = bad_data
    results = run_trocr.main(tiny_args + ["--dataset_name", str(path), "--max_steps", "2", "--max_bad_fraction", "0.2"])
    out = tmp_path / "run"
    # Exactly three lines are named: the truncated image and the empty text skipped, the
    # 16-bit image converted, which is information only: no bad line, nothing skipped.
    assert named_lines(out / REPORT) == {("test", ids["truncated"], "undecodable_image", "skipped"),
                                         ("train", ids["empty"], "empty_text", "skipped"),
                                         ("validation", ids["sixteen"], "converted_image", "converted")}
    report = json.loads((out / REPORT).read_text())
    assert "mode I;16 scaled to 8 bits" in [line["detail"] for line in report["lines"]]
    assert report["splits"]["validation"] == {"lines": 6, "bad_lines": 0, "skipped_lines": 0, "problems": {},
                                              "notices": {"converted_image": 1}}
    assert "on_converted_image" not in report["settings"]
    table_row = ["converted_image", "validation", "1", "converted", ids["sixteen"]]
    assert table_row in [row.split() for row in caplog.text.splitlines()]
    # Trained to the end; the skipped test line is counted next to the test CER, and printed.
    assert [row["step"] for row in read_jsonl(out / "loss_log.jsonl")] == [1, 2]
    saved = json.loads((out / "all_results.json").read_text())
    assert (saved["train_skipped_lines"], saved["eval_skipped_lines"], saved["test_skipped_lines"]) == (1, 0, 1)
    assert results["test_skipped_lines"] == 1 and "test_cer" in saved
    assert "test CER" in caplog.text and "(1 lines skipped by the data check" in caplog.text
    test_ids = [row["id"] for row in read_jsonl(out / "predictions_test.jsonl")]
    assert len(test_ids) == 6 and ids["truncated"] not in test_ids
    # The 16-bit line went through the whole data path: it was read and transcribed.
    assert ids["sixteen"] in [row["id"] for row in read_jsonl(out / "predictions_validation.jsonl")]


def test_error_policy_stops_before_training_naming_the_lines(tiny_args, bad_data, tmp_path, monkeypatch):
    path, ids = bad_data
    monkeypatch.setattr(trocr_recipe.pipeline, "load_model", lambda *a: pytest.fail("model loaded before the data check"))
    with pytest.raises(BadDataError) as stopped:
        run_trocr.main(tiny_args + ["--dataset_name", str(path), "--on_undecodable_image", "error",
                                    "--on_empty_text", "error"])
    expected = {("test", ids["truncated"], "undecodable_image"), ("train", ids["empty"], "empty_text")}
    assert {(line["split"], line["id"], line["problem"]) for line in stopped.value.lines} == expected
    assert ids["truncated"] in str(stopped.value) and ids["empty"] in str(stopped.value)
    assert "on_empty_text=error" in str(stopped.value)
    converted = ("validation", ids["sixteen"], "converted_image", "converted")  # never an error
    assert named_lines(tmp_path / "run" / REPORT) == {line + ("error",) for line in expected} | {converted}
    assert not (tmp_path / "run" / "all_results.json").exists()


def test_a_split_losing_too_many_lines_stops_the_run(tiny_args, bad_data, monkeypatch):
    path, ids = bad_data
    monkeypatch.setattr(trocr_recipe.pipeline, "load_model", lambda *a: pytest.fail("model loaded before the data check"))
    # 1 of 24 training lines is more than the default max_bad_fraction of 1%.
    with pytest.raises(BadDataError, match=r"train split would lose 1 of its 24 lines, more than max_bad_fraction=0.01"):
        run_trocr.main(tiny_args + ["--dataset_name", str(path)])


def check_args(**overrides) -> DataTrainingArguments:
    return DataTrainingArguments(dataset_name="bad", max_bad_fraction=0.5, **overrides)


def test_the_check_is_cached_by_fingerprint_and_settings(bad_data, processor, tmp_path, monkeypatch):
    path, ids = bad_data
    splits = load_from_disk(str(path))
    kept, skipped = check_splits(splits, processor.tokenizer, check_args(), str(tmp_path))
    assert skipped == {"train": 1, "validation": 0, "test": 1}
    assert ids["empty"] not in kept["train"]["id"] and len(kept["train"]) == 23

    def no_second_pass(self, batch):
        raise AssertionError("checked again")

    monkeypatch.setattr(LineCheck, "__call__", no_second_pass)
    again, skipped_again = check_splits(splits, processor.tokenizer, check_args(), str(tmp_path))
    assert skipped_again == skipped and again["test"]["id"] == kept["test"]["id"]
    assert ("validation", ids["sixteen"], "converted_image", "converted") in named_lines(tmp_path / REPORT)
    # Another setting of the check is another cache entry.
    with pytest.raises(AssertionError, match="checked again"):
        check_splits(splits, processor.tokenizer, check_args(max_target_length=8), str(tmp_path))


def word_tokenizer():
    """A word-level tokenizer with an unknown token (the tiny model's is byte-level: it has none)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def test_each_problem_is_found_with_its_detail():
    white = png(Image.new("L", (40, 10), 255))
    cells = [white, white, white, white, png(Image.new("L", (1, 200))), png(Image.new("L", (20001, 201))),
             b"not an image at all", white, png(Image.new("I;16", (40, 10), 65535))]
    texts = ["a b", "", None, "a c a", "a b", "a b", "a b", "a b a b a b", "a b"]
    check = LineCheck("image", "text", word_tokenizer(), max_target_length=5, max_image_side=20000, max_aspect_ratio=100)
    found = check({"image": [{"bytes": cell, "path": None} for cell in cells], "text": texts})
    assert found["findings"] == [[], ["empty_text"], ["empty_text"], ["unknown_tokens"], ["bad_image_size"],
                                 ["bad_image_size"], ["undecodable_image"], ["label_too_long"], ["converted_image"]]
    details = [detail for line in found["details"] for detail in line]
    assert details[:3] == ['text ""', "text null", "no token for 'c'"]
    assert "aspect ratio above max_aspect_ratio=100" in details[3] and "above max_image_side=20000" in details[4]
    assert details[5].startswith("UnidentifiedImageError") and details[-1] == "mode I;16 scaled to 8 bits"


def test_a_column_of_the_wrong_kind_is_named(tiny_args, monkeypatch):
    monkeypatch.setattr(trocr_recipe.pipeline, "load_model", lambda *a: pytest.fail("model loaded"))
    with pytest.raises(SystemExit, match=r"column 'text' of the train split holds .*string.*, not images"):
        run_trocr.main(tiny_args + ["--image_column", "text"])


def test_a_missing_dataset_is_named(tiny_args, tmp_path):
    with pytest.raises(SystemExit, match=rf"dataset_name {tmp_path}/nothing: no such local folder"):
        run_trocr.main(tiny_args + ["--dataset_name", str(tmp_path / "nothing")])


def test_a_wrong_type_in_the_recipe_names_key_value_and_type(tiny_args, tmp_path):
    recipe = tmp_path / "typo.json"
    recipe.write_text(json.dumps({"learning_rate": "fast", "generation_num_beams": 2.5, "on_empty_text": "drop"}))
    with pytest.raises(SystemExit) as stopped:
        run_trocr.main([str(recipe)] + tiny_args[1:])
    message = str(stopped.value)
    assert f"{recipe}: wrong type" in message
    assert '"learning_rate": "fast" is a string, expected a number' in message
    assert '"generation_num_beams": 2.5 is a number, expected an integer or null' in message
    assert '"on_empty_text": "drop" is a string, expected "error" or "skip" or "keep"' in message
    # On the command line: the flag and the value, without pages of usage.
    with pytest.raises(SystemExit, match=r"--generation_num_beams.*invalid int value: '2.5'"):
        run_trocr.main(tiny_args + ["--generation_num_beams", "2.5"])


def test_an_output_dir_of_another_recipe_stops_the_run(tiny_args, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_trocr.main(tiny_args + ["--preflight_only"])  # records run_recipe.json
    assert json.loads((out / RUN_RECIPE).read_text())["learning_rate"] == 5e-4
    (out / "checkpoint-2").mkdir()  # the folder now holds a run
    (out / "all_results.json").write_text("{}")
    monkeypatch.setattr(trocr_recipe.pipeline, "load_model", lambda *a: pytest.fail("model loaded"))
    with pytest.raises(SystemExit, match=r"holds a run of another recipe \(learning_rate 0.0005 -> 0.001, see"):
        run_trocr.main(tiny_args + ["--learning_rate", "1e-3"])
    monkeypatch.undo()
    # The same recipe goes on (what may change to extend a run, changes); overwrite_output_dir
    # starts afresh with the new recipe, the earlier run's checkpoints and results removed.
    run_trocr.main(tiny_args + ["--preflight_only", "--max_steps", "50"])
    run_trocr.main(tiny_args + ["--preflight_only", "--learning_rate", "1e-3", "--overwrite_output_dir"])
    assert not (out / "checkpoint-2").exists() and not (out / "all_results.json").exists()
    assert json.loads((out / RUN_RECIPE).read_text())["learning_rate"] == 1e-3
