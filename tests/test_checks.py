"""Preflight checks: a clean tiny run passes them all; each planted pitfall (docs/pitfalls.md) makes
its own check fire with a message naming the key fact."""

import math
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from trocr_recipe.args import parse_recipe
from trocr_recipe.checks import Finding, preflight, preflight_forward, raise_on_errors, run_checks
from trocr_recipe.data import OcrCollator
from trocr_recipe.pipeline import prepare_run

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


@dataclass
class Setup:
    run: object
    model_args: object
    data_args: object
    training_args: object

    def findings(self, **options) -> list[Finding]:
        return run_checks(self.run, self.model_args, self.data_args, self.training_args, **options)


def make_setup(argv) -> Setup:
    model_args, data_args, training_args = parse_recipe(argv)
    return Setup(prepare_run(model_args, data_args, training_args), model_args, data_args, training_args)


@pytest.fixture
def setup(tiny_args) -> Setup:
    return make_setup(tiny_args)


def only(findings: list[Finding], name: str, level: str = "error") -> Finding:
    """The planted pitfall fires its own check, once."""
    assert [finding.name for finding in findings if finding.name == name] == [name], findings
    finding = next(finding for finding in findings if finding.name == name)
    assert finding.level == level
    return finding


def with_labels(setup: Setup, change) -> None:
    """Replaces the training labels (the image transform is not needed by the checks)."""
    train = setup.run.inputs["train"].with_format(None)
    setup.run.inputs["train"] = train.map(lambda ids: {"labels": change(ids)}, input_columns="labels")


def test_clean_setup_passes_every_check(setup):
    assert setup.findings() == []
    assert preflight(setup.run, setup.model_args, setup.data_args, setup.training_args, strict=True) == []
    loss = preflight_forward(setup.run.model, setup.run.collator, setup.run.inputs["train"], batch_size=4)
    assert math.isfinite(loss) and loss > 0


@pytest.mark.parametrize("where", ["config", "generation_config"])
def test_decoder_start_not_eos(setup, where):
    getattr(setup.run.model, where).decoder_start_token_id = 0
    findings = setup.findings()
    finding = only(findings, "decoder_start_bos")
    assert f"model.{where}.decoder_start_token_id=0" in finding.evidence and "</s> is 2" in finding.evidence
    # Only one of the two configs is wrong: they disagree too (pitfall 5).
    assert "decoder_start_token_id: " in only(findings, "configs_disagree").evidence


def test_eos_and_pad_disagreeing_between_configs(setup):
    setup.run.model.generation_config.pad_token_id = 0
    finding = only(setup.findings(), "configs_disagree")
    assert "model.generation_config=0 (the tokenizer's is 1)" in finding.evidence


def test_bos_at_the_front_of_labels(setup):
    with_labels(setup, lambda ids: [0] + ids)
    findings = setup.findings()
    assert "<s> (id 0)" in only(findings, "bos_in_labels").message
    assert {"references_not_texts", "labels_cut"}.isdisjoint(finding.name for finding in findings)


def test_first_id_cut_and_no_eos(setup):
    """Pitfall 12: `ids[1:]` of a tokenizer output without <s> and </s>."""
    with_labels(setup, lambda ids: ids[1:-1])
    finding = only(setup.findings(), "labels_cut")
    assert "do not end with </s>" in finding.message and "without its first piece" in finding.message
    text = setup.run.references["train"][0]
    assert f"text {text!r}, label decodes to " in finding.evidence and "never learns to stop" in finding.effect


