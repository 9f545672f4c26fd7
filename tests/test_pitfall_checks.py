"""One check per pitfall, shared by every entry point; generation settings that forbid a
reading (pitfall 14) counted against transformers' own logits processors; and a battery of
broken set-ups on which a check names what is wrong and never raises."""

import copy
import re
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import (
    BatchEncoding,
    MinLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    SuppressTokensLogitsProcessor,
    VisionEncoderDecoderModel,
)

from conftest import ROOT
from trocr_recipe.loopcheck import check_loop, format_findings
from trocr_recipe.pitfalls import CHECKS, Subject, run_checks
from trocr_recipe.pitfalls.core import pitfall
from trocr_recipe.pitfalls.forbidden import blockers

LINES = 4
REPEATS = ["ha ha ha ha ha ha", "1 1 1 1 1 1", "- - - - - -", "no repeat here"]


@pytest.fixture
def model(tiny_model):
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model).eval()
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 2
    model.config.pad_token_id = 1
    model.generation_config.max_length = 32
    return model


@pytest.fixture(scope="module")
def lines(tiny_data):
    split = load_from_disk(str(tiny_data))["train"].select(range(LINES))
    return [image.convert("RGB") for image in split["image"]], list(split["text"])


def labels_of(tokenizer, texts) -> torch.Tensor:
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    labels = torch.full((len(rows), max(map(len, rows))), -100)
    for line, row in enumerate(rows):
        labels[line, : len(row)] = torch.tensor(row)
    return labels


@pytest.fixture
def batch(processor, lines):
    images, texts = lines
    return {"pixel_values": processor(images=images, return_tensors="pt").pixel_values,
            "labels": labels_of(processor.tokenizer, texts), "texts": texts}


def step(model, batch):
    return ["x"] * len(batch["labels"])


# One check per pitfall.


def test_one_check_per_pitfall_and_a_second_is_refused():
    assert sorted(CHECKS) == list(range(1, 15))
    names = [name for name, _ in CHECKS.values()]
    assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match="pitfall 3 has two checks"):
        pitfall(3, "another_padding_check")(lambda subject: None)


def test_no_finding_with_a_pitfall_outside_its_check():
    """Only the registered checks make pitfall findings; other modules make `not_checked`
    notes or findings that belong to no pitfall."""
    registered = {name for name, _ in CHECKS.values()}
    for path in (ROOT / "trocr_recipe").rglob("*.py"):
        for name in re.findall(r'Finding\(\s*"(\w+)"', path.read_text()):
            assert name not in registered and name in {"not_checked", "batch_not_read", "forward_loss"}, (path, name)


def test_the_docs_table_has_one_name_per_pitfall():
    doc = (ROOT / "docs" / "pitfalls.md").read_text()
    rows = re.findall(r"^\| \[(\d+)\]\(#pitfall-\d+\) \| [^|]+ \| `(\w+)` \|", doc, re.M)
    assert [(int(number), name) for number, name in rows] == [(number, name) for number, (name, _) in
                                                             sorted(CHECKS.items())]


# 14: settings that forbid a reading.


def impossible_by_transformers(processor_, rows, start) -> int:
    """Lines a logits processor of transformers forbids: some true next token scored -inf."""
    count = 0
    for row in rows:
        sequence = [start, *row]
        for position in range(1, len(sequence)):
            scores = processor_(torch.tensor([sequence[:position]]), torch.zeros(1, 300))
            if scores[0, sequence[position]] == float("-inf"):
                count += 1
                break
    return count


@pytest.mark.parametrize("setting, oracle", [
    ({"no_repeat_ngram_size": 3}, lambda eos: NoRepeatNGramLogitsProcessor(3)),
    ({"min_length": 14}, lambda eos: MinLengthLogitsProcessor(14, eos)),
    ({"suppress_tokens": None}, None),  # filled in below: a token of the first line
], ids=["no_repeat_ngram_size", "min_length", "suppress_tokens"])
def test_forbidding_settings_count_the_lines_transformers_forbids(model, processor, lines, setting, oracle):
    tokenizer, eos = processor.tokenizer, processor.tokenizer.eos_token_id
    labels = labels_of(tokenizer, REPEATS)
    rows = [[token for token in row if token != -100] for row in labels.tolist()]
    if "suppress_tokens" in setting:
        setting = {"suppress_tokens": [rows[3][1]]}
        oracle = lambda eos: SuppressTokensLogitsProcessor(setting["suppress_tokens"])  # noqa: E731
    key, value = next(iter(setting.items()))
    setattr(model.generation_config, key, value)
    expected = impossible_by_transformers(oracle(eos), rows, eos)
    assert expected > 0
    images = lines[0]
    report = check_loop(model, processor, {"pixel_values": processor(images=images, return_tensors="pt").pixel_values,
                                           "labels": labels}, texts=REPEATS, dataset_texts=REPEATS * 3)
    [finding] = [finding for finding in report if finding.name == "generation_forbids_lines"] or [format_findings(report)]
    assert finding.level == "error" and finding.pitfall == 14 and f"model.generation_config.{key}=" in finding.message
    assert f"{expected} of {LINES} lines of the batch and {3 * expected} of {3 * LINES} lines of the dataset" in (
        finding.evidence)


