import json
import sys

import pytest

from trocr_recipe.args import parse_recipe


def test_recipe_gives_defaults_and_flags_override(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({
        "model_name_or_path": "m", "dataset_name": "d", "output_dir": str(tmp_path / "out"),
        "learning_rate": 2e-5, "augment": True, "generation_num_beams": 10, "report_to": ["tensorboard"],
    }))
    model_args, data_args, training_args = parse_recipe([str(recipe), "--learning_rate", "1e-5", "--no_augment"])
    assert training_args.learning_rate == 1e-5
    assert data_args.augment is False
    assert training_args.generation_num_beams == 10
    assert training_args.report_to == ["tensorboard"]
    assert model_args.model_name_or_path == "m"


def test_unknown_key_in_recipe_is_named(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model_name_or_path": "m", "dataset_name": "d", "learnin_rate": 1e-5}))
    with pytest.raises(SystemExit, match="learnin_rate"):
        parse_recipe([str(recipe)])


def test_unknown_flag_is_named(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model_name_or_path": "m", "dataset_name": "d"}))
    with pytest.raises(SystemExit, match="no_such_key"):
        parse_recipe([str(recipe), "--no_such_key", "1"])


def test_abbreviated_flag_is_not_guessed(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model_name_or_path": "m", "dataset_name": "d"}))
    with pytest.raises(SystemExit, match="--learning_r"):
        parse_recipe([str(recipe), "--learning_r", "1e-5"])


def test_bad_json_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.json"
    recipe.write_text('{\n  "model_name_or_path": "m",\n}')
    with pytest.raises(SystemExit, match=r"broken.json, line 3: not valid JSON"):
        parse_recipe([str(recipe)])


def test_every_shipped_recipe_parses():
    from conftest import ROOT

    recipes = sorted((ROOT / "recipes").glob("*.json"))
    assert len(recipes) >= 8
    for recipe in recipes:
        _, _, training_args = parse_recipe([str(recipe)])
        assert training_args.output_dir.startswith("runs/"), recipe
        assert training_args.predict_with_generate, recipe


@pytest.mark.parametrize("script", ["run_trocr", "run_trocr_no_trainer"])
def test_help_opens_with_the_script_the_recipe_and_the_projects_own_options(script, capsys, monkeypatch):
    module = __import__(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])  # the program name argparse shows
    with pytest.raises(SystemExit) as stopped:
        module.main(["recipes/small.json", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == f"usage: {script}.py RECIPE.json [--flag value ...]"
    assert module.__doc__.strip().splitlines()[0] in text[:400]  # what the script does, first
    own, stock = text.index("options of this project"), text.index("training options (transformers")
    assert text.index("RECIPE.json: a recipe") < own
    for flag in ("--model_name_or_path", "--trainable", "--method", "--dataset_name", "--baseline_test"):
        assert own < text.index(flag) < stock, flag
    for flag in ("--learning_rate", "--gradient_accumulation_steps", "--eval_strategy"):
        assert text.index(flag) > stock, flag
    assert text.count("--learning_rate LEARNING_RATE") == 1  # each option once
