"""check_loop on a tutorial-style loop's own objects: batches built as tutorials build them
(processor(images=...).pixel_values, tokenizer(text, padding="max_length")), each classic
mistake planted on a copy of the tiny model or on the batch, found with its evidence; the
fixed loop has no error; the CLI's exit codes."""

import copy
import importlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import load_from_disk
from transformers import GenerationConfig, VisionEncoderDecoderModel

from conftest import ROOT
from trocr_recipe.checks import Finding
from trocr_recipe.pitfalls import Subject
from trocr_recipe.pitfalls.evaluation import check_references
from trocr_recipe.predictions import classify
from trocr_recipe.loopcheck import (
    IGNORE_INDEX,
    check_loop,
    format_findings,
    generation_room,
    validate_batch,
)

cli = importlib.import_module("check_loop")  # the top-level script, beside trocr_recipe's check_loop

LINES = 4
WIDTH = 32  # the tutorial's padding="max_length" width
MAX_LENGTH = 32  # generation: room for the longest line of the batch with its margin
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def lines(tiny_data) -> tuple[list, list[str]]:
    split = load_from_disk(str(tiny_data))["train"].select(range(LINES))
    return [image.convert("RGB") for image in split["image"]], list(split["text"])


@pytest.fixture
def model(tiny_model):
    """The tiny model as a careful loop sets it up: special ids on model.config too (the tiny
    model may only have them on its decoder and generation configs), generation sized."""
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model).eval()
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 2
    model.config.pad_token_id = 1
    model.generation_config.max_length = MAX_LENGTH  # greedy: beam search is slow on the shared CPU
    return model


def pixels(processor, images) -> torch.Tensor:
    return processor(images=images, return_tensors="pt").pixel_values


def tutorial_labels(tokenizer, texts) -> torch.Tensor:
    """What most tutorials feed: `<s> text </s>`, padded with the pad id."""
    return tokenizer(texts, padding="max_length", max_length=WIDTH, truncation=True, return_tensors="pt").input_ids


def fixed_labels(tokenizer, texts) -> torch.Tensor:
    """The tutorial's labels without `<s>`, pads turned into -100."""
    labels = tutorial_labels(tokenizer, texts)[:, 1:].clone()
    labels[labels == tokenizer.pad_token_id] = IGNORE_INDEX
    return labels


def padded(rows: list[list[int]]) -> torch.Tensor:
    labels = torch.full((len(rows), max(map(len, rows))), IGNORE_INDEX)
    for line, row in enumerate(rows):
        labels[line, : len(row)] = torch.tensor(row)
    return labels


@pytest.fixture
def batch(processor, lines) -> dict:
    images, texts = lines
    return {"pixel_values": pixels(processor, images), "labels": fixed_labels(processor.tokenizer, texts)}


@pytest.fixture
def generate_step(processor):
    def step(model, batch) -> list[str]:
        """A validation step as the recipe's: generate, decode without clean-up."""
        ids = model.generate(pixel_values=batch["pixel_values"])
        return processor.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return step


@pytest.fixture
def teacher_forced_step(processor):
    def step(model, batch) -> list[str]:
        """The common mistake: the argmax of a labelled forward pass, decoded."""
        logits = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).logits
        return processor.tokenizer.batch_decode(logits.argmax(-1), skip_special_tokens=True)

    return step


def only(findings, name: str, level: str = "error"):
    """The finding appears once, at its level, pointing at its section of docs/pitfalls.md."""
    assert [finding.name for finding in findings].count(name) == 1, format_findings(findings)
    finding = next(finding for finding in findings if finding.name == name)
    assert finding.level == level and finding.doc == f"docs/pitfalls.md#pitfall-{finding.pitfall}"
    assert finding.evidence and finding.effect and finding.fix
    return finding


def errors(findings) -> list[str]:
    return [finding.name for finding in findings if finding.level == "error"]


def test_fixed_loop_has_no_error(model, processor, batch, lines, generate_step):
    report = check_loop(model, processor, batch, texts=lines[1], evaluate=generate_step)
    assert errors(report) == [], format_findings(report)
    assert [finding.name for finding in report if finding.name != "generation_too_short"] == ["single_beam"]
    assert len(report.checked) == 3 and "evaluation" in report.checked[2]
    assert report.scores["yours"] == report.scores["generate"]
    assert "No mistake found." in format_findings(report) or "0 error(s)" in format_findings(report)


