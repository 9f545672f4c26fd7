"""The data check: one pass over every split before training that finds the lines the data
path would fail on or learn nothing from, names each one in `<output_dir>/data_report.json`,
and skips, keeps or stops on them as the recipe's `on_<problem>` keys say. It also names the
lines whose image the data path converts with a loss (a 16-bit page scaled to 8 bits): a
notice, which never skips nor stops a line.

Images are read from their raw bytes (the dataset's Image column with decode=False), so a
truncated PNG is one named line instead of a crash in a dataloader worker hours later.
The pass runs in `preprocessing_num_workers` processes; its findings are cached next to
the split's cache files (or in output_dir for an in-memory split) under a key made of the
split's fingerprint, the tokenizer and the settings, so a second run does not decode every
image again."""

import io
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from datasets import DatasetDict
from datasets import Image as ImageFeature
from datasets import Value
from datasets.fingerprint import Hasher
from PIL import Image

from .augment import SIXTEEN_BIT, to_gray_or_rgb
from .data import encode_labels, line_ids
from .errors import atomic_write_text

logger = logging.getLogger("trocr_recipe")

REPORT = "data_report.json"
PROBLEMS = ("undecodable_image", "bad_image_size", "empty_text", "unknown_tokens", "label_too_long")
# Findings that are information, not problems: no `on_<notice>` key, never a bad line; each
# is listed with this action, whatever happens to its line.
NOTICES = ("converted_image",)
NOTICE_ACTION = "converted"
# Image modes the data path converts with a loss, and what it does to them (augment.py).
LOSSY_MODES = {
    **{mode: f"mode {mode} scaled to 8 bits" for mode in SIXTEEN_BIT + ("F",)},
    "CMYK": "mode CMYK converted to RGB without a colour profile",
}
CACHE_VERSION = 2  # part of the cache key: raise it when a check changes
EXAMPLES = 5  # line ids shown per table row and error message


class BadDataError(SystemExit):
    """The data check stops the run; `lines` names the lines that stop it, each a dict with
    split, id, row, problem and detail (as in data_report.json)."""

    def __init__(self, message: str, lines: list[dict]):
        super().__init__(message)
        self.lines = lines