def test_label_padding_with_pad_id(setup):
    class PadIdCollator(OcrCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            batch["labels"][batch["labels"] == -100] = 1
            return batch

    setup.run.collator = PadIdCollator.from_image_processor(setup.run.processor.image_processor)
    finding = only(setup.findings(), "pad_not_ignored")
    assert "hold the pad id (1) instead of -100" in finding.message


def test_generation_max_length_too_short(setup):
    setup.run.model.generation_config.max_length = 5
    setup.training_args.generation_max_length = 5
    finding = only(setup.findings(), "generation_too_short")
    assert "training_args: max_length=5" in finding.evidence and "room for 4 tokens" in finding.message
    assert "generation_max_length" in finding.fix


def test_tokenizer_of_another_checkpoint(tiny_args, tiny_data, processor, tmp_path):
    from datasets import load_from_disk
    from make_tiny_model import train_tokenizer
    from transformers import TrOCRProcessor

    other = train_tokenizer(load_from_disk(str(tiny_data))["train"]["text"], vocab_size=200)
    TrOCRProcessor(image_processor=processor.image_processor, tokenizer=other).save_pretrained(tmp_path / "other")
    findings = make_setup(tiny_args + ["--processor_name_or_path", str(tmp_path / "other")]).findings()
    finding = only(findings, "tokenizer_mismatch")
    assert f"The tokenizer has {len(other)} ids, the decoder's embedding table 300" in finding.message
    assert f"{len(other)} ids against {len(processor.tokenizer)}" in finding.evidence


def test_tokenizer_larger_than_embedding_table(setup):
    setup.run.processor.tokenizer.add_tokens(["<extra>"])
    assert "301 ids, the decoder's embedding table 300" in only(setup.findings(), "tokenizer_mismatch").message


def test_tokenizer_that_does_not_round_trip(setup):
    from tokenizers import normalizers

    setup.run.processor.tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # an uncased tokenizer
    finding = only(setup.findings(), "tokenizer_mismatch")
    text = setup.run.references["train"][0]
    assert f"{text!r} -> {text.lower()!r}" in finding.evidence and "does not give back" in finding.message


def test_imagenet_normalization_in_the_collator(setup):
    setup.run.collator = OcrCollator(**IMAGENET)
    finding = only(setup.findings(), "pixel_preparation")
    assert "differ from the image processor's" in finding.message and "0.5/0.5" in finding.effect


def test_bilinear_resample_and_strict_mode(setup):
    setup.run.processor.image_processor.resample = Image.BILINEAR
    findings = setup.findings()
    assert "BILINEAR" in only(findings, "pixel_preparation", "warning").message
    raise_on_errors(findings)  # a warning alone lets the run go on
    with pytest.raises(SystemExit, match="(?s)pixel_preparation.*preflight_strict"):
        raise_on_errors(findings, strict=True)


def test_processor_from_another_source_with_other_image_settings(tiny_args, processor, tmp_path):
    other = type(processor.image_processor)(**{**processor.image_processor.to_dict(), **IMAGENET, "resample": 2})
    processor.__class__(image_processor=other, tokenizer=processor.tokenizer).save_pretrained(tmp_path / "other")
    other_setup = make_setup(tiny_args + ["--processor_name_or_path", str(tmp_path / "other")])
    findings = other_setup.findings()
    finding = only(findings, "pixel_preparation", "warning")
    assert "image_mean (0.485, 0.456, 0.406)" in finding.evidence and "differs from the checkpoint's" in finding.message
    # The recipe resizes bicubic whatever a processor config says, and saves it so.
    assert other_setup.run.processor.image_processor.resample == 3
    # The collator follows the processor actually used, so it normalizes consistently.
    assert [finding.name for finding in findings] == ["pixel_preparation"]


def test_encoder_image_size_differs_from_processor(setup):
    setup.run.processor.image_processor.size = {"height": 64, "width": 128}
    assert "the encoder was built for 32x128" in only(setup.findings(), "pixel_preparation").message


def test_large_learning_rate_on_a_fine_tuned_checkpoint(setup):
    setup.training_args.learning_rate = 1e-3
    assert setup.findings() == []  # the tiny model is not a fine-tuned checkpoint
    assert "already fine-tuned" in only(setup.findings(fine_tuned=True), "learning_rate_high", "warning").message
    setup.model_args.model_name_or_path = "microsoft/trocr-small-handwritten"
    finding = only(setup.findings(), "learning_rate_high", "warning")
    assert finding.pitfall == 9 and "microsoft/trocr-small-handwritten" in finding.message


def test_every_error_is_listed_when_the_run_stops(setup):
    setup.run.model.config.decoder_start_token_id = 0
    setup.run.collator = OcrCollator(**IMAGENET)
    with pytest.raises(SystemExit) as stopped:
        preflight(setup.run, setup.model_args, setup.data_args, setup.training_args)
    assert "decoder_start_bos" in str(stopped.value) and "pixel_preparation" in str(stopped.value)


def test_non_finite_forward_loss_stops_the_run(setup):
    with torch.no_grad():
        setup.run.model.decoder.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(SystemExit, match="not finite"):
        preflight_forward(setup.run.model, setup.run.collator, setup.run.inputs["train"], batch_size=2)