def test_the_notebook_settings_on_model_config(model, processor, batch):
    """The community notebook's config cell: generate() refuses it, the check names it and goes on."""
    for key, value in dict(max_length=64, early_stopping=True, no_repeat_ngram_size=3, length_penalty=2.0,
                           num_beams=4).items():
        setattr(model.config, key, value)
    report = check_loop(model, processor, batch, evaluate=step)
    names = {finding.name for finding in report}
    assert {"configs_disagree", "generation_forbids_lines"} <= names
    forbids = next(finding for finding in report if finding.name == "generation_forbids_lines")
    assert "model.config.no_repeat_ngram_size=3" in forbids.message
    disagree = next(finding for finding in report if finding.name == "configs_disagree")
    assert "generate() refused the model" in disagree.evidence and "'no_repeat_ngram_size': 3" in disagree.evidence
    assert "teacher_forced_eval" in names  # the evaluation still ran, with the settings as they were meant


def test_repetition_penalty_and_forced_first_token(model, processor, batch):
    model.generation_config.repetition_penalty = 1.2
    model.generation_config.forced_bos_token_id = 0
    finding = next(f for f in check_loop(model, processor, batch) if f.name == "generation_forbids_lines")
    assert "repetition_penalty=1.2" in finding.message and "forced_bos_token_id=0" in finding.message
    # </s> is the start token and the last label token: every line repeats it.
    assert f"{LINES} of {LINES} lines of the batch are scored down" in finding.evidence


def test_settings_that_forbid_nothing(model):
    model.generation_config.num_beams, model.generation_config.length_penalty = 4, 1.0
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.0, 0
    assert blockers(model.generation_config, 2) == {}


# A check never raises on a user's objects.


def _broken_setups(model, processor, batch):
    half = copy.deepcopy(model)
    yield "settings on model.config", model, processor, batch, {"evaluate": step}, "configs_disagree"
    no_start = copy.deepcopy(model)
    no_start.config.decoder_start_token_id = no_start.generation_config.decoder_start_token_id = None
    yield "no start token", no_start, processor, batch, {"evaluate": step}, "configs_disagree"
    no_pad = copy.deepcopy(model)
    no_pad.config.pad_token_id = None
    yield "no pad token", no_pad, processor, batch, {}, "configs_disagree"
    bare = copy.deepcopy(processor)
    bare.tokenizer.cls_token = bare.tokenizer.sep_token = None
    yield "tokenizer without cls and sep", model, bare, batch, {"evaluate": step}, "teacher_forced_eval"
    yield "batch as a tuple", model, processor, (batch["pixel_values"], batch["labels"]), {}, None
    yield "BatchEncoding", model, processor, BatchEncoding(batch), {"evaluate": step}, "teacher_forced_eval"
    ragged = [[token for token in row if token != -100] for row in batch["labels"].tolist()]
    yield "labels as lists", model, processor, {**batch, "labels": ragged}, {}, None
    yield "half-precision pixels", half, processor, {**batch, "pixel_values": batch["pixel_values"].half()}, \
        {"evaluate": step}, "teacher_forced_eval"
    yield "model on another device", copy.deepcopy(model).to("meta"), processor, batch, {"evaluate": step}, \
        "not_checked"

    def failing(model, batch):
        raise RuntimeError("CUDA out of memory")

    yield "an evaluate that raises", model, processor, batch, {"evaluate": failing}, "not_checked"
    yield "an empty batch", model, processor, {"pixel_values": batch["pixel_values"][:0],
                                               "labels": batch["labels"][:0]}, {}, "batch_not_read"
    yield "labels of length 0", model, processor, {**batch, "labels": batch["labels"][:, :0]}, {}, "batch_not_read"
    nan = batch["pixel_values"].clone()
    nan[0, 0, 0, 0] = float("nan")
    yield "NaN pixels", model, processor, {**batch, "pixel_values": nan}, {}, "pixel_preparation"
    huge = batch["labels"].clone()
    huge[0, 0], huge[1, 0] = 10**9, -5
    yield "label ids out of range", model, processor, {**batch, "labels": huge}, {}, "tokenizer_mismatch"
    yield "not a batch at all", model, processor, "batch.pt", {}, "batch_not_read"


