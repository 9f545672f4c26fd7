"""Tests of data_scripts/prepare_iam.py on a miniature IAM tree (tests/iam_fixture.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets is imported: these tests never go online

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from iam_fixture import archive_iam, build_iam, image_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data_scripts" / "prepare_iam.py"
_spec = importlib.util.spec_from_file_location("prepare_iam", SCRIPT)
prepare_iam = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_iam)

COLUMNS = ["image", "text", "id", "form_id", "writer_id", "segmentation"]
TEXTS = {
    "a01-000u-00": "A MOVE to stop Mr. Gaitskell from",
    "a01-000u-03": "M Ps tomorrow . Mr. Michael Foot has",
    "b01-014-00": '" Quite so , " he said & left .',
    "b01-014-01": "You 're not the man 's friend",
    "c04-110-00": "Become a success with a disc and hey presto ! You 're a star ... . Rolly sings with",
}


def run(paths, out, *extra, split="aachen"):
    split_dir = paths.aachen if split == "aachen" else paths.iam_task
    argv = ["--iam_root", str(paths.root), "--split", split, "--split_dir", str(split_dir),
            "--output_dir", str(out), *extra]
    return prepare_iam.main(argv)


def rows_by_id(dataset_dict):
    return {row["id"]: row for split in dataset_dict.values() for row in split}


@pytest.fixture
def iam(tmp_path):
    return build_iam(tmp_path)


@pytest.fixture(scope="module")
def aachen(tmp_path_factory):
    """One default run shared by the read-only checks."""
    base = tmp_path_factory.mktemp("aachen")
    paths = build_iam(base)
    assert run(paths, base / "out") == 0
    return paths, base / "out", datasets.load_from_disk(str(base / "out"))


def test_splits_counts_and_columns(aachen):
    _, _, dataset = aachen
    assert list(dataset) == ["train", "validation", "test"]
    assert {split: ds.num_rows for split, ds in dataset.items()} == {"train": 7, "validation": 2, "test": 3}
    assert dataset["train"].column_names == COLUMNS
    assert isinstance(dataset["train"].features["image"], datasets.Image)


def test_texts_keep_iam_tokenized_spacing(aachen):
    rows = rows_by_id(aachen[2])
    for line_id, text in TEXTS.items():
        assert rows[line_id]["text"] == text
    assert "d01-000-00" not in rows  # in lines.txt but in no list


def test_form_id_in_list_expands_to_its_lines(aachen):
    train_ids = aachen[2]["train"]["id"]
    assert list(train_ids) == ["a01-000u-00", "a01-000u-01", "a01-000u-02", "a01-000u-03",
                               "a01-003-00", "a01-003-01", "a01-003-02"]


def test_row_metadata_and_original_png_bytes(aachen):
    paths, _, dataset = aachen
    row = rows_by_id(dataset)["c04-110-00"]
    assert (row["form_id"], row["writer_id"], row["segmentation"]) == ("c04-110", "150", "err")
    assert row["image"].size == (200, 30) and row["image"].mode == "L"
    stored = dataset["test"].cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert stored == image_path(paths.root, "c04-110-00").read_bytes()


def test_card_and_summary(aachen):
    _, out, _ = aachen
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["lines"] == 7
    assert summary["splits"]["test"]["err_lines"] == 2
    assert summary["total"]["lines"] == 12
    assert summary["splits"]["validation"]["characters"] == len(TEXTS["b01-014-00"]) + len(TEXTS["b01-014-01"])
    card = (out / "README.md").read_text()
    assert "Aachen" in card and "`tr.lst` -> train" in card and "IAM's tokenized spacing" in card
    assert "| train      | 7     | 1" in card


def test_summary_table_is_printed(iam, tmp_path, capsys):
    assert run(iam, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "| split" in printed and "| total      | 12    | 3" in printed


def test_drop_err(iam, tmp_path, capsys):
    assert run(iam, tmp_path / "out", "--drop_err") == 0
    assert "dropped 3 err lines (train 1, validation 0, test 2)" in capsys.readouterr().out
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert {split: ds.num_rows for split, ds in dataset.items()} == {"train": 6, "validation": 2, "test": 1}
    assert set(dataset["test"]["segmentation"]) == {"ok"}


def test_text_source_xml_decodes_entities(iam, tmp_path):
    assert run(iam, tmp_path / "out", "--text_source", "xml") == 0
    rows = rows_by_id(datasets.load_from_disk(str(tmp_path / "out")))
    assert rows["b01-014-00"]["text"] == '"Quite so," he said & left.'
    assert rows["b01-014-01"]["text"] == "You're not the man's friend"
    assert rows["a01-000u-00"]["text"] == "A MOVE to stop Mr. Gaitskell from"


def test_archives_give_the_same_dataset_as_folders(aachen, tmp_path):
    paths, _, from_folders = aachen
    archived = archive_iam(paths.root, tmp_path / "iam_tgz")
    assert sorted(p.name for p in archived.iterdir()) == ["ascii.tgz", "lines.tgz", "xml.tgz"]
    paths_tgz = type(paths)(archived, paths.aachen, paths.iam_task)
    assert run(paths_tgz, tmp_path / "out") == 0
    from_archives = datasets.load_from_disk(str(tmp_path / "out"))
    raw = datasets.Image(decode=False)
    for split in from_folders:
        assert from_archives[split].cast_column("image", raw).to_list() == \
            from_folders[split].cast_column("image", raw).to_list()


def test_crlf_lines_txt(iam, tmp_path):
    lines_txt = iam.root / "ascii" / "lines.txt"
    lines_txt.write_bytes(lines_txt.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    assert run(iam, tmp_path / "out") == 0
    rows = rows_by_id(datasets.load_from_disk(str(tmp_path / "out")))
    assert {line_id: rows[line_id]["text"] for line_id in TEXTS} == TEXTS


def test_missing_ids_stop_the_run(iam, tmp_path, capsys):
    (iam.aachen / "tr.lst").write_text((iam.aachen / "tr.lst").read_text() + "a01-000u-09\n")
    image_path(iam.root, "c04-110-01").unlink()
    assert run(iam, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{iam.aachen / 'tr.lst'}: no ground truth for 1 ids: a01-000u-09" in err
    assert f"{iam.aachen / 'te.lst'}: no image for 1 ids: c04-110-01" in err
    assert not (tmp_path / "out").exists()


def test_allow_missing_skips_and_reports(iam, tmp_path, capsys):
    (iam.aachen / "tr.lst").write_text((iam.aachen / "tr.lst").read_text() + "a01-000u-09\n")
    image_path(iam.root, "c04-110-01").unlink()
    assert run(iam, tmp_path / "out", "--allow_missing") == 0
    assert "skipped 2 listed ids" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "missing_report.json").read_text())
    assert report["train"] == {"list_file": str(iam.aachen / "tr.lst"),
                               "no_ground_truth": ["a01-000u-09"], "no_image": []}
    assert report["test"]["no_image"] == ["c04-110-01"]
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert {split: ds.num_rows for split, ds in dataset.items()} == {"train": 7, "validation": 2, "test": 2}


def test_truncated_png_names_its_path(iam, tmp_path, capsys):
    png = image_path(iam.root, "b01-014-01")
    png.write_bytes(png.read_bytes()[:120])
    assert run(iam, tmp_path / "out") == 2
    assert f"unreadable image {png}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_utf8_byte_names_file_and_line(iam, tmp_path, capsys):
    lines_txt = iam.root / "ascii" / "lines.txt"
    lines = lines_txt.read_bytes().split(b"\n")
    number = next(n for n, line in enumerate(lines, 1) if line.startswith(b"a01-000u-01"))
    lines[number - 1] = lines[number - 1].replace(b"Labour", b"Lab\xf6ur")
    lines_txt.write_bytes(b"\n".join(lines))
    assert run(iam, tmp_path / "out") == 2
    assert f"{lines_txt}: line {number}: byte 0xf6 is not valid UTF-8" in capsys.readouterr().err


def test_non_utf8_byte_in_split_list(iam, tmp_path, capsys):
    (iam.aachen / "va.lst").write_bytes(b"b01-014-00\r\nb01-014-\xff1\r\n")
    assert run(iam, tmp_path / "out") == 2
    assert f"{iam.aachen / 'va.lst'}: line 2: byte 0xff" in capsys.readouterr().err


def test_broken_xml_names_file_and_line(iam, tmp_path, capsys):
    xml = iam.root / "xml" / "b01-014.xml"
    xml.write_bytes(xml.read_bytes().replace(b"<handwritten-part>", b"<handwritten-part"))
    assert run(iam, tmp_path / "out") == 2
    assert f"{xml}: " in capsys.readouterr().err


def test_split_iam_maps_task_files(iam, tmp_path):
    assert run(iam, tmp_path / "out", split="iam") == 0
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert {split: ds.num_rows for split, ds in dataset.items()} == \
        {"train": 7, "validation": 1, "validation2": 1, "test": 3}
    assert dataset["validation"]["id"][:] == ["b01-014-00"]
    assert dataset["validation2"]["id"][:] == ["b01-014-01"]


def test_missing_list_file_is_named(iam, tmp_path, capsys):
    (iam.iam_task / "validationset2.txt").unlink()
    assert run(iam, tmp_path / "out", split="iam") == 2
    assert f"split list not found: {iam.iam_task / 'validationset2.txt'}" in capsys.readouterr().err


def test_split_is_required(iam, tmp_path):
    assert prepare_iam.main(["--iam_root", str(iam.root), "--output_dir", str(tmp_path / "out")]) == 2


def test_line_in_two_splits_is_refused(iam, tmp_path, capsys):
    (iam.aachen / "va.lst").write_text("b01-014-00\nb01-014-01\na01-003-01\n")
    assert run(iam, tmp_path / "out") == 2
    assert "1 lines are in both train and validation, e.g. a01-003-01" in capsys.readouterr().err


def test_output_dir_is_not_clobbered(iam, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run(iam, out, "--overwrite") == 2
    assert (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    assert run(iam, out) == 0
    assert run(iam, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(iam, out, "--overwrite", "--drop_err") == 0
    assert datasets.load_from_disk(str(out))["test"].num_rows == 1


def test_push_to_hub_is_private_unless_public(iam, tmp_path, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["private"]))

        def upload_file(self, **kwargs):
            calls.append(("upload_file", kwargs["path_in_repo"], kwargs["path_or_fileobj"].decode()))

    def fake_push(self, repo_id, private=None, **kwargs):
        calls.append(("push_to_hub", repo_id, private, sorted(self)))

    monkeypatch.setattr(prepare_iam, "HfApi", FakeApi)
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    assert run(iam, tmp_path / "private", "--push_to_hub", "me/iam") == 0
    assert [call[0] for call in calls] == ["create_repo", "upload_file", "push_to_hub"]
    assert calls[0] == ("create_repo", "me/iam", True)
    assert calls[1][1] == "README.md" and "Aachen" in calls[1][2]
    assert calls[2] == ("push_to_hub", "me/iam", True, ["test", "train", "validation"])
    calls.clear()
    assert run(iam, tmp_path / "public", "--push_to_hub", "me/iam", "--public") == 0
    assert calls[0][2] is False and calls[2][2] is False
    assert "non-commercial" in capsys.readouterr().err


def test_cli_in_a_subprocess_on_archives(iam, tmp_path):
    archived = archive_iam(iam.root, tmp_path / "iam_tgz")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--iam_root", str(archived), "--split", "aachen",
         "--split_dir", str(iam.aachen), "--output_dir", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| total      | 12" in result.stdout
    rows = rows_by_id(datasets.load_from_disk(str(out)))
    assert rows["a01-000u-00"]["text"] == "A MOVE to stop Mr. Gaitskell from"
    assert rows["a01-000u-00"]["writer_id"] == "000"
