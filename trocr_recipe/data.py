"""Loading IAM-style datasets, the label map, the on-the-fly image transform, the collator."""

import math
import os
import random
from dataclasses import dataclass

import torch
from datasets import DatasetDict, load_dataset, load_from_disk

from .augment import augment, resize_to_tensor, to_gray_or_rgb


def load_splits(data_args, cache_dir: str | None = None) -> DatasetDict:
    """A Hub dataset, a `save_to_disk` folder, parquet files or an imagefolder; the three
    configured splits are checked, with the columns they must carry."""
    path = data_args.dataset_name
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        raw = load_from_disk(path)
    else:
        raw = load_dataset(path, data_args.dataset_config_name, cache_dir=cache_dir)
    splits = {}
    wanted = {"train": data_args.train_split, "validation": data_args.validation_split, "test": data_args.test_split}
    for role, name in wanted.items():
        if name not in raw:
            raise SystemExit(f"{path}: no split '{name}' (for {role}); it has: {', '.join(raw)}")
        for column in (data_args.image_column, data_args.text_column):
            if column not in raw[name].column_names:
                raise SystemExit(
                    f"{path}: split '{name}' has no column '{column}'; its columns: {', '.join(raw[name].column_names)}"
                )
        limit = getattr(data_args, f"max_{'eval' if role == 'validation' else role}_samples")
        splits[role] = raw[name].select(range(min(limit, len(raw[name])))) if limit else raw[name]
    return DatasetDict(splits)


def encode_labels(tokenizer, texts: list[str], max_target_length: int) -> tuple[list[list[int]], list[bool]]:
    """Text ids without special tokens, then `</s>`: the target the paper trained on.
    Hugging Face tokenizers add `<s>` by default; the model would learn to emit it."""
    labels, truncated = [], []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        truncated.append(len(ids) + 1 > max_target_length)
        labels.append(ids[: max_target_length - 1] + [tokenizer.eos_token_id])
    return labels, truncated


def tokenize_splits(splits: DatasetDict, tokenizer, data_args) -> dict[str, int]:
    """Adds `labels` to every split in place; returns how many labels each had truncated."""
    def encode(batch):
        labels, truncated = encode_labels(tokenizer, batch[data_args.text_column], data_args.max_target_length)
        return {"labels": labels, "label_truncated": truncated}

    truncated = {}
    for role in list(splits):
        splits[role] = splits[role].map(
            encode, batched=True, num_proc=data_args.preprocessing_num_workers, desc=f"Tokenizing {role} labels"
        )
        truncated[role] = sum(splits[role]["label_truncated"])
    return truncated


def longest_label(splits: DatasetDict) -> int:
    return max(len(ids) for split in splits.values() for ids in split["labels"])


def line_ids(split, id_column: str | None) -> list[str]:
    if id_column and id_column in split.column_names:
        return [str(value) for value in split[id_column]]
    return [str(index) for index in range(len(split))]


class ImageTransform:
    """Decodes, converts to "L" (grayscale lines) or "RGB", augments (train only) and
    resizes on the fly, so pixel arrays are never cached to disk; uint8 out, one or three
    channels. Uses the global `random` state, which the trainer seeds in every dataloader
    worker."""

    def __init__(self, image_column: str, size: tuple[int, int], train: bool):
        self.image_column = image_column
        self.size = size
        self.train = train

    def __call__(self, batch: dict) -> dict:
        pixels = []
        for image in batch[self.image_column]:
            image = to_gray_or_rgb(image)
            if self.train:
                image = augment(image, self.size, random)
            pixels.append(resize_to_tensor(image, self.size))
        return {"pixel_values": pixels, "labels": batch["labels"]}


def image_size(image_processor) -> tuple[int, int]:
    size = image_processor.size
    return (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2


def with_image_transforms(splits: DatasetDict, data_args, image_processor) -> DatasetDict:
    size = image_size(image_processor)
    return DatasetDict(
        {
            role: split.with_transform(
                ImageTransform(data_args.image_column, size, train=role == "train" and data_args.augment)
            )
            for role, split in splits.items()
        }
    )


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """The uint8 images as one batch, one channel if they all have one, else three; inside a
    dataloader worker, in shared memory (as torch's default_collate does), so that handing
    it to the main process does not copy it again."""
    channels = max(image.shape[0] for image in images)
    shape = (len(images), channels, *images[0].shape[1:])
    out = None
    if _in_worker():
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        out = torch.tensor([], dtype=torch.uint8).set_(storage, 0, shape)
    return torch.stack([image.expand(channels, -1, -1) for image in images], out=out)


@dataclass
class OcrCollator:
    """Pads labels with -100, so that padding is never part of the loss, and normalizes the
    uint8 images with the processor's rescale / mean / std, a one-channel line spread over
    the three channels.

    Inside a dataloader worker the images stay uint8 (`normalize` is left to the model, see
    `normalize_on_device`): a float batch is 4 times larger (12 for grayscale lines), and
    moving it to the main process through shared memory, then to pinned memory and the GPU,
    costs more than normalizing it there (bench_data.py)."""

    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float = 1 / 255

    @classmethod
    def from_image_processor(cls, image_processor) -> "OcrCollator":
        return cls(list(image_processor.image_mean), list(image_processor.image_std), image_processor.rescale_factor)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pixels = _stack([feature["pixel_values"] for feature in features])
        longest = max(len(feature["labels"]) for feature in features)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            labels[row, : len(feature["labels"])] = torch.as_tensor(feature["labels"])
        return {"pixel_values": pixels if _in_worker() else self.normalize(pixels), "labels": labels}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (batch, 1 or 3, height, width), on any device -> the model's float32 input
        (batch, 3, height, width): (x * rescale - mean) / std, the image processor's
        arithmetic. Float pixel values are taken as normalized already."""
        if pixels.is_floating_point():
            return pixels
        device, channels = pixels.device, len(self.image_mean)
        mean = torch.tensor(self.image_mean, device=device).view(-1, 1, 1)
        std = torch.tensor(self.image_std, device=device).view(-1, 1, 1)
        out = torch.empty((len(pixels), channels, *pixels.shape[2:]), device=device)
        scaled = torch.empty(pixels.shape[1:], device=device)
        for row, image in enumerate(pixels):  # a line at a time, while it is in the cache
            torch.mul(image, self.rescale_factor, out=scaled)
            torch.sub(scaled, mean, out=out[row]).div_(std)
        return out


def normalize_on_device(model, collator: OcrCollator):
    """Makes the model's encoder normalize uint8 pixel values (batches from dataloader
    workers) with `collator.normalize`, on its device and in its dtype, whatever calls it:
    the training forward, `generate`, either loop. Returns the hook's handle."""

    def normalize(encoder, args, kwargs):
        def model_input(pixels):
            if isinstance(pixels, torch.Tensor) and not pixels.is_floating_point():
                return collator.normalize(pixels).to(encoder.dtype)
            return pixels

        if args:
            args = (model_input(args[0]), *args[1:])
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = model_input(kwargs["pixel_values"])
        return args, kwargs

    return model.encoder.register_forward_pre_hook(normalize, with_kwargs=True)