def test_tutorial_labels_keep_bos_and_pad(model, processor, lines):
    images, texts = lines
    labels = tutorial_labels(processor.tokenizer, texts)
    report = check_loop(model, processor, {"pixel_values": pixels(processor, images), "labels": labels}, texts)
    bos = only(report, "bos_in_labels")
    assert bos.pitfall == 2 and f"{LINES} of {LINES} lines" in bos.message and f"[0, {labels[0, 1]}" in bos.evidence
    pads = only(report, "pad_not_ignored")
    assert pads.pitfall == 3 and f"{int((labels == 1).sum())} label positions hold the pad id (1)" in pads.message
    assert "0 positions of the batch are -100" in pads.evidence
    # The labels still decode back to their texts: <s> and pads are special tokens.
    assert {"references_not_texts", "labels_cut"}.isdisjoint(f.name for f in report)


def test_decoder_start_bos_saved_variant(tiny_model, processor, batch, tmp_path):
    variant = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    for config in (variant.config, variant.generation_config):
        config.decoder_start_token_id = processor.tokenizer.bos_token_id
    variant.save_pretrained(tmp_path / "bos_start")
    loaded = VisionEncoderDecoderModel.from_pretrained(tmp_path / "bos_start")
    finding = only(check_loop(loaded, processor, batch), "decoder_start_bos")
    assert finding.pitfall == 1 and "from <s> instead of </s>" in finding.message
    assert "model.generation_config.decoder_start_token_id=0" in finding.evidence


def test_decoder_start_bos_on_model_config_only(model, processor, batch):
    model.config.decoder_start_token_id = 0  # the tutorial's cls_token_id
    report = check_loop(model, processor, batch)
    assert "model.config.decoder_start_token_id=0" in only(report, "decoder_start_bos").evidence
    disagree = only(report, "configs_disagree")
    assert disagree.pitfall == 5 and "decoder_start_token_id: model.config=0" in disagree.evidence


def test_configs_disagree(model, processor, batch):
    model.generation_config.pad_token_id = 0
    model.config.num_beams = 4  # a transformers 4 tutorial: generate() never sees it
    finding = only(check_loop(model, processor, batch), "configs_disagree")
    assert "model.generation_config=0 (the tokenizer's is 1)" in finding.evidence
    assert "model.config holds {'num_beams': 4}" in finding.evidence


def test_model_config_without_special_ids(model, processor, batch):
    model.config.pad_token_id = None
    finding = only(check_loop(model, processor, batch), "configs_disagree")
    assert "model.config has no pad_token_id" in finding.message and "model.config.pad_token_id=None" in finding.evidence


def test_labels_without_bos_cut_first_piece(model, processor, lines):
    """A tokenizer call that never added <s>, then the first id cut to drop it."""
    images, texts = lines
    rows = [ids[1:] for ids in processor.tokenizer(texts, add_special_tokens=False).input_ids]
    report = check_loop(model, processor, {"pixel_values": pixels(processor, images), "labels": padded(rows)}, texts)
    eos = lost = only(report, "labels_cut")
    assert eos.pitfall == 12 and f"{LINES} of {LINES} labels do not end with </s> (id 2)" in eos.message
    first = processor.tokenizer.decode(rows[0], clean_up_tokenization_spaces=False)
    assert f"text {texts[0]!r}, label decodes to {first!r}" in lost.evidence and texts[0].endswith(first)
    assert "references_not_texts" not in [finding.name for finding in report]


def test_labels_not_texts_read_from_the_batch(model, processor, batch, lines):
    texts = lines[1][1:] + lines[1][:1]  # texts of other lines
    finding = only(check_loop(model, processor, {**batch, "texts": texts}), "references_not_texts")
    assert finding.pitfall == 11 and f"line 0: text {texts[0]!r}, label decodes to {lines[1][0]!r}" in finding.evidence


def test_generation_too_short(model, processor, batch):
    model.generation_config.max_length = 5
    finding = only(check_loop(model, processor, batch), "generation_too_short")
    longest = int((batch["labels"] != IGNORE_INDEX).sum(1).max())
    assert finding.pitfall == 4 and "max_length=5" in finding.evidence
    assert f"room for 4 tokens; the longest line needs {longest}" in finding.message


def test_generation_room_defaults():
    # transformers 5 leaves max_length unset (generate's default: 20 new tokens); 4.x sets 20, the start token included
    assert generation_room(GenerationConfig())[0] == (20 if GenerationConfig().max_length is None else 19)
    assert generation_room(GenerationConfig(max_length=64))[0] == 63
    assert generation_room(GenerationConfig(max_new_tokens=7, max_length=64))[0] == 7


def test_single_beam(model, processor, batch):
    finding = only(check_loop(model, processor, batch), "single_beam", "warning")
    beams = model.generation_config.num_beams  # unset (None) on transformers 5, 1 on 4.x
    assert beams in (None, 1) and finding.pitfall == 13 and finding.evidence == f"model.generation_config.num_beams={beams}"
    model.generation_config.num_beams = 2
    assert "single_beam" not in [finding.name for finding in check_loop(model, processor, batch)]


