"""--push_to_hub: what reaches the Hub (a patched client, offline), and that the Hub token
reaches no file, log or model card."""

import fnmatch
import json
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, metadata_load

import run_trocr
from trocr_recipe.outputs import write_model_card

TOKEN = "hf_FAKEtoken1234567890"


class FakeHub:
    """Stands in for HfApi.create_repo / upload_folder (the calls Trainer.init_hf_repo,
    push_to_hub and _push_from_checkpoint make, through transformers' shared HfApi)."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append({"repo_id": repo_id, "token": token, "private": private})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, *, repo_id, folder_path, commit_message=None, token=None, run_as_future=False,
                      ignore_patterns=None, path_in_repo=None, **kwargs):
        folder = Path(folder_path)
        files = {}
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(name, pattern) for pattern in ignore_patterns or []):
                files[name] = path.read_bytes()  # what would be sent, as it is now
        self.uploads.append({
            "repo_id": repo_id, "commit_message": commit_message, "files": files, "path_in_repo": path_in_repo,
            # The token the real client would send: the argument, else the client's, else HF_TOKEN / login.
            "token": token or api.token or huggingface_hub.get_token(),
        })
        if run_as_future:
            future = Future()
            future.set_result(None)
            return future
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: fake.create_repo(api, *a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, *a, **k: fake.upload_folder(api, *a, **k))
    monkeypatch.delenv("HF_TOKEN", raising=False)  # restored after the test, whatever the run sets
    return fake


def test_push_uploads_the_run_and_the_token_reaches_no_file_or_log(tiny_args, tmp_path, hub, caplog, capfd):
    out = tmp_path / "run"
    run_trocr.main(tiny_args + ["--max_steps", "4", "--push_to_hub", "true", "--hub_model_id", "someone/trocr-tiny",
                                "--hub_private_repo", "true", "--hub_token", TOKEN])

    assert hub.repos == [{"repo_id": "someone/trocr-tiny", "token": TOKEN, "private": True}]
    # The trainer's pushes (at each checkpoint with hub_strategy every_save, at save_model),
    # then the run's, once everything is written.
    final = hub.uploads[-1]
    assert hub.uploads[0]["commit_message"] == "Training in progress, step 4"
    assert final["commit_message"] == "TrOCR fine-tuned with run_trocr.py"
    assert all(upload["repo_id"] == "someone/trocr-tiny" and upload["token"] == TOKEN for upload in hub.uploads)
    files = final["files"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "README.md", "all_results.json"):
        assert name in files, name
    assert any(name.startswith("runs/") and "tfevents" in name for name in files)  # TensorBoard
    assert not any(name.startswith("checkpoint-") for name in files)

    # The model card parses back: model-index with the test split's cer and wer.
    card = tmp_path / "pushed_README.md"
    card.write_bytes(files["README.md"])
    metadata = metadata_load(card)
    (result,) = metadata["model-index"][0]["results"]
    assert result["task"]["type"] == "image-to-text" and result["dataset"]["split"] == "test"
    results = json.loads(files["all_results.json"])
    assert {m["type"]: m["value"] for m in result["metrics"]} == {
        "cer": round(results["test_cer"], 4), "wer": round(results["test_wer"], 4)}
    assert "base_model" not in metadata  # a local folder: the Hub accepts only Hub ids there
    assert [r.metric_type for r in ModelCard.load(card).data.eval_results] == ["cer", "wer"]

    # The token: in no uploaded file, no file of the output folder (training_args.bin is a
    # pickle of the arguments: the stock trainer writes hub_token into it), no log line.
    for upload in hub.uploads:
        assert not [name for name, content in upload["files"].items() if TOKEN.encode() in content]
    everything = [path for path in out.rglob("*") if path.is_file()]
    assert len(everything) > 20 and any(path.name == "training_args.bin" for path in everything)
    assert not [str(path) for path in everything if TOKEN.encode() in path.read_bytes()]
    for saved in out.rglob("training_args.bin"):
        assert torch.load(saved, weights_only=False).hub_token is None
    captured = capfd.readouterr()
    assert "Pushed" in caplog.text + captured.out + captured.err
    assert TOKEN not in caplog.text + captured.out + captured.err


def test_model_card_metadata_with_hub_ids(tmp_path):
    model_args = SimpleNamespace(model_name_or_path="microsoft/trocr-small-stage1")
    data_args = SimpleNamespace(dataset_name="Teklia/IAM-line", dataset_config_name=None, test_split="test",
                                validation_split="validation")
    write_model_card(str(tmp_path), model_args, data_args, {"test_cer": 4.2213, "test_wer": 15.5, "eval_cer": 3.5})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "microsoft/trocr-small-stage1"
    assert card.data.datasets == ["Teklia/IAM-line"]
    assert {(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("Teklia/IAM-line", "test", "cer", 4.2213), ("Teklia/IAM-line", "test", "wer", 15.5)}

    # Validation scores only (no test run): the validation split is named.
    write_model_card(str(tmp_path), model_args, data_args, {"eval_cer": 3.5, "eval_wer": 11.0})
    (cer, wer) = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert (cer.dataset_split, cer.metric_value, wer.metric_type) == ("validation", 3.5, "wer")
