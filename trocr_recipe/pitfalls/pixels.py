"""Pitfall 7: images prepared otherwise than the checkpoint's image processor prepares them
(shape, rescale and mean/std, resampling)."""

import torch
from PIL import Image

from .core import Part, Subject, merge, pitfall

# Pixel preparations a batch may look like: (description, value of white before mean/std, mean, std).
PREPARATIONS = (
    ("pixels in [0, 1] (no normalization, e.g. ToTensor() alone)", 1.0, (0.0,) * 3, (1.0,) * 3),
    ("pixels in [0, 255] (neither rescaled nor normalized)", 255.0, (0.0,) * 3, (1.0,) * 3),
    ("ImageNet mean and std", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("mean 0.5, std 0.5 (values in [-1, 1])", 1.0, (0.5,) * 3, (0.5,) * 3),
)
RANGE_SLACK = 0.1  # page intensities may overshoot [0, 1] this much (float bicubic resizing)
FIX = ("pixel_values = processor(images=[image.convert('RGB') for image in images], return_tensors='pt')"
       ".pixel_values, or the same size, resample, rescale, mean and std as processor.image_processor")


def encoder_input(model) -> tuple[int, tuple[int, int]]:
    encoder = model.config.encoder
    size = encoder.image_size
    return getattr(encoder, "num_channels", 3), tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def processor_size(image_processor) -> tuple[int, int]:
    size = image_processor.size
    return (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2


def _shape_parts(subject: Subject) -> list[Part]:
    channels, size = encoder_input(subject.model)
    parts = []
    if subject.image_processor is not None and processor_size(subject.image_processor) != size:
        used = processor_size(subject.image_processor)
        parts.append(Part(
            "error", f"The image processor resizes to {used[0]}x{used[1]}; the encoder was built for "
            f"{size[0]}x{size[1]}.", f"processor.image_processor.size={dict(subject.image_processor.size)}; "
            f"model.config.encoder.image_size={list(size)}",
            "The position embeddings do not fit the patch grid: the forward fails or sees a geometry it never saw.",
            "use the checkpoint's own image processor size (384x384 for the Hub checkpoints)",
        ))
    pixels = subject.pixel_values
    if pixels is not None and tuple(pixels.shape[1:]) != (channels, *size):
        parts.append(Part(
            "error", f"pixel_values are {'x'.join(map(str, pixels.shape[1:]))} images; the encoder takes "
            f"{channels}x{size[0]}x{size[1]}.", f"pixel_values.shape={tuple(pixels.shape)}; model.config.encoder: "
            f"num_channels={channels}, image_size={list(size)}",
            "The forward fails, or interpolated position embeddings see a geometry the encoder was never trained on.",
            FIX,
        ))
    return parts


def preparation(image_processor) -> tuple[float, tuple, tuple]:
    """The image processor's (value of white, mean, std), as PREPARATIONS states them."""
    white = image_processor.rescale_factor * 255 if image_processor.do_rescale else 255.0
    if not image_processor.do_normalize:
        return white, (0.0,) * 3, (1.0,) * 3
    return white, tuple(image_processor.image_mean), tuple(image_processor.image_std)


def page_range(pixel_values: torch.Tensor, white: float, mean, std) -> tuple[list[float], list[float]]:
    """Per channel, the darkest and lightest page intensity (0 black, 1 white) that pixel
    values prepared with (white, mean, std) stand for: (x * std + mean) / white."""
    channels = pixel_values.shape[1]
    mean = torch.tensor((list(mean) * channels)[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor((list(std) * channels)[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    page = ((pixel_values.detach().float().cpu() * std + mean) / white).transpose(0, 1).flatten(1)
    return page.min(1).values.tolist(), page.max(1).values.tolist()


def fits(page: tuple[list[float], list[float]]) -> bool:
    """Page intensities within [0, 1] that reach both the dark ink and the light page, in every channel."""
    lows, highs = page
    return all(-RANGE_SLACK <= low <= 0.45 for low in lows) and all(0.55 <= high <= 1 + RANGE_SLACK for high in highs)


def _value_parts(subject: Subject) -> list[Part]:
    pixels, image_processor = subject.pixel_values, subject.image_processor
    if pixels is None or image_processor is None or pixels.numel() == 0:
        return []
    if not torch.isfinite(pixels.detach().float()).all():
        bad = int((~torch.isfinite(pixels.detach().float())).sum())
        return [Part("error", f"{bad} pixel values are NaN or infinite.", f"pixel_values.shape={tuple(pixels.shape)}",
                     "Every loss and gradient of the batch becomes NaN: training stops learning at once.", FIX)]
    if subject.source_images is not None:
        return _exact_parts(subject)
    white, mean, std = preparation(image_processor)
    page = page_range(pixels, white, mean, std)
    if fits(page):
        return []
    looks = [name for name, *prepared in PREPARATIONS if fits(page_range(pixels, *prepared))]
    low, high = min(page[0]), max(page[1])
    return [Part(
        "error" if looks or low < -RANGE_SLACK or high > 1 + RANGE_SLACK else "warning",
        "pixel_values are not prepared as processor.image_processor prepares them.",
        f"observed min {float(pixels.min()):.3f}, max {float(pixels.max()):.3f}, mean {float(pixels.float().mean()):.3f}; "
        f"the processor gives [{-mean[0] / std[0]:.2f}, {(white - mean[0]) / std[0]:.2f}] (rescale "
        f"{image_processor.rescale_factor:.5g}, mean {list(mean)}, std {list(std)}), so these values stand for page "
        f"intensities [{low:.2f}, {high:.2f}] instead of dark ink to light page within [0, 1]"
        + (f"; they look like {' or '.join(looks)}" if looks else ""),
        "The encoder sees inputs shifted and scaled away from what it was pretrained on: fine-tuning spends its "
        "steps adapting.", FIX,
    )]


def _exact_parts(subject: Subject) -> list[Part]:
    """The recipe's collator on known uint8 images against the image processor on the same images."""
    image_processor = subject.image_processor
    expected = image_processor(images=list(subject.source_images), do_resize=False, return_tensors="pt").pixel_values
    if torch.allclose(subject.pixel_values.float().cpu(), expected, atol=1e-4):
        return []
    stats = {name: getattr(image_processor, name) for name in ("image_mean", "image_std", "rescale_factor")}
    return [Part(
        "error", "The collator's pixel values differ from the image processor's for the same uint8 image.",
        f"collator gives [{float(subject.pixel_values.min()):.3f}, {float(subject.pixel_values.max()):.3f}], the "
        f"image processor [{float(expected.min()):.3f}, {float(expected.max()):.3f}] ({stats})",
        "The encoder sees inputs shifted from what it was pretrained on (e.g. ImageNet mean/std instead of 0.5/0.5).",
        "build the collator with data.OcrCollator.from_image_processor(processor.image_processor)",
    )]


def _processor_parts(subject: Subject) -> list[Part]:
    image_processor, parts = subject.image_processor, []
    if image_processor is None:
        return parts
    if subject.saved_processor and image_processor.resample != Image.Resampling.BICUBIC:
        parts.append(Part(
            "warning", f"The image processor resamples with {Image.Resampling(image_processor.resample).name}, but "
            "training resizes bicubic as the paper did.", f"processor.image_processor.resample={image_processor.resample}",
            "Whoever decodes with the saved processor feeds the model images resized otherwise than in training.",
            "processor.image_processor.resample = PIL.Image.BICUBIC (3)",
        ))
    own = subject.checkpoint_image_processor
    if own is not None:
        keys = ("size", "resample", "image_mean", "image_std", "rescale_factor")
        settings = lambda p: {key: (processor_size(p) if key == "size" else getattr(p, key)) for key in keys}  # noqa
        used, expected = settings(image_processor), settings(own)
        differences = [f"{key} {used[key]} (checkpoint: {expected[key]})" for key in keys if used[key] != expected[key]]
        if differences:
            parts.append(Part(
                "warning", f"The image processor from {subject.processor_source} differs from the checkpoint's.",
                "; ".join(differences), "The encoder sees inputs prepared otherwise than in pretraining.",
                "leave processor_name_or_path unset, or match those settings",
            ))
    return parts


@pitfall(7, "pixel_preparation")
def check_pixels(subject: Subject):
    """Shape, values and resampling as the checkpoint's image processor has them."""
    shape = _shape_parts(subject)
    values = [] if any("pixel_values are" in part.message for part in shape) else _value_parts(subject)
    return merge(check_pixels, shape + values + _processor_parts(subject))