def test_vocab_size_mismatch(model, processor, batch):
    other = copy.deepcopy(processor)
    other.tokenizer.add_tokens(["extra_a", "extra_b"])
    finding = only(check_loop(model, other, batch), "tokenizer_mismatch")
    assert finding.pitfall == 6 and "The tokenizer has 302 ids, the decoder's embedding table 300" in finding.message


def test_pixel_shape(model, processor, batch, generate_step):
    square = torch.nn.functional.interpolate(batch["pixel_values"], size=(64, 64))
    report = check_loop(model, processor, {**batch, "pixel_values": square}, evaluate=generate_step)
    finding = only(report, "pixel_preparation")
    assert "3x64x64 images; the encoder takes 3x32x128" in finding.message
    assert only(report, "not_checked", "warning").pitfall == 8  # generate() fails on them: named, not raised


@pytest.mark.parametrize(
    "prepare, looks",
    [
        (lambda page: page, "pixels in [0, 1]"),
        (lambda page: (page - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
         "ImageNet mean and std"),
    ],
    ids=["to_tensor", "imagenet"],
)
def test_pixel_normalization(model, processor, batch, prepare, looks):
    page = batch["pixel_values"] * 0.5 + 0.5  # back to [0, 1]: what ToTensor() gives
    wrong = prepare(page)
    finding = only(check_loop(model, processor, {**batch, "pixel_values": wrong}), "pixel_preparation")
    assert finding.pitfall == 7 and f"they look like {looks}" in finding.evidence
    assert f"observed min {float(wrong.min()):.3f}, max {float(wrong.max()):.3f}" in finding.evidence
    assert "the processor gives [-1.00, 1.00]" in finding.evidence


def test_teacher_forced_eval(model, processor, batch, lines, teacher_forced_step):
    report = check_loop(model, processor, batch, texts=lines[1], evaluate=teacher_forced_step)
    finding = only(report, "teacher_forced_eval")
    assert finding.pitfall == 8 and f"of {LINES} lines" in finding.evidence
    assert report.scores["yours"] != report.scores["generate"]
    assert f"yours {report.scores['yours']:.2f}, generate {report.scores['generate']:.2f}" in finding.evidence


def test_eval_cuts_lines(model, processor, batch):
    model.generation_config.suppress_tokens = [processor.tokenizer.eos_token_id]  # every line runs on

    def short_step(model, batch):
        ids = model.generate(pixel_values=batch["pixel_values"], max_length=6)
        return processor.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    finding = only(check_loop(model, processor, batch, evaluate=short_step), "generation_too_short")
    assert finding.pitfall == 4 and f"{LINES} of {LINES} lines" in finding.evidence
    assert "are beginnings of the generated lines" in finding.evidence
    assert f"used all its {MAX_LENGTH - 1} tokens without </s> on {LINES} of {LINES} lines" in finding.evidence


def test_eval_disagrees(model, processor, batch):
    finding = only(check_loop(model, processor, batch, evaluate=lambda model, batch: ["?"] * LINES),
                   "teacher_forced_eval", "warning")
    assert finding.pitfall == 8 and "line 0: yours '?'" in finding.evidence


def test_eval_decoded_with_clean_up(model, processor):
    ours, theirs = "hey presto ! You 're", "hey presto! You're"
    paths = {"generate": [ours], "generate_cleaned": [theirs], "teacher_forced": [["x"]] * 3, "theirs": [theirs]}
    paths["kinds"] = classify([theirs], paths)
    finding = check_references(Subject(model, processor.tokenizer, evaluation=paths))
    assert (finding.name, finding.pitfall, finding.level) == ("references_not_texts", 11, "warning")
    assert "clean_up_tokenization_spaces=True" in finding.message


def test_eval_must_return_one_text_per_line(model, processor, batch):
    report = check_loop(model, processor, batch, evaluate=lambda model, batch: ["a"])
    assert f"1 predictions for {LINES} lines" in only(report, "not_checked", "warning").evidence


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda batch: [batch], "the batch is a list, not a dict"),
        (lambda batch: {"pixel_values": batch["pixel_values"]}, "the batch has no labels"),
        (lambda batch: {**batch, "pixel_values": batch["pixel_values"][0]}, r"pixel_values is \(3, 32, 128\)"),
        (lambda batch: {**batch, "pixel_values": batch["pixel_values"].to(torch.uint8)}, "torch.uint8"),
        (lambda batch: {**batch, "labels": batch["labels"][:2]}, "4 images .pixel_values. but 2 label rows"),
        (lambda batch: {**batch, "texts": ["a"]}, "texts must be a list of 4 strings.*got 1 items"),
        (lambda batch: {**batch, "texts": "abcd"}, "texts must be a list of 4 strings.*got a str"),
    ],
)
def test_bad_batches_are_named(batch, change, message):
    bad = change(batch)
    with pytest.raises(ValueError, match=message):
        validate_batch(bad, bad.get("texts") if isinstance(bad, dict) else None)


