"""The demo model's CTC pretraining of the encoder (data_scripts/pretrain_encoder.py)."""

import math

import torch
from datasets import load_from_disk
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

import make_tiny_model
from pretrain_encoder import BLANK, ctc_targets, greedy_decode


def test_targets_and_best_path_decoding():
    alphabet, targets = ctc_targets(["ab", "ba a"])
    assert alphabet == [" ", "a", "b"]
    assert targets[1].tolist() == [3, 2, 1, 2] and BLANK not in targets[1].tolist()
    # Best path a a - a b b -: repeats merge, a blank separates a doubled letter.
    path = [2, 2, BLANK, 2, 3, 3, BLANK]
    log_probs = torch.nn.functional.one_hot(torch.tensor([path]), len(alphabet) + 1).float().log()
    assert greedy_decode(log_probs, alphabet) == ["aab"]


def test_pretraining_changes_only_the_encoder_and_the_model_still_loads(tiny_data, tmp_path):
    output = tmp_path / "model"
    make_tiny_model.main([
        "--dataset", str(tiny_data), "--output_dir", str(output), "--preset", "tiny", "--pretrain_steps", "3",
    ])
    make_tiny_model.main(["--dataset", str(tiny_data), "--output_dir", str(tmp_path / "fresh"), "--preset", "tiny"])
    pretrained = VisionEncoderDecoderModel.from_pretrained(output)
    fresh = VisionEncoderDecoderModel.from_pretrained(tmp_path / "fresh")
    # Same seed, same initial weights: only what CTC trained differs.
    encoder_moved = [
        name for name, weight in pretrained.encoder.state_dict().items()
        if not torch.equal(weight, fresh.encoder.state_dict()[name])
    ]
    assert "embeddings.patch_embeddings.projection.weight" in encoder_moved
    assert all(torch.equal(w, fresh.decoder.state_dict()[n]) for n, w in pretrained.decoder.state_dict().items())
    processor = TrOCRProcessor.from_pretrained(output)
    image = load_from_disk(str(tiny_data))["test"][0]["image"].convert("RGB")
    generated = pretrained.generate(processor(images=image, return_tensors="pt").pixel_values, max_new_tokens=5)
    assert generated.shape[0] == 1 and not math.isnan(generated.float().sum().item())


def test_resized_lines_are_the_processors_pixel_values_at_a_fraction_of_the_memory(tiny_data):
    from pretrain_encoder import ResizedLines, line_pixels

    train = load_from_disk(str(tiny_data))["train"]
    image_processor = make_tiny_model.ViTImageProcessor(size={"height": 32, "width": 128}, resample=3,
                                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    lines = ResizedLines(train, "image", image_processor)
    assert lines.lines.dtype == torch.uint8 and lines.lines.shape == (len(train), 1, 32, 128)  # gray: one channel
    rows = [3, 0, 5, 7, 7, 1]
    by_processor = line_pixels(train, "image", image_processor, rows)
    assert lines[rows].shape == by_processor.shape == (6, 3, 32, 128)
    assert torch.allclose(lines[rows], by_processor, atol=1e-5)
