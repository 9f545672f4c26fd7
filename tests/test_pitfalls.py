"""experiments/pitfalls.py on the tiny model: every row there, each pitfall really planted
(and nothing else changed), the reference row trained exactly as run_trocr.py trains."""

import json
import shutil
import sys

import pytest

import run_trocr
from conftest import ROOT
from trocr_recipe.outputs import read_jsonl

sys.path.insert(0, str(ROOT / "experiments"))
import pitfalls  # noqa: E402

# What each row's planted settings differ from the reference row's in: its pitfall, only it.
PLANTED_KEYS = {
    "reference": set(),
    "bos_start": {"decoder_start_token_id"},
    "bos_in_labels": {"labels"},
    "pads_in_loss": {"labels"},
    "max_length_20": {"generation_max_length"},
    "wrong_normalization": {"image_mean", "image_std", "pixel_range"},
    "learning_rate_x10": {"learning_rate"},
    "teacher_forcing_cer": set(),
}


@pytest.fixture(scope="module")
def talkative_model(tiny_model, tmp_path_factory):
    """The tiny model, never generating `</s>`: every line runs to the maximum length, so
    that the cap at 20 tokens shows. Its weights say so (an output projection of its own whose
    `</s>` row is zero), not its generation config, which the preflight would rightly refuse
    (suppressing `</s>` forbids every line: pitfall 14)."""
    import torch
    from transformers import VisionEncoderDecoderModel

    path = tmp_path_factory.mktemp("models") / "talkative"
    shutil.copytree(tiny_model, path)
    model = VisionEncoderDecoderModel.from_pretrained(path)
    model.config.decoder.tie_word_embeddings = model.config.tie_word_embeddings = False
    projection = model.decoder.get_output_embeddings()
    projection.weight = torch.nn.Parameter(projection.weight.detach().clone())
    with torch.no_grad():  # a </s> logit of 0, below the best of 299 others: never in a beam's top 4
        projection.weight[model.generation_config.eos_token_id] = 0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def experiment(tiny_data, talkative_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("pitfalls")
    argv = [
        "--model", str(talkative_model),
        "--dataset", str(tiny_data),
        "--recipe", str(ROOT / "recipes" / "tiny.json"),
        "--output_dir", str(output),
        "--max_steps", "3",
        "--eval_samples", "5",
    ]
    rows = pitfalls.main(argv)
    return argv, output, {row["name"]: row for row in rows}


def test_every_row_is_reported(experiment):
    _, output, rows = experiment
    assert list(rows) == [pitfall.name for pitfall in pitfalls.PITFALLS] == list(PLANTED_KEYS)
    saved = json.loads((output / "pitfalls.json").read_text())
    assert [row["name"] for row in saved["rows"]] == list(rows)
    table = (output / "pitfalls.md").read_text()
    assert "first 5 lines of the test split" in table
    for pitfall in pitfalls.PITFALLS:
        row = rows[pitfall.name]
        assert len(row["losses"]) == 3 and row["final_loss"] == pytest.approx(sum(row["losses"]) / 3)
        line = next(line for line in table.splitlines() if line.startswith(f"| {pitfall.title} |"))
        assert f"| {row['baseline_cer']:.2f}" in line and f"| {row['final_loss']:.4f} |" in line
        assert f"| {row['cer'] - rows['reference']['cer']:+.2f}" in line  # after, against the reference's
        assert [step["step"] for step in read_jsonl(output / pitfall.name / "loss_log.jsonl")] == [1, 2, 3]


def test_each_pitfall_is_planted_and_nothing_else(experiment, processor):
    _, _, rows = experiment
    tokenizer = processor.tokenizer
    bos, pad, eos = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    planted = {name: row["planted"] for name, row in rows.items()}
    reference = planted["reference"]
    for name, settings in planted.items():
        assert {key for key in settings if settings[key] != reference[key]} == PLANTED_KEYS[name], name

    # The reference row is the recipe.
    assert reference["decoder_start_token_id"] == {"config": eos, "generation_config": eos}
    assert all(labels[0] != bos for labels in reference["labels"])
    assert any(-100 in labels for labels in reference["labels"])
    assert reference["image_mean"] == reference["image_std"] == [0.5] * 3
    assert reference["pixel_range"][0] < 0 and reference["generation_max_length"] > 20

    # 1. Both configs start from <s>.
    assert planted["bos_start"]["decoder_start_token_id"] == {"config": bos, "generation_config": bos}
    # 2. The labels are what tokenizer(text) gives by default: <s> text </s>, padded with -100.
    expected = tokenizer(planted["bos_in_labels"]["label_texts"])["input_ids"]
    for labels, ids in zip(planted["bos_in_labels"]["labels"], expected, strict=True):
        assert ids[0] == bos and labels[: len(ids)] == ids and set(labels[len(ids):]) <= {-100}
    # 3. The reference's labels with the pad id where it has -100: pads in the loss.
    pads = planted["pads_in_loss"]["labels"]
    assert pads == [[pad if token == -100 else token for token in labels] for labels in reference["labels"]]
    assert not any(-100 in labels for labels in pads)
    # 4. Nothing generated is longer than 20 tokens, the start token included.
    assert planted["max_length_20"]["generation_max_length"] == 20
    assert rows["max_length_20"]["longest_generation"] == 20
    assert rows["reference"]["longest_generation"] == reference["generation_max_length"] > 20
    # 7. The model sees pixels in [0, 1].
    low, high = planted["wrong_normalization"]["pixel_range"]
    assert 0 <= low < high <= 1
    # 9.
    assert planted["learning_rate_x10"]["learning_rate"] == pytest.approx(10 * reference["learning_rate"])
    # 8. The reported CER is not the generated one, which is the reference's: the same training.
    forced = rows["teacher_forcing_cer"]
    assert forced["cer"] != forced["generated_cer"] and forced["baseline_cer"] != forced["generated_baseline_cer"]
    assert forced["generated_cer"] == rows["reference"]["cer"]
    assert forced["generated_baseline_cer"] == rows["reference"]["baseline_cer"]


def test_rows_share_seed_and_data_order(experiment):
    # Rows whose pitfall is not in training train exactly as the reference.
    _, _, rows = experiment
    for name in ("max_length_20", "teacher_forcing_cer"):
        assert rows[name]["losses"] == rows["reference"]["losses"], name


def test_reference_row_trains_as_run_trocr(experiment, tmp_path):
    argv, output, _ = experiment
    run_trocr.main(pitfalls.recipe_argv(pitfalls.parse_args(argv)) + ["--output_dir", str(tmp_path / "run")])
    assert read_jsonl(tmp_path / "run" / "loss_log.jsonl") == read_jsonl(output / "reference" / "loss_log.jsonl")


def test_missing_checkpoint_says_make_demo(tmp_path):
    with pytest.raises(SystemExit, match="make demo"):
        pitfalls.main(["--model", str(tmp_path / "nothing")])


def test_readme_table_goes_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{pitfalls.README_START}\nplaceholder\n{pitfalls.README_END}\n\nafter\n")
    pitfalls.write_readme("| a | b |\n", readme)
    pitfalls.write_readme("| c | d |\n", readme)  # again: replaces, never appends
    assert readme.read_text() == f"# Title\n\n{pitfalls.README_START}\n| c | d |\n{pitfalls.README_END}\n\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="pitfalls:start"):
        pitfalls.write_readme("| a | b |\n", readme)


def test_a_reference_that_does_not_improve_and_rows_no_worse_are_named():
    reference = {"title": "reference", "baseline_cer": 60.0, "cer": 59.8}
    better = {"title": "1. better", "baseline_cer": 60.0, "cer": 59.0}
    worse = {"title": "2. worse", "baseline_cer": 60.0, "cer": 70.0}
    forced = {"title": "8. forced", "baseline_cer": 40.0, "cer": 30.0, "generated_cer": 59.8}
    found = pitfalls.unexpected([reference, better, worse, forced], "data/newhand")
    assert len(found) == 2
    assert found[0].startswith("The reference row did not improve on data/newhand (CER 60.00 -> 59.80)")
    assert found[1] == "1. better ends at CER 59.00, no worse than the reference's 59.80"
    assert pitfalls.unexpected([{**reference, "cer": 30.0}, worse, forced], "data/newhand") == []


def test_several_seeds_the_seeds_attempt_and_the_own_domain_check(experiment, tmp_path):
    argv, _, _ = experiment
    output = tmp_path / "seeds"
    rows = pitfalls.main(argv + ["--output_dir", str(output), "--seeds", "1", "2", "--rows", "reference",
                                 "--attempts", "--own_domain"])
    assert [row["name"] for row in rows] == ["reference", "last_layers"]  # --rows: the reference alone
    reference, attempt = rows
    assert reference["seeds"] == [1, 2] and len(reference["cers"]) == 2
    assert reference["gaps"] == [0.0, 0.0] and reference["reference_range"] == max(reference["cers"]) - min(
        reference["cers"])
    saved = json.loads((output / "pitfalls.json").read_text())
    assert saved["runs"]["reference"][0]["seed"] == 2
    assert saved["runs"]["reference"][0]["losses"] != reference["losses"]  # the seed changes the run
    # Only the last encoder layer and the last two decoder layers (the tiny model has one each).
    assert attempt["planted"]["trainable"] == ["encoder.layers.0.*", "decoder.model.decoder.layers.0.*"]
    assert reference["planted"]["trainable"] == ["all"]
    table = (output / "pitfalls.md").read_text()
    assert "once per seed (1, 2" in table and "| ends worse |" in table
    assert f"| {attempt['title']} |" in table
    for seed in (1, 2):
        assert (output / "last_layers" / f"seed-{seed}" / "loss_log.jsonl").is_file()


def test_ends_worse_only_beyond_the_reference_spread():
    def runs(name, cers):
        return [{"name": name, "title": name, "seed": seed, "cer": cer} for seed, cer in zip((1, 2, 3), cers)]

    rows = pitfalls.across_seeds({"reference": runs("reference", [30.0, 31.0, 30.5]),
                                  "clear": runs("clear", [32.0, 33.0, 32.5]),
                                  "inside": runs("inside", [31.0, 31.5, 31.0]),
                                  "mixed": runs("mixed", [35.0, 30.0, 36.0])})
    verdicts = {row["name"]: row["ends_worse"] for row in rows}
    assert verdicts == {"reference": False, "clear": True, "inside": False, "mixed": False}
    assert rows[1]["gap_mean"] == pytest.approx(2.0) and rows[0]["reference_range"] == 1.0


def test_own_domain_reference_must_hold_its_cer():
    held = {"name": "reference", "title": "reference", "baseline_cer": 7.6, "cer": 7.8}
    drifted = {**held, "cer": 8.9}
    assert pitfalls.unexpected([held], "data/synthetic", own_domain=True) == []
    found = pitfalls.unexpected([drifted], "data/synthetic", own_domain=True)
    assert found == ["The reference row did not hold its CER on data/synthetic (CER 7.60 -> 8.90, more than 0.3 "
                     "worse): give it a lower --learning_rate before reading the rows against it."]
