"""A property of the data path (data check, label tokenization, image transform, collator):
whatever images and texts a dataset holds (every PIL mode, 1x1 to 1x8000 pixels, random
bytes, truncated files, any unicode), it gives a valid batch or stops with a BadDataError
naming the lines, never an exception from deep inside PIL or torch."""

import io

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trocr_recipe.args import DataTrainingArguments
from trocr_recipe.data import OcrCollator, image_size, tokenize_splits, with_image_transforms
from trocr_recipe.validate import PROBLEMS, BadDataError, check_splits

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]
FEATURES = Features({"image": ImageFeature(), "text": Value("string"), "id": Value("string")})


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 2**16, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-2**31, 2**31, (height, width), dtype=np.int32))
    if mode == "F":  # a 0..1 page or raw values far outside 0..255
        scale = 1.0 if seed % 2 else 1e6
        return Image.fromarray((rng.standard_normal((height, width)) * scale).astype(np.float32))
    channels = {"LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode, 1)
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if channels == 1:
        return Image.fromarray(pixels[..., 0]).convert(mode)  # L, and from it 1 and P
    return Image.frombytes(mode, (width, height), pixels.tobytes())


@st.composite
def image_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(MODES + ["random bytes", "truncated"]))
    if kind == "random bytes":
        return draw(st.binary(min_size=1, max_size=300))
    mode = "L" if kind == "truncated" else kind
    width, height = draw(st.sampled_from([(1, 1), (1, 8000), (8000, 1), (2, 300)])
                         | st.tuples(st.integers(1, 200), st.integers(1, 60)))
    buffer = io.BytesIO()
    # PNG has no float, 32-bit integer or CMYK pixels: those go to TIFF.
    make_image(mode, width, height, draw(st.integers(0, 2**32 - 1))).save(
        buffer, format="TIFF" if mode in ("I", "F", "CMYK") else "PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


@pytest.fixture(scope="module", autouse=True)
def quiet_progress_bars():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.tuples(image_bytes(), st.text(max_size=30)), min_size=1, max_size=4),
    policy=st.sampled_from(["skip", "error"]),
)
def test_the_data_path_gives_a_valid_batch_or_names_the_bad_lines(processor, tmp_path, lines, policy):
    ids = [f"line-{index}" for index in range(len(lines))]
    rows = {"image": [{"bytes": data, "path": None} for data, _ in lines], "text": [text for _, text in lines], "id": ids}
    splits = DatasetDict({"train": Dataset.from_dict(rows, features=FEATURES)})
    data_args = DataTrainingArguments(
        dataset_name="generated", max_target_length=12, max_bad_fraction=1.0,
        on_undecodable_image=policy, on_bad_image_size=policy, on_empty_text=policy,
    )
    try:
        kept, skipped = check_splits(splits, processor.tokenizer, data_args, str(tmp_path), write_report=False)
    except BadDataError as error:
        assert policy == "error" and error.lines
        assert all(line["id"] in ids and line["split"] == "train" and line["problem"] in PROBLEMS  # never a notice
                   for line in error.lines)
        return
    count = len(kept["train"])
    assert count + skipped["train"] == len(lines)
    if not count:
        return
    tokenize_splits(kept, processor.tokenizer, data_args)
    inputs = with_image_transforms(kept, data_args, processor.image_processor)["train"]  # augmented
    batch = OcrCollator.from_image_processor(processor.image_processor)([inputs[row] for row in range(count)])

    height, width = image_size(processor.image_processor)
    assert batch["pixel_values"].shape == (count, 3, height, width)
    assert batch["pixel_values"].dtype == torch.float32 and torch.isfinite(batch["pixel_values"]).all()
    eos = processor.tokenizer.eos_token_id
    for row, labels in zip(batch["labels"].tolist(), kept["train"]["labels"]):
        assert 1 <= len(labels) <= data_args.max_target_length and labels[-1] == eos
        assert row == labels + [-100] * (len(row) - len(labels))