def test_broken_setups_are_named_never_raised(model, processor, batch):
    for key, value in dict(max_length=64, no_repeat_ngram_size=3, num_beams=4).items():
        setattr(model.config, key, value)  # the first setup; the others get clean copies below
    clean = copy.deepcopy(model)
    for key in ("max_length", "no_repeat_ngram_size", "num_beams"):
        delattr(clean.config, key)
    for number, (what, subject_model, subject_processor, subject_batch, options, expected) in enumerate(
            _broken_setups(clean, processor, batch)):
        subject_model = model if number == 0 else subject_model
        report = check_loop(subject_model, subject_processor, subject_batch, **options)
        names = [finding.name for finding in report]
        assert all(str(finding) for finding in report), what
        if expected:
            assert expected in names, f"{what}: {format_findings(report)}"
        else:
            assert "batch_not_read" not in names and len(report.checked) >= 2, f"{what}: {format_findings(report)}"


def test_a_check_that_raises_becomes_a_note(model, processor):
    class Exploding:
        pad_token_id = eos_token_id = bos_token_id = 1

        def __len__(self):
            raise RuntimeError("a tokenizer of one's own")

    findings = run_checks(Subject(model, Exploding(), rows=[[5, 1]]), numbers=[6])
    assert [(finding.name, finding.pitfall) for finding in findings] == [("not_checked", 6)]
    assert "RuntimeError: a tokenizer of one's own" in findings[0].evidence


class LineReader(torch.nn.Module):
    """A Lightning-style module, as such modules are written: the model and processor inside,
    training_step / validation_step, and the check from the hook that runs before training."""

    def __init__(self, model, processor, loader):
        super().__init__()
        self.model, self.processor, self.train_loader = model, processor, loader
        self.report = None

    def training_step(self, batch, batch_idx):
        return self.model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    def predict_texts(self, batch):
        ids = self.model.generate(pixel_values=batch["pixel_values"])
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def on_train_start(self):
        batch = next(iter(self.train_loader))
        self.report = check_loop(self.model, self.processor, batch, texts=batch["texts"],
                                 evaluate=lambda model, batch: self.predict_texts(batch))


def test_a_lightning_style_module_checks_itself(model, processor, batch):
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 0  # cls, as tutorials do
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    module = LineReader(model, processor, loader)
    module.on_train_start()
    assert "decoder_start_bos" in [finding.name for finding in module.report]
    assert "evaluation" in module.report.checked[-1]


def test_the_cost_experiment_runs_on_the_tiny_model(tiny_model, tiny_data, processor, tmp_path):
    import random
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    import forbidden_settings

    rows = forbidden_settings.main(["--model", str(tiny_model), "--dataset", str(tiny_data), "--repeats", "4",
                                    "--output", str(tmp_path / "out.json")])
    by_name = {row["settings"]: row for row in rows}
    assert by_name["the model's own (the recipe's)"]["repeats_forbidden"] == 0
    texts = forbidden_settings.repeat_texts(4, random.Random(0))  # the lines it rendered
    rows_of = [ids + [2] for ids in processor.tokenizer(texts, add_special_tokens=False).input_ids]
    expected = impossible_by_transformers(NoRepeatNGramLogitsProcessor(3), rows_of, 2)
    assert by_name["no_repeat_ngram_size=3"]["repeats_forbidden"] == expected > 0
    assert all(row["test_lines"] > 0 and row["test_cer"] >= 0 for row in rows)


def test_the_tiny_tokenizer_names_its_special_tokens_as_the_checkpoints_do(processor):
    """Community code reads cls_token_id / sep_token_id: <s> and </s> on the TrOCR checkpoints."""
    tokenizer = processor.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert tokenizer.mask_token_id == len(tokenizer) - 1 and tokenizer.mask_token == "<mask>"
    assert tokenizer("a b").input_ids[0] == 0 and tokenizer("a b").input_ids[-1] == 2  # RoBERTa's <s> text </s>
