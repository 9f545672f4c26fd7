"""make_synthetic.py: handwriting fonts, reproducible rendering, the font column, the built-in default."""

import random
import shutil

import numpy as np
import pytest
from datasets import load_from_disk
from PIL import Image, ImageDraw, ImageFont

import make_synthetic
from make_synthetic import BUILTIN, HANDWRITING_FONTS

# Lower case letters drawn with another shape than their capital, and those drawn as a smaller capital.
SHAPED = "abdeghnqrt"
SCALED = "cosuvwxz"


def make(path, *argv, lines=("8", "2", "2")):
    """A small dataset rendered by main() into `path`, loaded back."""
    counts = ["--num_train", lines[0], "--num_validation", lines[1], "--num_test", lines[2]]
    make_synthetic.main(["--output_dir", str(path), *counts, *argv])
    return load_from_disk(str(path))


def pixels(split) -> list[np.ndarray]:
    return [np.asarray(image) for image in split["image"]]


def files(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_same_arguments_give_the_same_dataset_byte_for_byte(tmp_path):
    argv = ["--fonts", "all", "builtin", "--seed", "5"]
    make(tmp_path / "one", *argv)
    make(tmp_path / "two", *argv)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    other = make(tmp_path / "other", "--fonts", "all", "builtin", "--seed", "6")
    first = load_from_disk(str(tmp_path / "one"))
    assert other["train"]["text"] != first["train"]["text"]


def test_another_font_draws_the_same_texts_differently(tmp_path):
    caveat = make(tmp_path / "caveat", "--fonts", "caveat")
    kalam = make(tmp_path / "kalam", "--fonts", "kalam")
    assert caveat["train"]["text"] == kalam["train"]["text"]
    for a, b in zip(pixels(caveat["train"]), pixels(kalam["train"])):
        assert a.shape != b.shape or not np.array_equal(a, b)


def test_every_font_draws_a_line_of_its_own():
    text = "Where them move by , Again day ! 1510"
    fonts = make_synthetic.named_fonts([BUILTIN, "all"])
    images = [np.asarray(make_synthetic.render_line(text, font, random.Random(1), (640, 64))) for font in fonts]
    for i in range(len(images)):
        for j in range(i):
            assert not np.array_equal(images[i], images[j]), (fonts[i].name, fonts[j].name)


def test_the_font_column_names_the_font_of_each_line(tmp_path):
    single = make(tmp_path / "single", "--fonts", "indie-flower")
    assert {name for split in single.values() for name in split["font"]} == {"indie-flower"}
    mixed = make(tmp_path / "mixed", "--fonts", "zeyada", "builtin", "kalam", lines=("40", "2", "2"))
    assert set(mixed["train"]["font"]) == {"zeyada", "builtin", "kalam"}
    assert mixed["train"].column_names == ["image", "text", "id", "font"]


def test_fonts_of_a_folder_are_named_by_their_file(tmp_path):
    folder = tmp_path / "fonts"
    folder.mkdir()
    shutil.copy(make_synthetic.font_file("kalam"), folder / "MyHand.ttf")
    dataset = make(tmp_path / "data", "--font_dir", str(folder))
    assert set(dataset["train"]["font"]) == {"MyHand"}


def test_an_unknown_font_is_named_with_the_available_ones(tmp_path):
    with pytest.raises(SystemExit) as stop:
        make(tmp_path / "data", "--fonts", "caveat", "comic-sans")
    message = str(stop.value)
    assert "unknown font 'comic-sans'" in message and "'caveat'" not in message
    for name in [BUILTIN, *HANDWRITING_FONTS, "all"]:
        assert name in message
    assert not (tmp_path / "data").exists()


def test_a_missing_font_package_names_the_package(monkeypatch):
    import fontpkg

    def not_installed(name, *args, **kwargs):
        raise fontpkg.FamilyNotInstalled(name)

    monkeypatch.setattr(fontpkg, "path", not_installed)
    with pytest.raises(SystemExit, match="pip install fontpkg-zeyada"):
        make_synthetic.named_fonts(["zeyada"])


def test_list_fonts_names_every_font_as_installed(capsys):
    make_synthetic.main(["--list_fonts"])
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(listed) == {BUILTIN, *HANDWRITING_FONTS, "all"}
    for name, package in HANDWRITING_FONTS.items():
        assert package in listed[name] and "installed:" in listed[name]


def glyph(font: ImageFont.FreeTypeFont, letter: str) -> Image.Image:
    """One letter's ink, cropped to it."""
    page = Image.new("L", (240, 240), 0)
    ImageDraw.Draw(page).text((60, 170), letter, font=font, fill=255, anchor="ls")
    return page.crop(page.getbbox())


def overlap(font: ImageFont.FreeTypeFont, letter: str) -> float:
    """How much of a lower case letter and its capital coincide once both are scaled to one box."""
    lower, upper = (np.asarray(glyph(font, c).resize((24, 24))) > 96 for c in (letter, letter.upper()))
    return (lower & upper).sum() / (lower | upper).sum()


@pytest.mark.parametrize("name", HANDWRITING_FONTS)
def test_every_font_keeps_upper_and_lower_case_apart(name):
    font = ImageFont.truetype(str(make_synthetic.font_file(name)), 80)
    # A small-caps font (Permanent Marker) overlaps at 0.94 or more: the shapes must differ.
    shapes = {letter: round(overlap(font, letter), 2) for letter in SHAPED}
    assert max(shapes.values()) < 0.8, shapes
    # Letters such as o / O differ by size alone: the lower case must be clearly smaller.
    heights = {letter: round(glyph(font, letter).height / glyph(font, letter.upper()).height, 2) for letter in SCALED}
    assert max(heights.values()) < 0.9, heights


@pytest.mark.parametrize("canvas", [None, (512, 48)])
def test_no_letter_is_cut_at_the_top_or_bottom(canvas):
    rng = random.Random(0)
    for font in make_synthetic.named_fonts(["all"]):
        for _ in range(12):
            image = None
            while image is None:
                text = make_synthetic.random_text(rng, 2, 5, "english")
                image = make_synthetic.render_line(text + " Jgyf", font, rng, canvas)
            rows = np.asarray(image)
            assert rows[[0, -1]].min() > 120, (font.name, text)
            assert rows.min() < 120, (font.name, text)  # and there is ink


def test_strips_keep_their_size_in_every_font(tmp_path):
    dataset = make(tmp_path / "data", "--fonts", "all", "--canvas_width", "600", "--canvas_height", "56")
    assert {image.size for split in dataset.values() for image in split["image"]} == {(600, 56)}
    assert {image.mode for image in dataset["train"]["image"]} == {"L"}


def test_the_builtin_font_stays_the_default(tmp_path):
    dataset = make(tmp_path / "data", lines=("3", "1", "1"))
    train = dataset["train"]
    assert set(train["font"]) == {BUILTIN}
    # The texts and line heights of the demo data before handwriting fonts were added.
    assert train["text"] == ["Close for over into found", "On against market 's did", "Against come"]
    assert [image.height for image in train["image"]] == [48, 58, 54]
    assert {image.mode for image in train["image"]} == {"L"}
