"""check_trainer on Seq2SeqTrainer scripts written elsewhere: examples/trainer_notebook/train.py
(the community notebook's style) run from a folder outside the repository, broken and fixed,
and in-process trainers whose evaluation or metric is wrong in one way each."""

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from torch.utils.data import Dataset
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, VisionEncoderDecoderModel, default_data_collator

from conftest import ROOT
from test_examples import findings, run
from trocr_recipe.metrics import corpus_cer, decode
from trocr_recipe.trainercheck import check_trainer, dataset_texts

NOTEBOOK = ROOT / "examples" / "trainer_notebook" / "train.py"


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    return tmp_path_factory.mktemp("user")


def run_notebook(outside, tiny_data, tiny_model, *argv):
    return run(outside, NOTEBOOK, "--model", tiny_model, "--data", tiny_data, "--output_dir", outside / "run", *argv)


def test_the_notebook_as_first_written(outside, tiny_data, tiny_model):
    result = run_notebook(outside, tiny_data, tiny_model, "--mistakes", "all", "--check")
    found = findings(result.output)
    assert result.returncode == 1 and "Traceback" not in result.output, result.output
    for name in ("decoder_start_bos", "bos_in_labels", "configs_disagree", "generation_forbids_lines"):
        assert found[name][0] == "error", result.output
    assert "model.config.no_repeat_ngram_size=3" in found["generation_forbids_lines"][1]
    assert "lines of the batch and " in found["generation_forbids_lines"][1]  # counted, also over the training set
    assert "decoder_start_token_id=0" in found["decoder_start_bos"][1]


def test_the_fixed_notebook_has_no_error(outside, tiny_data, tiny_model):
    result = run_notebook(outside, tiny_data, tiny_model, "--check")
    assert result.returncode == 0 and "[error]" not in result.output, result.output
    assert "then your compute_metrics" in result.output or "compute_metrics: yours" in result.output


def test_references_rebuilt_from_truncated_labels(outside, tiny_data, tiny_model):
    result = run_notebook(outside, tiny_data, tiny_model, "--mistakes", "label_references", "--max_target_length", "6",
                          "--check")
    found = findings(result.output)
    assert result.returncode == 1, result.output
    level, block = found["references_not_texts"]
    assert level == "error" and "the references are the label ids decoded back" in block
    assert "do not decode back to their text" in block


# In-process trainers, each wrong in one way.


class Lines(Dataset):
    """A community-style Dataset: the processor per image, labels padded with -100."""

    def __init__(self, split, processor):
        self.split, self.processor = split, processor
        self.texts = list(split["text"])

    def __len__(self):
        return len(self.split)

    def __getitem__(self, idx):
        tokenizer = self.processor.tokenizer
        ids = tokenizer(self.texts[idx], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        labels = ids + [-100] * (40 - len(ids))
        pixels = self.processor(self.split[idx]["image"].convert("RGB"), return_tensors="pt").pixel_values[0]
        return {"pixel_values": pixels, "labels": torch.tensor(labels)}


def trainer_with(tiny_model, tiny_data, processor, tmp_path, compute_metrics, **arguments):
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 2
    model.config.pad_token_id = 1
    model.generation_config.max_length, model.generation_config.num_beams = 40, 2
    data = load_from_disk(str(tiny_data))
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[],
                                    use_cpu=True, **{"predict_with_generate": True, **arguments})
    return Seq2SeqTrainer(model=model, args=args, train_dataset=Lines(data["train"], processor),
                          eval_dataset=Lines(data["validation"], processor), data_collator=default_data_collator,
                          processing_class=processor, compute_metrics=compute_metrics)


def names(report) -> dict:
    return {finding.name: finding for finding in report}


def test_teacher_forced_evaluation(tiny_model, tiny_data, processor, tmp_path):
    trainer = trainer_with(tiny_model, tiny_data, processor, tmp_path, None, predict_with_generate=False)
    finding = names(check_trainer(trainer))["teacher_forced_eval"]
    assert finding.level == "error" and "argmax" in finding.evidence


def test_per_line_mean_metric(tiny_model, tiny_data, processor, tmp_path):
    texts = dataset_texts(load_from_disk(str(tiny_data))["validation"])

    def per_line(prediction):
        predicted = decode(processor.tokenizer, prediction.predictions)
        return {"cer": float(np.mean([corpus_cer([text], [line]) for text, line in zip(texts, predicted)]))}

    trainer = trainer_with(tiny_model, tiny_data, processor, tmp_path, per_line)
    report = check_trainer(trainer)
    finding = names(report)["per_line_cer"]
    assert finding.pitfall == 10 and "averages the CER per line" in finding.message


@pytest.mark.parametrize("their_metric, wrong", [
    (lambda texts, lines: corpus_cer([t.lower() for t in texts], [line.lower() for line in lines]), "lower-cased"),
    (lambda texts, lines: corpus_cer(["Hello", "World !"], lines), "label ids decoded back"),
], ids=["lowercased", "label_references"])
def test_the_metric_is_matched_to_what_it_scored(processor, their_metric, wrong):
    from trocr_recipe.pitfalls import Subject
    from trocr_recipe.pitfalls.evaluation import check_references
    from trocr_recipe.trainercheck import compare_metric

    tokenizer, texts, lines = processor.tokenizer, ["Hello there", "World !"], ["hello there", "world !"]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(row) for row in tokenizer(lines).input_ids], batch_first=True,
                                          padding_value=tokenizer.pad_token_id)
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(row) for row in tokenizer(["Hello", "World !"]).input_ids],
                                             batch_first=True, padding_value=-100)
    metrics = compare_metric(tokenizer, texts, ids, labels, "cer", their_metric(texts, lines) / 100)
    assert metrics["candidates"]["corpus"][0] == pytest.approx(corpus_cer(texts, lines))
    finding = check_references(Subject(None, tokenizer, metrics=metrics))
    assert finding.level == "error" and wrong in finding.message
    right = compare_metric(tokenizer, texts, ids, labels, "cer", corpus_cer(texts, lines))
    assert right["matches"] == "corpus" and check_references(Subject(None, tokenizer, metrics=right)) is None


def test_the_right_metric_and_settings_pass(tiny_model, tiny_data, processor, tmp_path):
    texts = dataset_texts(load_from_disk(str(tiny_data))["validation"])

    def right(prediction):
        predicted = decode(processor.tokenizer, prediction.predictions)
        return {"cer": corpus_cer(texts[: len(predicted)], predicted)}

    report = check_trainer(trainer_with(tiny_model, tiny_data, processor, tmp_path, right,
                                        generation_max_length=40, generation_num_beams=2))
    assert [finding.name for finding in report if finding.level == "error"] == [], report
    assert any("compute_metrics: yours" in line for line in report.checked)


def test_a_trainer_without_a_tokenizer(tiny_model, tiny_data, processor, tmp_path):
    trainer = trainer_with(tiny_model, tiny_data, processor, tmp_path, None)
    trainer.processing_class = processor.image_processor
    [finding] = check_trainer(trainer)
    assert finding.name == "not_checked" and finding.fix == "check_trainer(trainer, processor=processor)"
    assert "teacher_forced_eval" not in names(check_trainer(trainer, processor=processor))
