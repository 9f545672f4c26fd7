"""Turn the IAM Handwriting Database, as distributed, into a line-level `datasets.DatasetDict`.

Usage:

    python data_scripts/prepare_iam.py --iam_root ~/iam --split aachen \\
        --split_dir ~/aachen --output_dir data/iam-aachen

`--iam_root` holds IAM as downloaded from the IAM database site (register first, then
download from https://fki.tic.heia-fr.ch/databases/iam-handwriting-database), either
unpacked or as the archives themselves, which are read in place:

    lines/a01/a01-000u/a01-000u-00.png   or  lines.tgz   (line images, required)
    ascii/lines.txt                      or  ascii.tgz   (transcriptions, required)
    xml/a01-000u.xml                     or  xml.tgz     (writer ids, XML text; optional)

Splits (both required, nothing is ever invented):

* `--split aachen --split_dir DIR`: the Aachen (RWTH) partition the TrOCR paper uses,
  6,161 / 966 / 2,915 lines, from `tr.lst`, `va.lst`, `te.lst` (one line id per row; a
  form id such as `a01-000u` stands for all lines of that form). The lists are published
  in the IAM recipe of the Laia toolkit (jpuigcerver/Laia on GitHub, folder `egs/iam`).
* `--split iam --split_dir DIR`: IAM's own "large writer independent text line
  recognition task" files from the IAM download site: `trainset.txt` -> train,
  `validationset1.txt` -> validation, `validationset2.txt` -> validation2,
  `testset.txt` -> test.

Text comes from `ascii/lines.txt` with `|` replaced by a space, keeping IAM's tokenized
spacing (`hey presto ! You 're`), which is the ground truth the paper scores against;
`--text_source xml` takes the XML transcriptions (normal spacing) instead.

The output directory gets the `save_to_disk` dataset (columns image, text, id, form_id,
writer_id, segmentation), a dataset card `README.md` and `summary.json`; with
`--allow_missing` also `missing_report.json`. `--push_to_hub REPO` uploads it as a private
dataset (`--public` to publish; mind IAM's terms of use).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

import datasets
from datasets.exceptions import DatasetGenerationError
from huggingface_hub import HfApi
from PIL import Image
from tqdm import tqdm

from trocr_recipe.errors import ArgumentParser, BadInput, run_cli

SPLIT_FILES = {
    "aachen": {"train": "tr.lst", "validation": "va.lst", "test": "te.lst"},
    "iam": {
        "train": "trainset.txt",
        "validation": "validationset1.txt",
        "validation2": "validationset2.txt",
        "test": "testset.txt",
    },
}
SHOWN_IDS = 10
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "id": datasets.Value("string"),
        "form_id": datasets.Value("string"),
        "writer_id": datasets.Value("string"),
        "segmentation": datasets.Value("string"),
    }
)
TEXT_CONVENTIONS = {
    "ascii": "the transcription field of `ascii/lines.txt` with each `|` replaced by one space. "
    "IAM's tokenized spacing is kept (`hey presto ! You 're a star`), as in the ground truth "
    "the TrOCR paper scores against; score predictions against this raw text.",
    "xml": "the `text` attribute of each `<line>` in `xml/<form>.xml`, XML entities decoded. "
    "It has normal spacing (`presto! You're`), so it is NOT the paper's ground truth.",
}


class PrepareError(BadInput):
    """A problem with the input that the user has to fix; main() prints it and exits 2."""


# --- text files -----------------------------------------------------------------------


def decode_text(data: bytes, name: str) -> str:
    """Decode UTF-8 (a BOM is tolerated), naming file and line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PrepareError(
            f"{name}: line {line}: byte 0x{data[exc.start]:02x} is not valid UTF-8"
        ) from None


