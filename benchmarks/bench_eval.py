#!/usr/bin/env python
"""Evaluation throughput: lines per second of generation, with the CER, for the recipe's
evaluation path against one-line-at-a-time `generate`.

    python benchmarks/bench_eval.py                  # the figure of docs/speed.md
    python benchmarks/bench_eval.py --model small    # a TrOCR-small decoder, 577 encoder positions
    python benchmarks/bench_eval.py --quick          # smoke test

- ours: what run_trocr_no_trainer.py (and, the same way, OcrTrainer with
  predict_with_generate) does: the validation split through `with_image_transforms` and
  `OcrCollator` in a DataLoader of `--batch_size` lines, `generate_predictions` (batched
  beam search as configured, key/value cache on, through `trocr_recipe.generation`: the
  encoder, its projection and the cross-attention keys and values once per line, shared
  by the line's beams; finished lines left out of the decoder's batch), corpus CER. Its
  time includes decoding and resizing the images.
- baseline: `model.generate(pixel_values)` on one line at a time, the same beams, maximum
  length and cache, on the very same pixel values (prepared beforehand and not timed), so
  that both must give the same predictions; the CERs are printed and checked equal.

The model is built offline, random weights, with a byte-level BPE tokenizer trained on
generated texts: by default (`--model demo`) the model `make demo` trains, as
data_scripts/make_tiny_model.py --preset demo builds it (ViT 2x160 on 32x384 lines, 48
patches; decoder 2x160; vocabulary 300); `--model small` puts TrOCR-small's decoder (6
layers of 256, 8 heads) behind a lighter ViT on TrOCR's 384x384 input with 16x16 patches
(577 positions; all set by flags), where on a CPU the encoder, the same in both paths,
takes most of the time. An untrained model never emits </s> and would run every
line to the maximum length, which flatters batching (no line waits for a longer one): by
default each line is made to end at its reference length, as a trained model's would
(`--lengths max` turns that off). Both paths run under the same rule.

The rows give ms per line for beams 1, 4 and 10; the last line is `bench_eval
ratio=X.XX`, baseline time over ours at `--num_beams` (default 4).
"""

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_common_args, describe_images, iam_like_lines, make_processor, median, print_table, progress, random_text,
    ratio_line, setup, synchronize,
)

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from datasets import Dataset, DatasetDict, Features, Sequence, Value, load_from_disk  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from torch.utils.data import DataLoader, SequentialSampler  # noqa: E402
from transformers import (  # noqa: E402
    LogitsProcessor, LogitsProcessorList, ViTConfig,
    VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
)

from make_tiny_model import build_model as build_tiny_model  # noqa: E402
from make_tiny_model import decoder_config  # noqa: E402
from make_tiny_model import parse_args as parse_tiny_model_args  # noqa: E402
from make_tiny_model import train_tokenizer  # noqa: E402
from run_trocr_no_trainer import generate_predictions  # noqa: E402
from trocr_recipe.data import OcrCollator, encode_labels, with_image_transforms  # noqa: E402
from trocr_recipe.metrics import corpus_cer, decode  # noqa: E402
from trocr_recipe.modeling import generation_max_length, set_special_tokens  # noqa: E402


def build_small(tokenizer, args) -> VisionEncoderDecoderModel:
    """`--model small`: TrOCR-small's decoder behind a lighter ViT on TrOCR's 384x384 input."""
    encoder = ViTConfig(
        image_size=args.size, patch_size=args.patch_size, hidden_size=args.encoder_hidden,
        num_hidden_layers=args.encoder_layers, num_attention_heads=args.encoder_heads,
        intermediate_size=4 * args.encoder_hidden, qkv_bias=True,
    )
    decoder = decoder_config(tokenizer, args.decoder_hidden, args.decoder_layers, args.decoder_heads, 512,
                             vocab_size=args.vocab_size)
    torch.manual_seed(args.seed)
    return VisionEncoderDecoderModel(config=VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))


def build(args, texts: list[str]):
    """The tokenizer, image processor and model of `--model`; the tokenizer learns from a
    "training set" of texts like the lines', not only from them."""
    rng = random.Random(args.seed)
    corpus = texts + [random_text(rng, 7, 11) for _ in range(5000)]
    if args.model == "demo":
        shape = parse_tiny_model_args(["--preset", "demo", "--dataset", "", "--output_dir", "", "--seed",
                                       str(args.seed)])
        tokenizer = train_tokenizer(corpus, shape.vocab_size)
        model, processor = build_tiny_model(tokenizer, shape), make_processor(shape.height, shape.width)
    else:
        tokenizer = train_tokenizer(corpus, args.tokenizer_vocab)
        model, processor = build_small(tokenizer, args), make_processor(args.size, args.size)
    set_special_tokens(model, tokenizer)
    return tokenizer, processor, model.eval()


