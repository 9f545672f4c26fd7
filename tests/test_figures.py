"""The run's figures: worst lines of a split and training curves. No model needed."""

from PIL import Image, ImageDraw

from trocr_recipe.figures import WIDTH, differing_characters, training_curves_figure, worst_lines_figure


def line_image(text: str, width: int = 300, height: int = 40) -> Image.Image:
    image = Image.new("L", (width, height), 255)
    ImageDraw.Draw(image).text((5, 10), text, fill=0)
    return image


def lines(count: int):
    references = [f"line number {i} of the page" for i in range(count)]
    predictions = [ref if i % 3 else ref.replace("line", "lime") for i, ref in enumerate(references)]
    cers = [float(i % 5) for i in range(count)]
    ids = [f"id-{i}" for i in range(count)]
    return [line_image(ref) for ref in references], references, predictions, ids, cers


def test_worst_line_first_and_height_grows_with_lines(tmp_path):
    images, references, predictions, ids, cers = lines(10)
    cers[7] = 250.0
    drawn = worst_lines_figure(tmp_path / "worst_test.png", images, references, predictions, ids, cers, top=4)
    # Highest CER first, ties in split order.
    assert drawn == ["id-7", "id-4", "id-9", "id-3"]
    few = worst_lines_figure(tmp_path / "worst_2.png", images, references, predictions, ids, cers, top=2)
    assert few == drawn[:2]
    with Image.open(tmp_path / "worst_test.png") as four, Image.open(tmp_path / "worst_2.png") as two:
        assert four.width == two.width == WIDTH
        assert 300 < two.height < four.height < 2000


def test_long_text_wraps_and_wide_images_are_scaled(tmp_path):
    images, references, predictions, ids, cers = lines(2)
    short_path, long_path = tmp_path / "short.png", tmp_path / "long.png"
    worst_lines_figure(short_path, images, references, predictions, ids, cers)
    references[0] = predictions[0] = "a long line of text " * 40
    images[0] = line_image("wide", width=20000, height=60)
    assert worst_lines_figure(long_path, images, references, predictions, ids, cers) == ["id-1", "id-0"]
    with Image.open(short_path) as short, Image.open(long_path) as long:
        assert long.width == WIDTH  # the 20000-pixel image is scaled down to the figure
        assert long.height > short.height  # the 800 characters wrap onto more rows


def test_differing_characters_are_marked():
    in_reference, in_prediction = differing_characters("hey presto !", "hey presto!")
    assert [c for c, marked in zip("hey presto !", in_reference) if marked] == [" "]
    assert not any(in_prediction)
    in_reference, in_prediction = differing_characters("cat", "cart")
    assert in_reference == [False, False, False] and in_prediction == [False, False, True, False]


def test_training_curves_with_and_without_evaluation(tmp_path):
    loss_rows = [{"step": s, "loss": 5.0 / s, "learning_rate": 1e-5 * s, "epoch": s / 10} for s in range(1, 31)]
    eval_rows = [{"step": 10, "eval_cer": 40.0}, {"step": 20, "eval_cer": 25.0}]
    for name, evals in (("curves.png", eval_rows), ("no_eval.png", [])):
        path = training_curves_figure(tmp_path / name, loss_rows, evals)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 500 and image.height > 500
    # Nothing logged at all still gives a figure.
    with Image.open(training_curves_figure(tmp_path / "empty.png", [], [])) as image:
        assert image.height > 500
