"""Offline fixtures: a handful of rendered lines and a tiny TrOCR built from configs."""

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data_scripts")]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    import make_synthetic

    path = tmp_path_factory.mktemp("data") / "tiny"
    # A test split of 7 lines: it does not divide evenly into evaluation batches.
    make_synthetic.main(["--output_dir", str(path), "--num_train", "24", "--num_validation", "6", "--num_test", "7"])
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> Path:
    import make_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny_model.main(["--dataset", str(tiny_data), "--output_dir", str(path), "--preset", "tiny"])
    return path


@pytest.fixture(scope="session")
def processor(tiny_model):
    from transformers import TrOCRProcessor

    return TrOCRProcessor.from_pretrained(tiny_model)


@pytest.fixture
def tiny_args(tiny_data, tiny_model, tmp_path):
    """recipes/tiny.json pointed at the fixtures and a fresh output folder."""
    return [
        str(ROOT / "recipes" / "tiny.json"),
        "--model_name_or_path", str(tiny_model),
        "--dataset_name", str(tiny_data),
        "--output_dir", str(tmp_path / "run"),
    ]


@pytest.fixture
def bos_start_model(tiny_model, tmp_path) -> Path:
    """The tiny model saved with the classic mistake: the decoder starting from <s> (id 0) on both configs."""
    from transformers import TrOCRProcessor, VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 0  # <s>
    path = tmp_path / "bos_start"
    model.save_pretrained(path)
    TrOCRProcessor.from_pretrained(tiny_model).save_pretrained(path)
    return path