def describe_model(model) -> str:
    encoder, decoder = model.config.encoder, model.config.decoder
    image, patch = encoder.image_size, encoder.patch_size
    image, patch = [image] * 2 if isinstance(image, int) else image, [patch] * 2 if isinstance(patch, int) else patch
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"{parameters:.1f}M parameters; encoder {encoder.num_hidden_layers}x{encoder.hidden_size} on "
            f"{image[0]}x{image[1]}/{patch[0]}x{patch[1]} ({model.encoder.embeddings.patch_embeddings.num_patches} "
            f"patches), decoder {decoder.decoder_layers}x{decoder.d_model}, vocabulary {decoder.vocab_size}")


class ReferenceLengths(LogitsProcessor):
    """Each line ends with </s> at its reference length (labels: text tokens + </s>), as a
    trained model's lines would, and only ids the tokenizer knows are generated. Lines come
    in dataset order, batch after batch: a new `generate` call takes the next lines."""

    def __init__(self, lengths: list[int], num_beams: int, eos_token_id: int, known_ids: int, force: bool):
        self.lengths, self.num_beams, self.eos, self.known_ids, self.force = lengths, num_beams, eos_token_id, known_ids, force
        self.reset()

    def reset(self):
        self.next_line, self.current = 0, None

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == 1:  # the first step of a generate call: its lines
            lines = input_ids.shape[0] // self.num_beams
            lengths = torch.tensor(self.lengths[self.next_line:self.next_line + lines], device=scores.device)
            self.current = lengths.repeat_interleave(self.num_beams)
            self.next_line += lines
        scores[:, self.known_ids:] = -math.inf
        if self.force:
            generated = input_ids.shape[1] - 1  # tokens after the decoder start token
            finish = generated >= self.current - 1
            scores[~finish, self.eos] = -math.inf
            scores[finish] = -math.inf
            scores[finish, self.eos] = 0.0
        return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=32, help="Validation lines per measurement (one batch of 32 by default).")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="Evaluation batch (recipes/small.json: per_device_eval_batch_size 32).")
    parser.add_argument("--num_beams", type=int, default=4, help="Beams of the ratio line.")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4, 10], help="Beam counts in the table.")
    parser.add_argument("--lengths", choices=("reference", "max"), default="reference",
                        help="Lines end at their reference length (a trained model), or run to the maximum length.")
    parser.add_argument("--model", choices=("demo", "small"), default="demo",
                        help="demo: the model `make demo` trains (make_tiny_model.py --preset demo); small: "
                             "TrOCR-small's decoder behind a lighter ViT on 384x384 (its flags: below).")
    small = parser.add_argument_group("--model small", "Its shape and vocabulary (not used by --model demo).")
    small.add_argument("--size", type=int, default=384, help="Model input size (TrOCR: 384x384).")
    small.add_argument("--patch_size", type=int, default=16, help="ViT patch size (TrOCR: 16).")
    small.add_argument("--encoder_hidden", type=int, default=192, help="ViT width (TrOCR-small: 384).")
    small.add_argument("--encoder_layers", type=int, default=4, help="ViT layers (TrOCR-small: 12).")
    small.add_argument("--encoder_heads", type=int, default=3, help="ViT heads (TrOCR-small: 6).")
    small.add_argument("--decoder_hidden", type=int, default=256, help="Decoder width (TrOCR-small: 256).")
    small.add_argument("--decoder_layers", type=int, default=6, help="Decoder layers (TrOCR-small: 6).")
    small.add_argument("--decoder_heads", type=int, default=8, help="Decoder heads (TrOCR-small: 8).")
    small.add_argument("--vocab_size", type=int, default=0,
                       help="Output vocabulary of the decoder (TrOCR-small: 64044); default: the tokenizer's. "
                            "Ids the tokenizer does not know are never generated.")
    small.add_argument("--tokenizer_vocab", type=int, default=1000, help="BPE vocabulary trained on the texts.")
    add_common_args(parser, repeats=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.lines, args.batch_size, args.beams, args.num_beams = 6, 4, [1, 2], 2
        args.size, args.patch_size, args.encoder_hidden, args.encoder_layers, args.encoder_heads = 64, 16, 32, 1, 2
        args.decoder_hidden, args.decoder_layers, args.decoder_heads, args.tokenizer_vocab = 32, 1, 2, 300
    if args.num_beams not in args.beams:
        args.beams.append(args.num_beams)
    device = setup(args)

    progress(f"rendering {args.lines} lines, training the tokenizer, building the model")
    width, height = (1700, 120) if not args.quick else (400, 40)
    blobs, texts = iam_like_lines(args.lines, args.seed + 1, width, height)
    tokenizer, image_processor, model = build(args, texts)
    model.to(device)
    labels, _ = encode_labels(tokenizer, texts, max_target_length=256)
    max_length = generation_max_length(max(len(ids) for ids in labels))
    print(f"# {describe_images(blobs)}, batch {args.batch_size}")
    print(f"# model {args.model}: {describe_model(model)} (tokenizer {len(tokenizer)}); max_length {max_length}; "
          f"lengths: {args.lengths} (mean label {sum(map(len, labels)) / len(labels):.1f} tokens)", flush=True)

    accelerator = Accelerator(cpu=device.type == "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        features = Features({"image": ImageFeature(), "text": Value("string"), "labels": Sequence(Value("int32"))})
        Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "text": texts, "labels": labels},
                          features=features).save_to_disk(str(Path(tmp, "validation")))
        split = load_from_disk(str(Path(tmp, "validation")))
        data_args = SimpleNamespace(image_column="image", augment=False)
        inputs = with_image_transforms(DatasetDict({"validation": split}), data_args, image_processor)["validation"]
        collator = OcrCollator.from_image_processor(image_processor)
        loader = accelerator.prepare(DataLoader(inputs, batch_size=args.batch_size, sampler=SequentialSampler(inputs),
                                                collate_fn=collator))
        # The baseline's inputs: the same pixel values, one line each, ready on the device.
        single = [collator([inputs[i]])["pixel_values"].to(device) for i in range(len(inputs))]

        generate = model.generate
        rows, ratios, floor, baselines = [], {}, None, {}
        for beams in args.beams:
            lengths = ReferenceLengths([len(ids) for ids in labels], beams, tokenizer.eos_token_id, len(tokenizer),
                                       force=args.lengths == "reference")
            kwargs = dict(num_beams=beams, max_length=max_length, use_cache=True,
                          early_stopping=beams > 1, logits_processor=LogitsProcessorList([lengths]))
            training_args = SimpleNamespace(generation_max_length=max_length, generation_num_beams=beams)
            predictions = {}

            def ours():
                lengths.reset()
                # generate_predictions passes max_length and num_beams; the rest rides along.
                model.generate = lambda **kw: generate(**{**kwargs, **kw})
                start = time.perf_counter()
                predictions["ours"] = generate_predictions(accelerator, model, loader, tokenizer, training_args)
                synchronize(device)
                seconds = time.perf_counter() - start
                del model.generate
                return seconds / len(texts)

            def baseline():
                lengths.reset()
                start = time.perf_counter()
                out = []
                with torch.no_grad():
                    for pixel_values in single:
                        out.extend(decode(tokenizer, model.generate(pixel_values=pixel_values, **kwargs).cpu().numpy()))
                synchronize(device)
                predictions["baseline"] = out
                return (time.perf_counter() - start) / len(texts)

            def encoder_only():
                start = time.perf_counter()
                with torch.no_grad():
                    for batch in loader:
                        model.encoder(pixel_values=batch["pixel_values"])
                synchronize(device)
                return (time.perf_counter() - start) / len(texts)

            measurements = {"baseline": baseline, "ours": ours}
            if floor is None:
                measurements["encoder"] = encoder_only
            samples = {name: [] for name in measurements}
            for repeat in range(args.repeats):
                # Alternated order; the CERs checked equal after every repetition.
                for name in measurements if repeat % 2 == 0 else reversed(measurements):
                    progress(f"beams={beams}, repetition {repeat + 1}/{args.repeats}: {name}")
                    samples[name].append(measurements[name]())
                cers = {name: corpus_cer(texts, lines) for name, lines in predictions.items()}
                for name in cers:
                    assert cers[name] == cers["baseline"], f"beams={beams}: CER {name} {cers[name]} != {cers['baseline']}"
            if floor is None:
                floor = median(samples["encoder"])
            times = {name: median(samples[name]) for name in predictions}
            ratios[beams], baselines[beams] = times["baseline"] / times["ours"], times["baseline"]
            for name in predictions:
                same = "yes" if predictions[name] == predictions["baseline"] else "no"
                rows.append([str(beams), name, 1 / times[name], 1000 * times[name], times["baseline"] / times[name],
                             f"{cers[name]:.2f}", same])

    print()
    print_table(["beams", "path", "lines/s", "ms/line", "x baseline", "CER", "same as baseline"], rows)
    print(f"# encoder alone (batched, same for both paths): {1000 * floor:.2f} ms/line; CER of a random model "
          "(only the equality of the two matters)")
    # Both paths run the same encoder: even with a decoder that cost nothing, ours could not
    # beat the baseline by more than this.
    print("# bound, baseline / encoder alone: " + ", ".join(
        f"beams {beams}: {seconds / floor:.2f}" for beams, seconds in baselines.items()))
    ratio_line("bench_eval", ratios[args.num_beams])


if __name__ == "__main__":
    main()
