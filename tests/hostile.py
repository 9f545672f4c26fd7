"""Damaged and hostile inputs for the reliability tests: model folders, built from a good one."""

import json
import shutil
from pathlib import Path

# Written by the custom-code folder's Python when it runs: it must never exist.
RAN = "custom_code_ran"


def _copy(good: Path, path: Path) -> Path:
    shutil.copytree(good, path)
    return path


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def custom_code_folder(good: Path, path: Path) -> Path:
    """A model whose config maps its class to Python code in the folder, which writes RAN."""
    folder = _copy(good, path)
    (folder / "custom.py").write_text(
        f"from pathlib import Path\nPath(__file__).with_name({RAN!r}).write_text('ran')\n"
        "from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel\n"
        "class CustomConfig(VisionEncoderDecoderConfig):\n    pass\n"
        "class CustomModel(VisionEncoderDecoderModel):\n    config_class = CustomConfig\n"
    )
    _edit_json(folder / "config.json", lambda c: c.update(
        auto_map={"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"}))
    _edit_json(folder / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["custom.Tok", None]}))
    return folder


def bad_model_folders(good: Path, root: Path) -> dict[str, Path]:
    """Name -> a damaged copy of the model folder `good`."""
    root.mkdir(parents=True, exist_ok=True)
    folders = {}

    def make(name, damage):
        folder = _copy(good, root / name)
        damage(folder)
        folders[name] = folder

    make("no_config", lambda f: (f / "config.json").unlink())
    make("empty_config", lambda f: (f / "config.json").write_text(""))
    make("list_config", lambda f: (f / "config.json").write_text("[]"))
    make("foreign_config", lambda f: (f / "config.json").write_text(json.dumps({"model_type": "bert"})))
    make("no_decoder", lambda f: _edit_json(f / "config.json", lambda c: c.pop("decoder")))
    make("corrupt_safetensors", lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage-bytes"))
    make("truncated_safetensors", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:200]))
    make("pickle_bin", lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(
        b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")))
    make("int_tokenizer_class", lambda f: _edit_json(f / "tokenizer_config.json",
                                                     lambda c: c.update(tokenizer_class=7)))
    make("bad_generation_config", lambda f: (f / "generation_config.json").write_text("{not json"))
    make("not_utf8_config", lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"))
    folders["custom_code"] = custom_code_folder(good, root / "custom_code")
    return folders