@dataclass
class LineCheck:
    """The problems and notices of a batch of lines, as a `datasets.map` function: a list of
    their names and one of details per line."""

    image_column: str
    text_column: str
    tokenizer: object
    max_target_length: int
    max_image_side: int
    max_aspect_ratio: float

    def __call__(self, batch: dict) -> dict:
        raw_texts = batch[self.text_column]
        texts = [text if isinstance(text, str) else "" for text in raw_texts]
        labels, truncated = encode_labels(self.tokenizer, texts, self.max_target_length)
        findings, details = [], []
        for cell, raw, text, ids, cut in zip(batch[self.image_column], raw_texts, texts, labels, truncated):
            found = [self.image_finding(cell)]
            if not text.strip():
                found.append(("empty_text", f"text {json.dumps(raw)}"))
            elif self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
                found.append(("unknown_tokens", f"no token for {self.unknown_characters(text)!r}"))
            if cut:
                found.append(("label_too_long", f"more than max_target_length={self.max_target_length} tokens"))
            found = [finding for finding in found if finding]
            findings.append([name for name, _ in found])
            details.append([detail for _, detail in found])
        return {"findings": findings, "details": details}

    def image_finding(self, cell: dict | None) -> tuple[str, str] | None:
        """The image's problem, else a converted_image notice for a mode converted with a loss."""
        if not cell or not (cell.get("bytes") or cell.get("path")):
            return "undecodable_image", "no image"
        try:
            with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
                # The size is in the header: an absurd one is caught before decoding it.
                size = self.size_problem(*image.size)
                if size:
                    return "bad_image_size", size
                image.load()
                to_gray_or_rgb(image)  # the data path's first step: every mode it cannot convert is bad too
        except Exception as error:  # whatever PIL raises on a broken file, the data path would raise as well
            return "undecodable_image", f"{type(error).__name__}: {error}"
        return ("converted_image", LOSSY_MODES[image.mode]) if image.mode in LOSSY_MODES else None

    def size_problem(self, width: int, height: int) -> str | None:
        if min(width, height) < 1:
            return f"{width}x{height} pixels: an empty image"
        if max(width, height) > self.max_image_side:
            return f"{width}x{height} pixels: a side above max_image_side={self.max_image_side}"
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            return f"{width}x{height} pixels: an aspect ratio above max_aspect_ratio={self.max_aspect_ratio:g}"
        return None

    def unknown_characters(self, text: str) -> str:
        """The characters the tokenizer maps to its unknown token."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        unknown = self.tokenizer.unk_token_id
        spans = zip(encoding["input_ids"], encoding["offset_mapping"])
        return "".join(dict.fromkeys(text[start:end] for token, (start, end) in spans if token == unknown))


def check_columns(split, role: str, data_args) -> None:
    """The image column must hold images and the text column strings: another column of
    that name (a path, a label id) would fail deep inside the data path."""
    features = split.features
    if not isinstance(features[data_args.image_column], ImageFeature):
        raise SystemExit(
            f"{data_args.dataset_name}: column '{data_args.image_column}' of the {role} split holds "
            f"{features[data_args.image_column]}, not images (image_column)"
        )
    text = features[data_args.text_column]
    if not (isinstance(text, Value) and text.dtype in ("string", "large_string")):
        raise SystemExit(
            f"{data_args.dataset_name}: column '{data_args.text_column}' of the {role} split holds {text}, "
            "not strings (text_column)"
        )


def check_lines(split, role: str, check: LineCheck, num_proc: int | None, fallback_dir: str) -> list[list]:
    """[row, name, detail] for every problem and notice of the split, from the cache when
    this split was checked with these settings before."""
    folder = os.path.dirname(split.cache_files[0]["filename"]) if split.cache_files else fallback_dir
    key = Hasher.hash([CACHE_VERSION, split._fingerprint, check])
    cache = Path(folder) / f"data_check-{key}.json"
    if cache.exists():
        found = read_cache(cache)
        if found is not None:
            logger.info("Data check of %s: cached result %s", role, cache)
            return found
        logger.warning("Data check of %s: the cache %s cannot be read (a run killed while writing it?): checking "
                       "the lines again and replacing it", role, cache)
    raw = split.cast_column(check.image_column, ImageFeature(decode=False))
    checked = raw.map(
        check, batched=True, num_proc=num_proc, remove_columns=raw.column_names, keep_in_memory=True,
        desc=f"Checking {role} lines",
    )
    found = [
        [row, name, detail]
        for row, (names, details) in enumerate(zip(checked["findings"], checked["details"]))
        for name, detail in zip(names, details)
    ]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(found))
    except OSError as error:
        logger.warning("Data check of %s not cached: %s", role, error)
    return found


def read_cache(path: Path) -> list[list] | None:
    """A data check cache: a list of [row, name, detail], or None when it is anything else."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    valid = isinstance(found, list) and all(
        isinstance(item, list) and len(item) == 3 and isinstance(item[0], int) and isinstance(item[1], str)
        for item in found
    )
    return found if valid else None


def _examples(ids: list[str]) -> str:
    more = f" (+{len(ids) - EXAMPLES} more)" if len(ids) > EXAMPLES else ""
    return ", ".join(ids[:EXAMPLES]) + more


def _grouped(lines: list[dict], *keys: str) -> dict[tuple, list[str]]:
    """The line ids per value of `keys`, in order."""
    groups = defaultdict(list)
    for line in lines:
        groups[tuple(line[key] for key in keys)].append(line["id"])
    return groups


def format_table(lines: list[dict], summary: dict) -> str:
    rows = [("problem", "split", "lines", "action", "example ids")]
    rows += [
        (problem, split, str(len(ids)), action, _examples(ids))
        for (problem, split, action), ids in _grouped(lines, "problem", "split", "action").items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4] for row in rows]
    totals = ", ".join(f"{role} {counts['skipped_lines']} of {counts['lines']}" for role, counts in summary.items())
    return "\n".join(table + [f"lines skipped: {totals}"])


