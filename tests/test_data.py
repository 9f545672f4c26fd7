import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from trocr_recipe.augment import AUGMENTATIONS, augment, resize_to_tensor, to_rgb
from trocr_recipe.data import OcrCollator, encode_labels


def test_labels_are_text_then_eos_without_bos(processor):
    tokenizer = processor.tokenizer
    texts = ["Become a success with a disc and hey presto !", "You 're a star ... ."]
    labels, truncated = encode_labels(tokenizer, texts, max_target_length=256)
    assert truncated == [False, False]
    for text, ids in zip(texts, labels):
        assert ids[0] != tokenizer.bos_token_id
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        # Decoding the label gives back the text exactly: the first character is not lost.
        assert tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
    # The tokenizer itself would have added <s>: the recipe is what removes it.
    assert tokenizer(texts[0])["input_ids"][0] == tokenizer.bos_token_id


def test_truncation_is_counted_and_keeps_eos(processor):
    tokenizer = processor.tokenizer
    labels, truncated = encode_labels(tokenizer, ["a b c d e f g h i j k l", "a"], max_target_length=5)
    assert truncated == [True, False]
    assert len(labels[0]) == 5 and labels[0][-1] == tokenizer.eos_token_id


def test_collator_pads_labels_with_minus_100_and_normalizes():
    collator = OcrCollator(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    white = torch.full((3, 4, 6), 255, dtype=torch.uint8)
    black = torch.zeros((3, 4, 6), dtype=torch.uint8)
    batch = collator([{"pixel_values": white, "labels": [5, 6, 2]}, {"pixel_values": black, "labels": [7, 2]}])
    assert batch["labels"].tolist() == [[5, 6, 2], [7, 2, -100]]
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.allclose(batch["pixel_values"][0], torch.ones(3, 4, 6))
    assert torch.allclose(batch["pixel_values"][1], -torch.ones(3, 4, 6))


def _line(mode: str) -> Image.Image:
    image = Image.new("L", (60, 20), 255)
    # Strokes thicker than the 3x3 filters, as handwriting at IAM's resolution.
    ImageDraw.Draw(image).text((2, 1), "ink", fill=0, font=ImageFont.load_default(14), stroke_width=1)
    if mode == "I;16":
        sixteen = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
        assert sixteen.mode == "I;16"
        return sixteen
    if mode in ("LA", "RGBA"):
        converted = image.convert(mode)
        converted.putalpha(Image.fromarray(np.where(np.asarray(image) < 128, 255, 0).astype(np.uint8)))
        return converted
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"])
def test_every_mode_becomes_rgb_with_white_page_and_dark_ink(mode):
    rgb = np.asarray(to_rgb(_line(mode)))
    assert rgb.shape == (20, 60, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 255, 255]  # page (or transparency) is white
    assert rgb.min() < 60  # ink stays dark


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_every_augmentation_returns_a_valid_rgb_image(name):
    image = to_rgb(_line("L"))
    out = AUGMENTATIONS[name](image, random.Random(0), (32, 96))
    assert out.mode == "RGB" and out.width > 0 and out.height > 0
    tensor = resize_to_tensor(out, (32, 96))
    assert tensor.shape == (3, 32, 96) and tensor.dtype == torch.uint8
    assert tensor.min() < 128 < tensor.max()  # still shows ink on a page


def test_augment_picks_each_branch_with_equal_probability(monkeypatch):
    picked = []
    for name, function in list(AUGMENTATIONS.items()):
        monkeypatch.setitem(AUGMENTATIONS, name, lambda image, rng, size, name=name: picked.append(name) or image)
    rng = random.Random(1)
    for _ in range(7000):
        augment(Image.new("RGB", (8, 8)), (8, 8), rng)
    counts = {name: picked.count(name) for name in AUGMENTATIONS}
    assert all(850 < count < 1150 for count in counts.values()), counts


def test_underline_draws_under_the_lowest_ink():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((10, 5, 20, 12), fill=(0, 0, 0))
    out = np.asarray(AUGMENTATIONS["underline"](image, random.Random(0), (20, 40)))
    assert (out[10:13, 10:21] == 0).all()
    assert (out[13:, :] == 255).all() and (out[:, 21:] == 255).all()