def content_lines(data: bytes, name: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) for every line that is neither blank nor a # comment."""
    # split("\n") rather than splitlines(): the latter also breaks on \x0c, \x1c, ...
    # and would make the line numbers in error messages wrong.
    for number, line in enumerate(decode_text(data, name).split("\n"), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def parse_lines_txt(data: bytes, name: str) -> dict[str, tuple[str, str]]:
    """lines.txt -> {line id: (segmentation, text)}."""
    records, first_line = {}, {}
    for number, line in content_lines(data, name):
        # The transcription is everything after the 8th field, whatever spaces it holds.
        fields = line.split(None, 8)
        if len(fields) < 9 or fields[1] not in ("ok", "err"):
            raise PrepareError(
                f"{name}: line {number}: expected '<id> ok|err <graylevel> <components> "
                f"<x> <y> <w> <h> <transcription>', got {line!r}"
            )
        if fields[0] in first_line:
            raise PrepareError(f"{name}: line {number}: line id {fields[0]} already on line {first_line[fields[0]]}; "
                               "keep one transcription per line id")
        first_line[fields[0]] = number
        records[fields[0]] = (fields[1], fields[8].replace("|", " "))
    return records


def parse_form_xml(data: bytes, name: str) -> tuple[str, dict[str, str]]:
    """A form's XML -> (writer id, {line id: text}); ElementTree decodes the entities."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:  # its message carries "line N, column M"
        raise PrepareError(f"{name}: {exc}") from None
    texts = {line.get("id"): line.get("text", "") for line in root.iter("line")}
    return root.get("writer-id", ""), texts


# --- IAM as distributed: folders or archives --------------------------------------------


def locate(folder: Path, archive: Path) -> Path | None:
    """The unpacked folder if it is there, else the archive, else None."""
    return next((path for path in (folder, archive) if path.exists()), None)


def iter_tar(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the wanted files, in one pass: a .tgz cannot seek backwards."""
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise PrepareError(f"{archive}: cannot read archive: {exc}") from None


def stem_if(name: str, suffix: str) -> str | None:
    """The file stem of an archive member if it has the suffix (members may sit in folders)."""
    path = PurePosixPath(name)
    return path.stem if path.suffix == suffix else None


def form_of(line_id: str) -> str:
    return line_id.rsplit("-", 1)[0]


def read_ground_truth(iam_root: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """Parse lines.txt from ascii/ or ascii.tgz; also return where it came from."""
    path = locate(iam_root / "ascii" / "lines.txt", iam_root / "ascii.tgz")
    if path is None:
        raise PrepareError(
            f"no ground truth: neither {iam_root / 'ascii' / 'lines.txt'} "
            f"nor {iam_root / 'ascii.tgz'} exists"
        )
    if not path.is_file():
        raise PrepareError(f"{path}: not a file; give the lines.txt of IAM's ascii.tgz")
    if path.suffix == ".txt":
        return parse_lines_txt(path.read_bytes(), str(path)), "ascii/lines.txt"
    for member, data in iter_tar(path, lambda name: PurePosixPath(name).name == "lines.txt"):
        return parse_lines_txt(data, f"{path}:{member}"), f"ascii.tgz ({member})"
    raise PrepareError(f"{path} holds no lines.txt")


def read_xml_forms(iam_root: Path, forms: set[str]) -> tuple[dict, str] | None:
    """{form id: (writer id, texts)} for the wanted forms, or None when IAM's XML is absent."""
    path = locate(iam_root / "xml", iam_root / "xml.tgz")
    if path is None:
        return None
    if path.is_dir():
        files = (path / f"{form}.xml" for form in sorted(forms))
        items = ((file.stem, str(file), file.read_bytes()) for file in files if file.is_file())
        origin = "xml/"
    else:
        members = iter_tar(path, lambda name: stem_if(name, ".xml") in forms)
        items = ((stem_if(name, ".xml"), f"{path}:{name}", data) for name, data in members)
        origin = "xml.tgz"
    return {form: parse_form_xml(data, where) for form, where, data in items}, origin


class FolderImages:
    """Line images in the unpacked lines/<writer>/<form>/<line>.png tree, read on demand."""

    origin = "lines/"

    def __init__(self, folder: Path):
        self.folder = folder

    def where(self, line_id: str) -> str:
        return str(self.folder / line_id.split("-")[0] / form_of(line_id) / f"{line_id}.png")

    def __contains__(self, line_id: str) -> bool:
        return Path(self.where(line_id)).is_file()

    def read(self, line_id: str) -> bytes:
        return Path(self.where(line_id)).read_bytes()


class ArchiveImages:
    """The wanted line images out of lines.tgz, kept in memory after a single pass."""

    origin = "lines.tgz"

    def __init__(self, archive: Path, wanted: set[str]):
        print(f"reading {archive} ...", file=sys.stderr)
        self.archive = archive
        self.members = {
            stem_if(name, ".png"): (name, data)
            for name, data in iter_tar(archive, lambda name: stem_if(name, ".png") in wanted)
        }

    def where(self, line_id: str) -> str:
        return f"{self.archive}:{self.members[line_id][0]}"

    def __contains__(self, line_id: str) -> bool:
        return line_id in self.members

    def read(self, line_id: str) -> bytes:
        return self.members[line_id][1]


def open_images(iam_root: Path, wanted: set[str]) -> FolderImages | ArchiveImages:
    path = locate(iam_root / "lines", iam_root / "lines.tgz")
    if path is None:
        raise PrepareError(
            f"no line images: neither {iam_root / 'lines'} nor {iam_root / 'lines.tgz'} exists"
        )
    return FolderImages(path) if path.is_dir() else ArchiveImages(path, wanted)


def checked_png(data: bytes, where: str) -> bytes:
    """Decode the whole image so that a truncated file fails now, not in the middle of training."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "PNG":
                return data
            converted = io.BytesIO()
            image.save(converted, format="PNG")
            return converted.getvalue()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise PrepareError(f"unreadable image {where}: {exc}") from None


# --- splits ---------------------------------------------------------------------------


def read_split_lists(split_dir: Path, scheme: str) -> dict[str, tuple[Path, list[str]]]:
    """{split: (list file, entries)}; every list file must exist."""
    files = {split: split_dir / name for split, name in SPLIT_FILES[scheme].items()}
    absent = [str(path) for path in files.values() if not path.is_file()]
    if absent:
        raise PrepareError(f"split list not found: {', '.join(absent)}")
    lists = {
        split: (path, [line.split()[0] for _, line in content_lines(path.read_bytes(), str(path))])
        for split, path in files.items()
    }
    empty = [str(path) for path, entries in lists.values() if not entries]
    if empty:
        raise PrepareError(f"split list without a line id: {', '.join(empty)}; give the lists as distributed")
    return lists


def expand(entries: Iterable[str], lines_of_form: dict[str, list[str]]) -> list[str]:
    """Line ids of a split list: a form id stands for all its lines; duplicates dropped."""
    return list(dict.fromkeys(lid for entry in entries for lid in lines_of_form.get(entry, [entry])))


def check_disjoint(split_ids: dict[str, list[str]]) -> None:
    """A line in two splits would leak test data into training."""
    owner: dict[str, str] = {}
    for split, ids in split_ids.items():
        shared = [lid for lid in ids if lid in owner]
        if shared:
            raise PrepareError(
                f"{len(shared)} lines are in both {owner[shared[0]]} and {split}, "
                f"e.g. {', '.join(shared[:SHOWN_IDS])}"
            )
        owner.update(dict.fromkeys(ids, split))


def classify(ids: list[str], ground_truth: dict, images: FolderImages | ArchiveImages) -> dict:
    """Split ids into those usable and those lacking ground truth or an image."""
    groups: dict[str, list[str]] = {"ok": [], "no_ground_truth": [], "no_image": []}
    for line_id in ids:
        if line_id not in ground_truth:
            groups["no_ground_truth"].append(line_id)
        elif line_id not in images:
            groups["no_image"].append(line_id)
        else:
            groups["ok"].append(line_id)
    return groups


def missing_report(lists: dict, groups: dict) -> dict:
    """{split: {list_file, no_ground_truth, no_image}} for the splits with missing ids."""
    return {
        split: {
            "list_file": str(lists[split][0]),
            "no_ground_truth": found["no_ground_truth"],
            "no_image": found["no_image"],
        }
        for split, found in groups.items()
        if found["no_ground_truth"] or found["no_image"]
    }


def describe_missing(report: dict) -> str:
    """One line per list file and reason, with the first ids."""
    parts = []
    for entry in report.values():
        for reason in ("no_ground_truth", "no_image"):
            ids = entry[reason]
            if ids:
                shown = ", ".join(ids[:SHOWN_IDS]) + (", ..." if len(ids) > SHOWN_IDS else "")
                parts.append(f"{entry['list_file']}: {reason.replace('_', ' ')} for {len(ids)} ids: {shown}")
    return "; ".join(parts)


# --- dataset, summary, card -------------------------------------------------------------


@contextlib.contextmanager
def datasets_bars_off():
    """Silence datasets' own per-split bars so that the one bar over images stays readable."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def rows(ids, ground_truth, writers, images, bar) -> Iterator[dict]:
    for line_id in ids:
        segmentation, text = ground_truth[line_id]
        png = checked_png(images.read(line_id), images.where(line_id))
        bar.update()
        yield {
            "image": {"bytes": png, "path": f"{line_id}.png"},
            "text": text,
            "id": line_id,
            "form_id": form_of(line_id),
            "writer_id": writers.get(form_of(line_id), ""),
            "segmentation": segmentation,
        }


def build(split_ids, ground_truth, writers, images, cache_dir: str) -> datasets.DatasetDict:
    built = {}
    total = sum(map(len, split_ids.values()))
    with tqdm(total=total, desc="images", unit="img") as bar, datasets_bars_off():
        for split, ids in split_ids.items():
            try:
                # A given fingerprint keeps datasets from hashing the generator and all it
                # refers to (the images); the cache dir is fresh, so uniqueness is enough.
                built[split] = datasets.Dataset.from_generator(
                    lambda ids=ids: rows(ids, ground_truth, writers, images, bar),
                    features=FEATURES,
                    cache_dir=cache_dir,
                    fingerprint=uuid.uuid4().hex,
                    split=datasets.NamedSplit(split),
                )
            except DatasetGenerationError as exc:
                if isinstance(exc.__cause__, PrepareError):
                    raise exc.__cause__ from None
                raise
    return datasets.DatasetDict(built)


def text_stats(records: list[tuple[str, str]]) -> dict:
    texts = [text for _, text in records]
    return {
        "lines": len(records),
        "err_lines": sum(segmentation == "err" for segmentation, _ in records),
        "characters": sum(map(len, texts)),
        "alphabet_size": len(set("".join(texts))),
    }


def summarize(split_ids, ground_truth) -> dict:
    per_split = {split: text_stats([ground_truth[i] for i in ids]) for split, ids in split_ids.items()}
    everything = [ground_truth[i] for ids in split_ids.values() for i in ids]
    return {"splits": per_split, "total": text_stats(everything)}


def summary_table(summary: dict) -> str:
    header = ("split", "lines", "err lines", "characters", "alphabet")
    body = [(split, *map(str, stats.values())) for split, stats in summary["splits"].items()]
    body.append(("total", *map(str, summary["total"].values())))
    widths = [max(len(row[col]) for row in [header, *body]) for col in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"
        for row in [header, *body]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def dataset_card(args, origins: list[str], summary: dict, notes: list[str]) -> str:
    list_names = ", ".join(f"`{name}` -> {split}" for split, name in SPLIT_FILES[args.split].items())
    split_doc = {
        "aachen": "the Aachen (RWTH) partition used by the TrOCR paper (6,161 / 966 / 2,915 lines "
        "in the paper), lists from the IAM recipe of the Laia toolkit",
        "iam": "IAM's own large writer independent text line recognition task",
    }[args.split]
    return f"""---
license: other
language:
- en
task_categories:
- image-to-text
pretty_name: IAM handwritten lines ({args.split} split)
---

# IAM handwritten text lines, {args.split} split

**Source:** IAM Handwriting Database 3.0, line level
(https://fki.tic.heia-fr.ch/databases/iam-handwriting-database), read from
{", ".join(origins)} by `data_scripts/prepare_iam.py`.

**Split:** {split_doc}; {list_names}.

{summary_table(summary)}

**Text convention:** {TEXT_CONVENTIONS[args.text_source]}

{" ".join(notes)}

**Columns:** `image` (the original grayscale PNG), `text`, `id` (line id, e.g.
`a01-000u-00`), `form_id`, `writer_id` (from the form's XML; empty without it),
`segmentation` (IAM's word segmentation result, `ok` or `err`; it says nothing about the
transcription).

**License:** IAM may be used for non-commercial research only, after registration at the
IAM database site; cite U. Marti and H. Bunke, IJDAR 5 (2002) 39-46.
"""


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Never mix with old files; --overwrite may replace only a previous output of this script."""
    if output_dir.exists() and not output_dir.is_dir():
        raise PrepareError(f"output directory {output_dir} is a file; give a folder")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise PrepareError(
            f"output directory {output_dir} is not empty (--overwrite replaces a previous output)"
        )
    if not (output_dir / "dataset_dict.json").is_file():
        raise PrepareError(f"output directory {output_dir} is not empty and holds no previous output")


def push(dataset: datasets.DatasetDict, card: str, repo: str, private: bool) -> None:
    """Create the repo with our card first: push_to_hub then merges its metadata into it."""
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    api.upload_file(
        path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo, repo_type="dataset"
    )
    dataset.push_to_hub(repo, private=private)


# --- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iam_root", type=Path, required=True, metavar="DIR",
                        help="folder with IAM as distributed: lines/ or lines.tgz, ascii/ or ascii.tgz, "
                        "optionally xml/ or xml.tgz")
    parser.add_argument("--split", choices=sorted(SPLIT_FILES), required=True,
                        help="aachen: tr.lst/va.lst/te.lst (the paper's split); iam: IAM's trainset.txt, "
                        "validationset1.txt, validationset2.txt, testset.txt")
    parser.add_argument("--split_dir", type=Path, required=True, metavar="DIR", help="folder holding the split's list files")
    parser.add_argument("--output_dir", type=Path, required=True, metavar="DIR",
                        help="where to save_to_disk the DatasetDict, its README.md and summary.json")
    parser.add_argument("--text_source", choices=("ascii", "xml"), default="ascii",
                        help="ascii (default): lines.txt with | replaced by a space, the paper's ground "
                        "truth; xml: the XML transcriptions, normal spacing")
    parser.add_argument("--drop_err", action="store_true",
                        help="drop lines whose IAM word segmentation is 'err' "
                        "(kept by default, as in the paper)")
    parser.add_argument("--allow_missing", action="store_true",
                        help="skip listed ids without ground truth or image instead of stopping; "
                        "they are reported in missing_report.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous output of this script in --output_dir")
    parser.add_argument("--push_to_hub", metavar="REPO",
                        help="also upload to this Hugging Face Hub dataset repo (private unless --public)")
    parser.add_argument("--public", action="store_true",
                        help="make the --push_to_hub repo public; IAM's terms forbid redistribution, "
                        "so only for data you may publish")
    return parser.parse_args(argv)


def group_by_form(line_ids: Iterable[str]) -> dict[str, list[str]]:
    lines_of_form: dict[str, list[str]] = {}
    for line_id in line_ids:
        lines_of_form.setdefault(form_of(line_id), []).append(line_id)
    return lines_of_form


def use_xml_text(ground_truth: dict, forms: dict) -> dict:
    """Swap in the XML transcriptions; a line the XML lacks then has no ground truth."""
    xml_texts = {line_id: text for _, texts in forms.values() for line_id, text in texts.items()}
    return {
        line_id: (segmentation, xml_texts[line_id])
        for line_id, (segmentation, _) in ground_truth.items()
        if line_id in xml_texts
    }


def drop_err_lines(split_ids: dict, ground_truth: dict) -> tuple[dict, int]:
    kept = {split: [i for i in ids if ground_truth[i][0] != "err"] for split, ids in split_ids.items()}
    dropped = {split: len(ids) - len(kept[split]) for split, ids in split_ids.items()}
    print(f"dropped {sum(dropped.values())} err lines ({', '.join(f'{s} {n}' for s, n in dropped.items())})")
    return kept, sum(dropped.values())


def run(args: argparse.Namespace) -> None:
    check_output_dir(args.output_dir, args.overwrite)
    lists = read_split_lists(args.split_dir, args.split)
    ground_truth, gt_origin = read_ground_truth(args.iam_root)
    lines_of_form = group_by_form(ground_truth)
    split_ids = {split: expand(entries, lines_of_form) for split, (_, entries) in lists.items()}
    check_disjoint(split_ids)
    wanted = {line_id for ids in split_ids.values() for line_id in ids}

    forms, xml_origin = read_xml_forms(args.iam_root, {form_of(i) for i in wanted}) or ({}, None)
    if args.text_source == "xml":
        if xml_origin is None:
            raise PrepareError(
                f"--text_source xml needs {args.iam_root / 'xml'} or {args.iam_root / 'xml.tgz'}"
            )
        ground_truth = use_xml_text(ground_truth, forms)
    writers = {form: writer for form, (writer, _) in forms.items()}

    images = open_images(args.iam_root, wanted)
    groups = {split: classify(ids, ground_truth, images) for split, ids in split_ids.items()}
    report = missing_report(lists, groups)
    if report and not args.allow_missing:
        raise PrepareError(f"{describe_missing(report)}; pass --allow_missing to skip them")
    split_ids = {split: found["ok"] for split, found in groups.items()}
    empty = [split for split, ids in split_ids.items() if not ids]
    if empty:
        raise PrepareError(f"no line of split(s) {', '.join(empty)} has both ground truth and an image: "
                           f"{describe_missing(report)}")
    notes = []
    if report:
        skipped = sum(len(entry["no_ground_truth"]) + len(entry["no_image"]) for entry in report.values())
        print(f"skipped {skipped} listed ids without ground truth or image: {describe_missing(report)}")
        notes.append(f"{skipped} listed lines were skipped for lack of ground truth or image.")
    if args.drop_err:
        split_ids, dropped = drop_err_lines(split_ids, ground_truth)
        notes.append(f"{dropped} lines that IAM marks `err` were dropped.")
    else:
        notes.append("Lines that IAM marks `err` are kept, as in the paper.")

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as cache_dir:
        dataset = build(split_ids, ground_truth, writers, images, cache_dir)
        if args.output_dir.exists():  # check_output_dir allowed it: empty, or a previous output
            shutil.rmtree(args.output_dir)
        dataset.save_to_disk(str(args.output_dir))
    dataset = datasets.load_from_disk(str(args.output_dir))  # the saved copy outlives the temporary cache

    summary = summarize(split_ids, ground_truth)
    origins = [images.origin, gt_origin, *([xml_origin] if xml_origin else [])]
    card = dataset_card(args, origins, summary, notes)
    (args.output_dir / "README.md").write_text(card, encoding="utf-8")
    details = {"split": args.split, "text_source": args.text_source, "drop_err": args.drop_err}
    (args.output_dir / "summary.json").write_text(json.dumps({**details, **summary}, indent=2) + "\n")
    if report:
        (args.output_dir / "missing_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.push_to_hub:
        if args.public:
            print("warning: IAM's terms allow non-commercial research use only; "
                  "a public repo redistributes it", file=sys.stderr)
        push(dataset, card, args.push_to_hub, private=not args.public)
    print(f"saved to {args.output_dir}\n{summary_table(summary)}")


def main(argv: list[str] | None = None) -> int:
    """0, or 2 for bad input (one `error:` line on stderr)."""
    return run_cli(lambda args: run(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
