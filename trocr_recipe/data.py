"""Loading IAM-style datasets, the label map, the on-the-fly image transform, the collator."""

import os
import random
from dataclasses import dataclass

import torch
from datasets import DatasetDict, load_dataset, load_from_disk

from .augment import augment, resize_to_tensor, to_rgb


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
    """Decodes, converts to RGB, augments (train only) and resizes on the fly, so pixel
    arrays are never cached to disk. Uses the global `random` state, which the trainer
    seeds in every dataloader worker."""

    def __init__(self, image_column: str, size: tuple[int, int], train: bool):
        self.image_column = image_column
        self.size = size
        self.train = train

    def __call__(self, batch: dict) -> dict:
        pixels = []
        for image in batch[self.image_column]:
            image = to_rgb(image)
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


@dataclass
class OcrCollator:
    """Normalizes uint8 images on the batch with the processor's rescale / mean / std and
    pads labels with -100, so that padding is never part of the loss."""

    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float = 1 / 255

    @classmethod
    def from_image_processor(cls, image_processor) -> "OcrCollator":
        return cls(list(image_processor.image_mean), list(image_processor.image_std), image_processor.rescale_factor)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([feature["pixel_values"] for feature in features]).float() * self.rescale_factor
        mean = torch.tensor(self.image_mean).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std).view(1, -1, 1, 1)
        longest = max(len(feature["labels"]) for feature in features)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            labels[row, : len(feature["labels"])] = torch.as_tensor(feature["labels"])
        return {"pixel_values": (pixels - mean) / std, "labels": labels}