def test_every_pitfall_has_its_section():
    """One anchor per number, 1 to 14, each on the heading of that number."""
    doc = (ROOT / "docs" / "pitfalls.md").read_text()
    anchors = re.findall(r'<a id="pitfall-(\d+)"></a>\n## (\d+)\. ', doc)
    assert [int(anchor) for anchor, _ in anchors] == list(range(1, 15))
    assert all(anchor == heading for anchor, heading in anchors)


def test_finding_text():
    short = Finding("pad_not_ignored", "error", "Pads.", pitfall=3)
    assert str(short) == "[error] pad_not_ignored: Pads.\n    see: docs/pitfalls.md#pitfall-3"
    loop = Finding("pad_not_ignored", "error", "Pads.", pitfall=3, evidence="[1, 1]", effect="Loss.", fix="-100")
    assert str(loop).splitlines() == [
        "[error] pad_not_ignored: Pads.", "    evidence: [1, 1]", "    effect: Loss.", "    fix: -100",
        "    see: docs/pitfalls.md#pitfall-3",
    ]


# The command line.


def saved(tmp_path, model, processor, batch, texts) -> tuple[str, str]:
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    torch.save({**batch, "texts": texts}, tmp_path / "batch.pt")
    return str(tmp_path / "model"), str(tmp_path / "batch.pt")


@pytest.fixture
def command(tmp_path) -> list[str]:
    """check_loop.py copied into another folder when trocr_recipe is installed (it must run
    from another repository), the project's own copy otherwise."""
    installed = subprocess.run([sys.executable, "-c", "import trocr_recipe"], cwd=tmp_path).returncode == 0
    script = ROOT / "check_loop.py"
    if installed:
        (tmp_path / "elsewhere").mkdir()
        script = shutil.copy(script, tmp_path / "elsewhere" / "check_loop.py")
    return [sys.executable, str(script)]


def run_cli(command, cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_exit_0_on_the_fixed_loop(command, model, processor, batch, lines, tmp_path):
    model_dir, batch_file = saved(tmp_path, model, processor, batch, lines[1])
    result = run_cli(command, tmp_path, "--model", model_dir, "--batch", batch_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"batch: {LINES} lines, labels against their texts" in result.stdout and "[error]" not in result.stdout


def test_cli_exit_1_on_a_mistake(command, model, processor, lines, tmp_path):
    images, texts = lines
    batch = {"pixel_values": pixels(processor, images), "labels": tutorial_labels(processor.tokenizer, texts)}
    model_dir, batch_file = saved(tmp_path, model, processor, batch, texts)
    result = run_cli(command, tmp_path, "--model", model_dir, "--batch", batch_file)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[error] bos_in_labels" in result.stdout and "see: docs/pitfalls.md#pitfall-2" in result.stdout
    assert str(ROOT / "docs" / "pitfalls.md") in result.stdout


def test_cli_exit_2_on_bad_input(command, tmp_path, tiny_model):
    torch.save({"pixel_values": torch.zeros(2, 3, 32, 128)}, tmp_path / "no_labels.pt")
    result = run_cli(command, tmp_path, "--model", str(tiny_model), "--batch", "no_labels.pt")
    assert result.returncode == 2 and "no_labels.pt: the batch has no labels" in result.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "missing.pt: no such file"),
        ([1, 2], "the batch is a list, not a dict"),
        ({"pixel_values": torch.zeros(2, 32, 128), "labels": torch.zeros(2, 5, dtype=torch.long)},
         r"pixel_values is \(2, 32, 128\)"),
    ],
)
def test_cli_names_the_bad_file(tiny_model, tmp_path, capsys, content, message):
    path = tmp_path / "missing.pt"
    if content is not None:
        torch.save(content, path)
    assert cli.main(["--model", str(tiny_model), "--batch", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and re.search(message, error)


def test_cli_missing_model_folder(tmp_path, capsys, batch):
    torch.save(batch, tmp_path / "batch.pt")
    assert cli.main(["--model", str(tmp_path / "nothing"), "--batch", str(tmp_path / "batch.pt")]) == 2
    assert f"--model {tmp_path / 'nothing'}: no such local folder" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--batch" in out and "torch.save" in out and "Exit status" in out
