"""A miniature IAM database in the official layout, for tests that must not need the real one.

`build_iam(base)` writes under `base`:

    iam/lines/<writer>/<form>/<line>.png   grayscale 200x30 PNGs with the text drawn
    iam/ascii/lines.txt                    the real comment header, ok and err lines, no final newline
    iam/xml/<form>.xml                     ISO-8859-1, writer-id, &quot; &amp; &apos; entities
    aachen/tr.lst va.lst te.lst            Aachen lists; tr.lst names one form id (a01-003)
    iam_task/trainset.txt ...              IAM's own task files

`archive_iam(src, dst)` packs src's folders into lines.tgz / ascii.tgz / xml.tgz in dst, with
members laid out as in the official archives (`a01/a01-000u/a01-000u-00.png`, `lines.txt`,
`a01-000u.xml`).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# (line id, segmentation, lines.txt transcription, XML text)
LINES = [
    ("a01-000u-00", "ok", "A|MOVE|to|stop|Mr.|Gaitskell|from", "A MOVE to stop Mr. Gaitskell from"),
    ("a01-000u-01", "ok", "nominating|any|more|Labour|life|Peers", "nominating any more Labour life Peers"),
    ("a01-000u-02", "ok", "is|to|be|made|at|a|meeting|of|Labour", "is to be made at a meeting of Labour"),
    # A space inside the transcription field: everything after field 8 is the text.
    ("a01-000u-03", "err", "M Ps|tomorrow|.|Mr.|Michael|Foot|has", "M Ps tomorrow. Mr. Michael Foot has"),
    ("a01-003-00", "ok", "Though|they|may|gather|some|Left-wing|support|,", "Though they may gather some Left-wing support,"),
    ("a01-003-01", "ok", "a|large|majority|of|Labour|M|Ps|are|likely|to", "a large majority of Labour M Ps are likely to"),
    ("a01-003-02", "ok", "turn|down|the|Foot-Griffiths|resolution|.", "turn down the Foot-Griffiths resolution."),
    ("b01-014-00", "ok", '"|Quite|so|,|"|he|said|&|left|.', '"Quite so," he said & left.'),
    ("b01-014-01", "ok", "You|'re|not|the|man|'s|friend", "You're not the man's friend"),
    (
        "c04-110-00",
        "err",
        "Become|a|success|with|a|disc|and|hey|presto|!|You|'re|a|star|...|.|Rolly|sings|with",
        "Become a success with a disc and hey presto! You're a star... Rolly sings with",
    ),
    ("c04-110-01", "ok", "a|voice|that|is|full|of|promise|.", "a voice that is full of promise."),
    ("c04-110-02", "err", "Rock|'n'|roll|?|Yes|!", "Rock 'n' roll? Yes!"),
    ("d01-000-00", "ok", "in|no|split|at|all", "in no split at all"),
]
WRITERS = {"a01-000u": "000", "a01-003": "001", "b01-014": "015", "c04-110": "150", "d01-000": "200"}

LINES_TXT_HEADER = """\
#--- lines.txt ---------------------------------------------------------------#
#
# iam database line information
#
# format: a01-000u-00 ok 154 19 408 746 1661 89 A|MOVE|to|stop|Mr.|Gaitskell|from
#
#     a01-000u-00  -> line id for form a01-000u
#     ok              -> result of word segmentation
#                            ok: line is correctly segmented
#                            er: segmentation of line has one or more errors
#
#     154             -> graylevel to binarize line
#     19              -> number of components for this line
#     408 746 1661 89 -> bounding box around this line in x,y,w,h format
#
#     A|MOVE|to|stop|Mr.|Gaitskell|from
#                     -> transcription for this line. word tokens are separated
#                        by the character |
#
"""

# Comments, a blank line, CRLF and a missing final newline, as copies in the wild have them.
AACHEN_LISTS = {
    "tr.lst": "# Aachen training lines\na01-000u-00\na01-000u-01\n\na01-000u-02\na01-000u-03\na01-003\n",
    "va.lst": "b01-014-00\r\nb01-014-01\r\n",
    "te.lst": "c04-110-00\nc04-110-01\nc04-110-02",
}
IAM_TASK_LISTS = {
    "trainset.txt": "a01-000u-00\na01-000u-01\na01-000u-02\na01-000u-03\na01-003-00\na01-003-01\na01-003-02\n",
    "validationset1.txt": "b01-014-00\n",
    "validationset2.txt": "b01-014-01\n",
    "testset.txt": "c04-110-00\nc04-110-01\nc04-110-02\n",
}


@dataclass
class IamPaths:
    root: Path
    aachen: Path
    iam_task: Path


def form_of(line_id: str) -> str:
    return line_id.rsplit("-", 1)[0]


def image_path(root: Path, line_id: str) -> Path:
    return root / "lines" / line_id.split("-")[0] / form_of(line_id) / f"{line_id}.png"


def lines_txt() -> str:
    records = [
        f"{line_id} {seg} 154 19 408 746 1661 89 {transcription}"
        for line_id, seg, transcription, _ in LINES
    ]
    return LINES_TXT_HEADER + "\n".join(records)


def xml_attr(text: str) -> str:
    """Escape as IAM's XML does, with named entities for quotes and apostrophes."""
    for char, entity in (("&", "&amp;"), ("<", "&lt;"), ('"', "&quot;"), ("'", "&apos;")):
        text = text.replace(char, entity)
    return text


def form_xml(form_id: str) -> bytes:
    lines = [
        f'<line id="{line_id}" segmentation="{seg}" threshold="154" text="{xml_attr(text)}">\n'
        f'<word id="{line_id}-00" tag="NN" text="{xml_attr(text.split()[0])}">'
        f'<cmp x="408" y="768" width="27" height="51"/></word>\n</line>\n'
        for line_id, seg, _, text in LINES
        if form_of(line_id) == form_id
    ]
    return (
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n'
        f'<form created="2002-01-14" height="3542" id="{form_id}" width="2479" '
        f'writer-id="{WRITERS[form_id]}">\n<machine-printed-part>\n'
        '<machine-print-line text="printed prompt"/>\n</machine-printed-part>\n'
        f"<handwritten-part>\n{''.join(lines)}</handwritten-part>\n</form>\n"
    ).encode("iso-8859-1")


def render_line(path: Path, text: str) -> None:
    image = Image.new("L", (200, 30), 255)
    ImageDraw.Draw(image).text((4, 8), text[:32], fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def write_lists(folder: Path, lists: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in lists.items():
        (folder / name).write_bytes(content.encode())
    return folder


def build_iam(base: Path) -> IamPaths:
    root = base / "iam"
    for line_id, _, _, text in LINES:
        render_line(image_path(root, line_id), text)
    (root / "ascii").mkdir(parents=True)
    (root / "ascii" / "lines.txt").write_bytes(lines_txt().encode())
    (root / "xml").mkdir()
    for form_id in WRITERS:
        (root / "xml" / f"{form_id}.xml").write_bytes(form_xml(form_id))
    return IamPaths(root, write_lists(base / "aachen", AACHEN_LISTS), write_lists(base / "iam_task", IAM_TASK_LISTS))


def archive_iam(src: Path, dst: Path) -> Path:
    """Pack src's lines/, ascii/ and xml/ the way the IAM site ships them."""
    dst.mkdir(parents=True, exist_ok=True)
    for folder in ("lines", "ascii", "xml"):
        with tarfile.open(dst / f"{folder}.tgz", "w:gz") as tar:
            for path in sorted((src / folder).rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=path.relative_to(src / folder).as_posix())
    return dst