def check_splits(splits: DatasetDict, tokenizer, data_args, output_dir: str, write_report: bool = True):
    """Checks every split; returns the splits without their skipped lines and how many lines
    each lost. Writes data_report.json (if `write_report`) and prints a table of the
    problems and notices. Raises BadDataError for a line whose problem is set to `error`,
    and when a split would lose more than max_bad_fraction of its lines."""
    check = LineCheck(
        data_args.image_column, data_args.text_column, tokenizer, data_args.max_target_length,
        data_args.max_image_side, data_args.max_aspect_ratio,
    )
    policies = {problem: getattr(data_args, f"on_{problem}") for problem in PROBLEMS}
    lines, summary, skipped_rows = [], {}, {}
    for role, split in splits.items():
        check_columns(split, role, data_args)
        by_row, notices = defaultdict(list), []
        for row, name, detail in check_lines(split, role, check, data_args.preprocessing_num_workers, output_dir):
            if name in NOTICES:
                notices.append((row, name, detail))
            else:
                by_row[row].append((name, detail))
        ids = line_ids(split, data_args.id_column) if by_row or notices else []
        skipped_rows[role] = set()
        for row, found in sorted(by_row.items()):
            actions = {policies[problem] for problem, _ in found}
            action = "error" if "error" in actions else "skipped" if "skip" in actions else "kept"
            if action == "skipped":
                skipped_rows[role].add(row)
            lines += [
                {"split": role, "id": ids[row], "row": row, "problem": problem, "detail": detail, "action": action}
                for problem, detail in found
            ]
        lines += [
            {"split": role, "id": ids[row], "row": row, "problem": name, "detail": detail, "action": NOTICE_ACTION}
            for row, name, detail in notices
        ]
        summary[role] = {
            "lines": len(split),
            "bad_lines": len(by_row),
            "skipped_lines": len(skipped_rows[role]),
            "problems": dict(Counter(problem for found in by_row.values() for problem, _ in found)),
            "notices": dict(Counter(name for _, name, _ in notices)),
        }

    report_path = os.path.join(output_dir, REPORT)
    if write_report:
        os.makedirs(output_dir, exist_ok=True)
        settings = {f"on_{problem}": policy for problem, policy in policies.items()}
        limits = ("max_target_length", "max_image_side", "max_aspect_ratio", "max_bad_fraction")
        settings.update({key: getattr(data_args, key) for key in limits})
        report = {"settings": settings, "splits": summary, "lines": lines}
        atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if lines:
        found = any(line["action"] != NOTICE_ACTION for line in lines)  # notices alone are no warning
        logger.log(
            logging.WARNING if found else logging.INFO, "Data check: %s (every line is named in %s)\n%s",
            "problems found" if found else "no problem, some images converted", report_path,
            format_table(lines, summary),
        )
    else:
        logger.info("Data check: no problem in %s lines", " + ".join(str(counts["lines"]) for counts in summary.values()))

    stopping = [line for line in lines if line["action"] == "error"]
    if stopping:
        named = "; ".join(
            f"{problem} in {split} (on_{problem}=error): {_examples(ids)}"
            for (problem, split), ids in _grouped(stopping, "problem", "split").items()
        )
        raise BadDataError(f"Data check: {named}. Every line is named in {report_path}.", stopping)
    for role, counts in summary.items():
        if counts["skipped_lines"] > data_args.max_bad_fraction * counts["lines"]:
            bad = [line for line in lines if line["split"] == role and line["action"] == "skipped"]
            ids = list(dict.fromkeys(line["id"] for line in bad))
            raise BadDataError(
                f"Data check: the {role} split would lose {counts['skipped_lines']} of its {counts['lines']} lines, "
                f"more than max_bad_fraction={data_args.max_bad_fraction:g} ({_examples(ids)}): "
                f"wrong data or settings rather than a few bad lines. Every line is named in {report_path}.",
                bad,
            )
    kept = DatasetDict({
        role: split.select(sorted(set(range(len(split))) - skipped_rows[role])) if skipped_rows[role] else split
        for role, split in splits.items()
    })
    return kept, {role: len(rows) for role, rows in skipped_rows.items()}

