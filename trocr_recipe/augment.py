"""Image side of the data path: any PIL mode to one 8-bit image, the paper's seven-way
augmentation, bicubic resize, kept as uint8 until the batch is normalized (by the
collator, or on the model's device for batches from dataloader workers: see data.py).

Grayscale lines (IAM's are) stay one channel ("L") through augmentation and resize, and
the collator spreads them over the model's three channels: every step works on each
channel alike, so the batch is the one of an RGB copy of the line, for a third of the work."""

import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _flatten(image: Image.Image) -> Image.Image:
    """To "L" for grayscale modes, "RGB" for the rest; transparency composited over white."""
    if image.mode in SIXTEEN_BIT:
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
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        # La (premultiplied) converts to LA only; PA and RGBa to RGBA.
        image = image.convert("LA" if image.mode in ("LA", "La") else "RGBA")
        background = Image.new(image.mode[:-1], image.size, 255 if image.mode == "LA" else (255, 255, 255))
        background.paste(image.convert(background.mode), mask=image.getchannel("A"))
        return background
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("L" if image.mode == "1" else "RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Every mode a user may have becomes RGB; transparency is composited over white."""
    image = _flatten(image)
    return image.convert("RGB") if image.mode == "L" else image


def to_gray_or_rgb(image: Image.Image) -> Image.Image:
    """As to_rgb, but a grayscale image comes out as "L": any gray mode, and colour modes
    whose three channels are equal (a gray scan saved as RGB). Augmented, resized and
    spread over three channels by the collator, it gives the batch to_rgb's would."""
    image = _flatten(image)
    if image.mode == "RGB":
        array = np.asarray(image)
        if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2]):
            return image.convert("L")  # exact when the channels are equal
    return image


def _white(image):
    return 255 if image.mode == "L" else (255, 255, 255)


def _rotate(image, rng, size):
    return image.rotate(rng.uniform(-10, 10), resample=Image.NEAREST, expand=True, fillcolor=_white(image))


def _gaussian_blur(image, rng, size):
    # torchvision's GaussianBlur(3): a 3x3 kernel with sigma drawn from [0.1, 2.0].
    sigma = rng.uniform(0.1, 2.0)
    g = [math.exp(-(x * x) / (2 * sigma * sigma)) for x in (-1, 0, 1)]
    weights = [a * b for a in g for b in g]
    return image.filter(ImageFilter.Kernel((3, 3), weights, scale=sum(weights)))


def _filter3x3(image, reduce):
    """3x3 max (dilation) or min (erosion) with the edge pixels repeated, what PIL's
    MaxFilter(3) / MinFilter(3) compute, as two separable passes: PIL sorts 9 values per
    pixel and channel, about 15 times slower on a line."""
    array = np.asarray(image)
    padded = np.pad(array, ((1, 1), (1, 1)) + ((0, 0),) * (array.ndim - 2), mode="edge")
    rows = reduce(reduce(padded[:-2], padded[1:-1]), padded[2:])
    return Image.fromarray(reduce(reduce(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:]), image.mode)


def _dilate(image, rng, size):
    return _filter3x3(image, np.maximum)


def _erode(image, rng, size):
    return _filter3x3(image, np.minimum)


def _downscale(image, rng, size):
    # The reference resizes to a third of the model's input size with nearest; the final
    # bicubic resize brings it back up.
    height, width = size
    return image.resize((max(1, width // 3), max(1, height // 3)), Image.NEAREST)


def _underline(image, rng, size):
    ink = np.asarray(image if image.mode == "L" else image.convert("L")) < 50
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return image
    bottom, left, right = int(rows[-1]), int(columns[0]), int(columns[-1])
    image = image.copy()
    black = 0 if image.mode == "L" else (0, 0, 0)
    ImageDraw.Draw(image).rectangle((left, max(0, bottom - 2), right, bottom), fill=black)
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
    """Apply ONE of the seven augmentations, each with equal probability (as the paper),
    to an "L" or "RGB" image."""
    return AUGMENTATIONS[rng.choice(list(AUGMENTATIONS))](image, rng, size)


def resize_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize to (height, width), aspect ratio not kept; a uint8 CHW tensor of one
    channel ("L") or three ("RGB")."""
    height, width = size
    array = np.array(image.resize((width, height), Image.BICUBIC), dtype=np.uint8)  # a copy torch may own
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
