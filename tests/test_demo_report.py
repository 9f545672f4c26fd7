"""data_scripts/demo_report.py: both stages' figures, stage 1 per font, the new hand's lines before and after."""

import json

import pytest
from datasets import DatasetDict, load_from_disk

import demo_report
from trocr_recipe.metrics import corpus_cer
from trocr_recipe.outputs import write_predictions


@pytest.fixture
def runs(tiny_data, tmp_path):
    """A stage-1 run whose test lines carry two fonts, and a stage-2 run that read two of its
    three test lines better after fine-tuning."""
    test = load_from_disk(tiny_data)["test"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    for run in (stage1, stage2):
        run.mkdir()
    fonts = ["kalam" if index % 2 else "caveat" for index in range(len(test))]
    data = tmp_path / "data"
    DatasetDict({"test": test.remove_columns("font").add_column("font", fonts)}).save_to_disk(str(data))
    readings = [text if index % 2 else text[:-1] for index, text in enumerate(test["text"])]
    write_predictions(str(stage1), "test", test["id"], test["text"], readings)
    (stage1 / "all_results.json").write_text(json.dumps({"eval_cer": 7.0, "test_cer": 6.0}))

    ids, texts = ["n-0", "n-1", "n-2"], ["Come here", "Been child", "Was house"]
    write_predictions(str(stage2), "baseline_test", ids, texts, ["Some hare", "Bean chill", "Was house"])
    write_predictions(str(stage2), "test", ids, texts, ["Come here", "Been chill", "Was house"])
    (stage2 / "all_results.json").write_text(json.dumps(
        {"baseline_cer": 40.0, "eval_cer": 10.0, "baseline_test_cer": 41.0, "test_cer": 12.5}))
    caveat = [index for index, font in enumerate(fonts) if font == "caveat"]
    expected_caveat = corpus_cer([test["text"][i] for i in caveat], [readings[i] for i in caveat])
    return ["--stage1", str(stage1), "--stage1_data", str(data), "--stage2", str(stage2)], expected_caveat


def test_prints_both_stages_per_font_and_the_changed_lines(runs, capsys):
    argv, expected_caveat = runs
    demo_report.main(argv)
    out = capsys.readouterr().out
    assert "Stage 1, synthetic hands: validation CER 7.0, test CER 6.0" in out
    assert f"caveat {expected_caveat:.1f}, kalam 0.0" in out
    assert "test CER 41.0 before fine-tuning, 12.5 after (validation 40.0 -> 10.0)" in out
    assert "reference: Come here\n  before:    Some hare\n  after:     Come here" in out
    assert "Bean chill" in out and "Was house" not in out  # only lines whose reading changed


def test_a_missing_run_says_make_demo(runs, tmp_path):
    argv, _ = runs
    with pytest.raises(SystemExit, match="Run `make demo` first"):
        demo_report.main(argv[:-1] + [str(tmp_path / "nothing")])
