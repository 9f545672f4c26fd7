"""Image side of the data path: any PIL mode to RGB, the paper's seven-way augmentation,
bicubic resize, kept as uint8 until the collator normalizes on the batch."""

import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Every mode a user may have becomes RGB; transparency is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's own convert("L") clips 16-bit values instead of scaling them: a white
        # 16-bit page would come out all white or all black.
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8), "L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, WHITE)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def _rotate(image, rng, size):
    return image.rotate(rng.uniform(-10, 10), resample=Image.NEAREST, expand=True, fillcolor=WHITE)


def _gaussian_blur(image, rng, size):
    # torchvision's GaussianBlur(3): a 3x3 kernel with sigma drawn from [0.1, 2.0].
    sigma = rng.uniform(0.1, 2.0)
    g = [math.exp(-(x * x) / (2 * sigma * sigma)) for x in (-1, 0, 1)]
    weights = [a * b for a in g for b in g]
    return image.filter(ImageFilter.Kernel((3, 3), weights, scale=sum(weights)))


def _dilate(image, rng, size):
    return image.filter(ImageFilter.MaxFilter(3))


def _erode(image, rng, size):
    return image.filter(ImageFilter.MinFilter(3))


def _downscale(image, rng, size):
    # The reference resizes to a third of the model's input size with nearest; the final
    # bicubic resize brings it back up.
    height, width = size
    return image.resize((max(1, width // 3), max(1, height // 3)), Image.NEAREST)


def _underline(image, rng, size):
    ink = np.nonzero(np.asarray(image.convert("L")) < 50)
    if ink[0].size == 0:
        return image
    bottom, left, right = int(ink[0].max()), int(ink[1].min()), int(ink[1].max())
    image = image.copy()
    ImageDraw.Draw(image).rectangle((left, max(0, bottom - 2), right, bottom), fill=(0, 0, 0))
    return image


def _keep(image, rng, size):
    return image


AUGMENTATIONS = {
    "rotate": _rotate,
    "blur": _gaussian_blur,
    "dilate": _dilate,
    "erode": _erode,
    "downscale": _downscale,
    "underline": _underline,
    "original": _keep,
}


def augment(image: Image.Image, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Apply ONE of the seven augmentations, each with equal probability (as the paper)."""
    return AUGMENTATIONS[rng.choice(list(AUGMENTATIONS))](image, rng, size)


def resize_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize to (height, width), aspect ratio not kept; uint8 CHW tensor."""
    height, width = size
    image = image.resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
