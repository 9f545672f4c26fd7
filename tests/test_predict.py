"""predict.py in-process: a folder of line images with bad files among them, JSONL output,
generation overrides, and a dataset split."""

import json

import pytest
import torch
from datasets import load_from_disk
from PIL import Image
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

import predict
from trocr_recipe.augment import resize_to_tensor, to_rgb
from trocr_recipe.data import OcrCollator, image_size
from trocr_recipe.metrics import corpus_cer

GENERATION = dict(num_beams=2, max_length=12, min_new_tokens=4)


@pytest.fixture(scope="module")
def reading_model(tiny_model, tmp_path_factory):
    """The tiny model with its cross-attention amplified, so that different lines get
    different transcriptions (the untrained model writes the same text for every image)
    and a mix-up of images and names would show; its generation config sets beams and
    length, which predict.py must follow."""
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    attention = model.decoder.model.decoder.layers[0].encoder_attn
    with torch.no_grad():
        attention.v_proj.weight.mul_(10)
        attention.out_proj.weight.mul_(10)
    model.generation_config.update(**GENERATION)
    path = tmp_path_factory.mktemp("models") / "reading"
    model.save_pretrained(path)
    TrOCRProcessor.from_pretrained(tiny_model).save_pretrained(path)
    return path


@pytest.fixture
def line_folder(tiny_data, tmp_path):
    """Three test lines as PNG, JPEG and TIFF (one in a subfolder), a truncated PNG, a text
    file named .png, and a .txt file that is not looked at."""
    test = load_from_disk(str(tiny_data))["test"]
    folder = tmp_path / "lines"
    (folder / "sub").mkdir(parents=True)
    good = [folder / "a.png", folder / "b.jpg", folder / "sub" / "c.tif"]
    for index, path in enumerate(good):
        test[index]["image"].save(path)
    data = good[0].read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("not an image")
    (folder / "readme.txt").write_text("not an image either")
    return folder, [str(path) for path in good], [str(folder / "broken.png"), str(folder / "notes.png")]


def direct_transcriptions(model_path, files, batch_size, **generate_kwargs):
    """`model.generate` on the recipe's evaluation tensors (bicubic resize, collator
    normalization), batch by batch, decoded without clean-up."""
    model = VisionEncoderDecoderModel.from_pretrained(model_path).eval()
    processor = TrOCRProcessor.from_pretrained(model_path)
    collator = OcrCollator.from_image_processor(processor.image_processor)
    size = image_size(processor.image_processor)
    texts = []
    for start in range(0, len(files), batch_size):
        images = [to_rgb(Image.open(path)) for path in files[start : start + batch_size]]
        features = [{"pixel_values": resize_to_tensor(image, size), "labels": [2]} for image in images]
        pixel_values = collator(features)["pixel_values"]
        # The collator normalizes as the processor does (the processor's resize left out).
        resized = [image.resize(size[::-1], Image.BICUBIC) for image in images]
        by_processor = processor(images=resized, do_resize=False, return_tensors="pt").pixel_values
        assert torch.allclose(pixel_values, by_processor, atol=1e-5)
        with torch.no_grad():
            ids = model.generate(pixel_values=pixel_values, **generate_kwargs)
        texts += processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return texts


def test_folder_to_stdout_skips_bad_files(reading_model, line_folder, capsys):
    folder, good, bad = line_folder
    assert predict.main([str(reading_model), str(folder), "--batch_size", "2"]) == 0
    out, err = capsys.readouterr()

    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == good  # sorted, recursive, images only
    expected = direct_transcriptions(reading_model, good, batch_size=2, **GENERATION)
    assert len(set(expected)) > 1, "the test model must read the lines differently for this test to mean anything"
    assert [line.split("\t", 1)[1] for line in lines] == expected

    for path in bad:
        assert f"skipped {path}: " in err
    assert "image file is truncated" in err and "cannot identify image file" in err
    assert "transcribed 3 image(s), skipped 2 unreadable" in err


def test_jsonl_output_with_overrides(reading_model, line_folder, tmp_path, capsys):
    folder, good, bad = line_folder
    output = tmp_path / "preds.jsonl"
    argv = [str(reading_model), *good, *bad, "--output", str(output), "--num_beams", "1", "--max_length", "6"]
    assert predict.main(argv) == 0
    assert capsys.readouterr().out == ""

    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["path"] for row in rows] == good  # files in the order given
    overrides = dict(GENERATION, num_beams=1, max_length=6)
    assert [row["prediction"] for row in rows] == direct_transcriptions(reading_model, good, 16, **overrides)

    skipped = json.loads((tmp_path / "preds.jsonl.skipped.json").read_text())
    assert skipped["count"] == 2
    assert [entry["path"] for entry in skipped["skipped"]] == bad


def test_nothing_readable_exits_1(reading_model, line_folder, capsys):
    _, _, bad = line_folder
    assert predict.main([str(reading_model), *bad]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no image could be read" in err


def test_dataset_split_gives_one_row_per_line_with_ids_and_its_cer(reading_model, tiny_data, tmp_path, capsys):
    output = tmp_path / "test.jsonl"
    argv = [str(reading_model), "--dataset", str(tiny_data), "--split", "test", "--output", str(output)]
    assert predict.main(argv) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    test = load_from_disk(str(tiny_data))["test"]
    assert [row["id"] for row in rows] == list(test["id"])
    assert [row["reference"] for row in rows] == list(test["text"])
    assert all(isinstance(row["prediction"], str) for row in rows)
    cer = corpus_cer(list(test["text"]), [row["prediction"] for row in rows])
    assert f"test: CER {cer:.2f} WER " in capsys.readouterr().err
    assert json.loads((tmp_path / "test.jsonl.skipped.json").read_text())["count"] == 0


def test_inputs_or_dataset_is_required(reading_model):
    with pytest.raises(SystemExit):
        predict.parse_args([str(reading_model)])


def test_a_checkpoint_starting_from_bos_is_corrected_with_a_log_line(bos_start_model, caplog):
    with caplog.at_level("WARNING", logger="trocr_recipe"):
        loaded, _ = predict.load_for_inference(str(bos_start_model))
    assert loaded.generation_config.decoder_start_token_id == 2
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "model.generation_config.decoder_start_token_id 0 -> 2" in logged


def test_a_plain_forward_with_labels_works_on_the_tiny_model(tiny_model, processor):
    """The top-level config carries the special tokens, as the Hub's TrOCR checkpoints do."""
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    pixel_values = processor(images=Image.new("RGB", (200, 32), "white"), return_tensors="pt").pixel_values
    labels = torch.tensor([[5, 6, 7, processor.tokenizer.eos_token_id]])
    loss = model(pixel_values=pixel_values, labels=labels).loss
    assert torch.isfinite(loss) and loss > 0
