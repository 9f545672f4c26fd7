"""Model and processor loading (trocr_recipe.modeling.pretrained) as every tool meets it:
each damaged or hostile folder is one `error:` line naming it, exit 2, and a folder's own
Python is never run, whatever is on stdin."""

import importlib
import re
import subprocess
import sys

import pytest

import predict
from conftest import ROOT
from hostile import RAN, bad_model_folders, custom_code_folder
from trocr_recipe.args import ModelArguments
from trocr_recipe.errors import BadInput
from trocr_recipe.modeling import load_model, load_processor

check_loop = importlib.import_module("check_loop")

# What each folder's error line must say (beyond its path).
EXPECTED = {
    "no_config": "no config.json",
    "empty_config": "config.json, line 1: not valid JSON",
    "list_config": "config.json: expected a JSON object",
    "foreign_config": "model_type 'bert'",
    "no_decoder": "no decoder config",
    "corrupt_safetensors": "SafetensorError",
    "truncated_safetensors": "SafetensorError",
    "pickle_bin": "pickle torch.load(weights_only=True) refuses",
    "int_tokenizer_class": "cannot load a TrOCRProcessor",
    "bad_generation_config": "generation_config.json, line 1: not valid JSON",
    "not_utf8_config": "config.json: not UTF-8",
    "custom_code": "maps a class to Python code in the folder",
}


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    return bad_model_folders(tiny_model, tmp_path_factory.mktemp("bad_models"))


@pytest.fixture(scope="module")
def batch_file(processor, tmp_path_factory):
    import torch
    from PIL import Image

    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    pixels = processor(images=[Image.new("RGB", (64, 16), "white")], return_tensors="pt").pixel_values
    torch.save({"pixel_values": pixels, "labels": torch.tensor([[5, 6, 2]])}, path)
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_loop_names_the_folder(folders, batch_file, capsys, name):
    assert check_loop.main(["--model", str(folders[name]), "--batch", str(batch_file)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(folders[name]) in error and EXPECTED[name] in error, error
    assert not (folders[name] / RAN).exists()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loading_names_the_folder(folders, processor, name):
    """run_trocr.py and run_trocr_no_trainer.py load through load_processor and load_model."""
    model_args = ModelArguments(model_name_or_path=str(folders[name]), allow_pickle_weights=name == "pickle_bin")
    with pytest.raises(BadInput, match=re.escape(EXPECTED[name])) as stopped:
        load_model(model_args, load_processor(model_args).tokenizer)
    assert str(stopped.value).startswith(f"model_name_or_path {folders[name]}")


def test_predict_names_the_folder(folders, capsys):
    folder = folders["no_decoder"]
    assert predict.main([str(folder), str(ROOT / "docs")]) == 2
    assert f"error: model {folder}: config.json has no decoder config" in capsys.readouterr().err


def test_pickle_weights_refused_by_default(folders, processor):
    with pytest.raises(BadInput, match="no model.safetensors.*--allow_pickle_weights"):
        load_model(ModelArguments(model_name_or_path=str(folders["pickle_bin"])), processor.tokenizer)


@pytest.mark.parametrize("path, message", [
    ("/no/such/folder", "no such local folder"),
    ("models/tiny", "Run `make tiny` first"),
    ("", "empty"),
    ("a/b/c", "no such local folder"),
])
def test_missing_model_is_named(path, message, processor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where models/tiny is not built
    with pytest.raises(BadInput, match=message):
        load_model(ModelArguments(model_name_or_path=path), processor.tokenizer)


@pytest.mark.parametrize("tool", ["check_loop.py", "predict.py", "run_trocr.py"])
def test_custom_code_never_runs_even_with_yes_on_stdin(tool, tiny_model, tiny_data, batch_file, tmp_path):
    folder = custom_code_folder(tiny_model, tmp_path / "custom")
    args = {
        "check_loop.py": ["--model", str(folder), "--batch", str(batch_file)],
        "predict.py": [str(folder), str(batch_file)],
        "run_trocr.py": [str(ROOT / "recipes" / "tiny.json"), "--model_name_or_path", str(folder),
                         "--dataset_name", str(tiny_data), "--output_dir", str(tmp_path / "run")],
    }[tool]
    done = subprocess.run([sys.executable, str(ROOT / tool), *args], input="y\ny\ny\n", capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "maps a class to Python code" in done.stderr.splitlines()[-1]
    assert not (folder / RAN).exists()
