import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch.utils.data import DataLoader

from trocr_recipe.augment import AUGMENTATIONS, augment, resize_to_tensor, to_gray_or_rgb, to_rgb
from trocr_recipe.data import OcrCollator, encode_labels, normalize_on_device


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
    if mode in ("LA", "La", "RGBA"):
        converted = image.convert("LA" if mode == "La" else mode)
        converted.putalpha(Image.fromarray(np.where(np.asarray(image) < 128, 255, 0).astype(np.uint8)))
        return converted.convert(mode)
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "RGB", "RGBA", "I;16", "CMYK"])
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


def _colour_line() -> Image.Image:
    rgb = np.asarray(_line("RGB")).copy()
    rgb[..., 0] = 255 - rgb[..., 0] // 2  # red ink: channels differ
    return Image.fromarray(rgb)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "RGB", "RGBA", "I;16", "CMYK"])
def test_grayscale_lines_stay_one_channel_colour_stays_rgb(mode):
    image = _line(mode)
    gray = to_gray_or_rgb(image)
    assert gray.mode == "L"  # every one of these lines is gray, RGB ones included
    assert np.array_equal(np.asarray(gray.convert("RGB")), np.asarray(to_rgb(image)))
    assert to_gray_or_rgb(_colour_line()).mode == "RGB"


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_one_channel_path_gives_the_batch_of_the_rgb_path(name):
    """A gray line augmented and resized as "L" and spread over three channels by the
    collator gives, bit for bit, the batch of its RGB copy: every step works per channel."""
    collator = OcrCollator(image_mean=[0.5, 0.4, 0.3], image_std=[0.5, 0.6, 0.7])
    line, size = _line("L"), (32, 96)
    rgb = resize_to_tensor(AUGMENTATIONS[name](to_rgb(line), random.Random(3), size), size)
    gray = resize_to_tensor(AUGMENTATIONS[name](to_gray_or_rgb(line), random.Random(3), size), size)
    assert gray.shape == (1, 32, 96) and rgb.shape == (3, 32, 96)
    colour = resize_to_tensor(_colour_line().resize((96, 32)), size)
    mixed = collator([{"pixel_values": gray, "labels": [1]}, {"pixel_values": colour, "labels": [1]}])
    expected = collator([{"pixel_values": rgb, "labels": [1]}, {"pixel_values": colour, "labels": [1]}])
    assert torch.equal(mixed["pixel_values"], expected["pixel_values"])
    # The image processor's arithmetic, in float32, unchanged.
    reference = (rgb.float() * (1 / 255) - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.5, 0.6, 0.7]).view(3, 1, 1)
    assert torch.equal(expected["pixel_values"][0], reference)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_dilate_and_erode_are_pil_max_and_min_filters(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)).convert(mode)
    for name, pil_filter in (("dilate", ImageFilter.MaxFilter(3)), ("erode", ImageFilter.MinFilter(3))):
        out = AUGMENTATIONS[name](image, random.Random(0), (8, 8))
        assert out.mode == mode and np.array_equal(np.asarray(out), np.asarray(image.filter(pil_filter)))


class _Lines(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index], "labels": [5, 2]}


def test_worker_batches_cross_as_uint8_and_the_encoder_normalizes_them(tiny_model, processor):
    """From a dataloader worker the batch stays uint8 (one channel for gray lines); the hook
    on the model's encoder normalizes it as the collator does in the main process."""
    from transformers import VisionEncoderDecoderModel

    from trocr_recipe.modeling import set_special_tokens

    size = (processor.image_processor.size["height"], processor.image_processor.size["width"])
    images = [resize_to_tensor(to_gray_or_rgb(_line("L")), size) for _ in range(2)]
    collator = OcrCollator.from_image_processor(processor.image_processor)
    in_main = collator([{"pixel_values": image, "labels": [5, 2]} for image in images])
    from_worker = next(iter(DataLoader(_Lines(images), batch_size=2, collate_fn=collator, num_workers=1)))
    assert from_worker["pixel_values"].dtype == torch.uint8 and from_worker["pixel_values"].shape[1] == 1
    assert torch.equal(collator.normalize(from_worker["pixel_values"]), in_main["pixel_values"])
    assert torch.equal(from_worker["labels"], in_main["labels"])

    model = VisionEncoderDecoderModel.from_pretrained(tiny_model).eval()
    set_special_tokens(model, processor.tokenizer)
    normalize_on_device(model, collator)
    with torch.no_grad():
        expected = model(**in_main).logits
        assert torch.equal(model(**from_worker).logits, expected)
        assert torch.equal(model.encoder(from_worker["pixel_values"]).last_hidden_state,
                           model.encoder(in_main["pixel_values"]).last_hidden_state)
