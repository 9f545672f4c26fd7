"""Build a small TrOCR offline: a ViT encoder and a TrOCR decoder from configs, and a
byte-level BPE tokenizer trained on the dataset's training texts with RoBERTa's special
tokens (<s>=0, <pad>=1, </s>=2, <unk>=3, cls = <s>, sep = </s>, <mask> last), saved as a normal checkpoint folder with its
processor, loadable by VisionEncoderDecoderModel / TrOCRProcessor.from_pretrained.

    python data_scripts/make_tiny_model.py --dataset data/synthetic --output_dir models/tiny
"""

import argparse
import math

import torch
from datasets import load_from_disk
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    TrOCRConfig,
    TrOCRProcessor,
    ViTConfig,
    ViTImageProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from pretrain_encoder import pretrain_encoder

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
# Sizes for the two uses: `demo` learns to read synthetic lines on a CPU in minutes (its
# encoder pretrained with CTC first: pretrain_encoder.py says why), `tiny` only has to run
# through every code path in seconds (tests, recipes/tiny.json).
PRESETS = {
    "demo": dict(
        hidden_size=160, patch_size=[32, 8], encoder_layers=2, vocab_size=300, init_std=0.08, pretrain_steps=4000,
        pretrain_learning_rate=2e-3,
    ),
    "tiny": dict(width=128, hidden_size=32, encoder_layers=1, decoder_layers=1, heads=2, vocab_size=300),
}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the TrOCR checkpoints' special tokens: <s>=0, <pad>=1, </s>=2,
    <unk>=3, cls = <s>, sep = </s>, and <mask> as the last id, so that community code reading
    cls_token_id / sep_token_id / mask_token_id runs on it unchanged."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <mask> comes last, as in RoBERTa's vocabulary
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    # As RoBERTa's tokenizer: `<s> text </s>` by default, the behaviour the recipe must undo.
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>",
    )


def decoder_config(tokenizer, width: int, layers: int, heads: int, max_positions: int, vocab_size: int = 0,
                   **kwargs) -> TrOCRConfig:
    """A decoder shaped as TrOCR's (learned positions, layer norm on the embeddings, GELU,
    `</s>` as the start token) with the tokenizer's special tokens; the vocabulary is the
    tokenizer's unless `vocab_size` is larger."""
    return TrOCRConfig(
        vocab_size=max(vocab_size, len(tokenizer)),
        d_model=width,
        decoder_layers=layers,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * width,
        max_position_embeddings=max_positions,
        activation_function="gelu",
        use_learned_position_embeddings=True,
        layernorm_embedding=True,
        scale_embedding=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def build_model(tokenizer, args) -> VisionEncoderDecoderModel:
    encoder = ViTConfig(
        image_size=[args.height, args.width],
        patch_size=args.patch_size if len(args.patch_size) == 2 else args.patch_size[0],
        hidden_size=args.hidden_size,
        num_hidden_layers=args.encoder_layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden_size,
        qkv_bias=True,
        initializer_range=args.init_std,
    )
    decoder = decoder_config(
        tokenizer, args.hidden_size, args.decoder_layers, args.heads, args.max_positions, init_std=args.init_std
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    # On the top-level config too, as the Hub's TrOCR checkpoints have them: a plain
    # `model(pixel_values=..., labels=...)` shifts labels with these.
    config.decoder_start_token_id, config.eos_token_id = tokenizer.eos_token_id, tokenizer.eos_token_id
    config.pad_token_id, config.vocab_size = tokenizer.pad_token_id, decoder.vocab_size
    torch.manual_seed(args.seed)
    model = VisionEncoderDecoderModel(config=config)
    embeddings = model.encoder.embeddings
    with torch.no_grad():
        # A text line is mostly white page: with ViT's initial patch weights (std 0.02) the
        # ink moves a patch's embedding so little that the pre-LN layers' own output drowns
        # it, and the decoder learns to ignore the image. Weights scaled to the line's pixel
        # spread (about 0.17 in [-1, 1]) make ink as loud as position from the first step.
        projection = embeddings.patch_embeddings.projection
        fan_in = projection.weight[0].numel()
        projection.weight.normal_(0.0, 1.0 / (0.17 * math.sqrt(fan_in)))
        # Patches start out knowing where they are, left to right, as sinusoids.
        embeddings.position_embeddings[0] = sinusoids(embeddings.position_embeddings.shape[1], args.hidden_size)
    return model


def sinusoids(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="save_to_disk folder whose train texts train the tokenizer.")
    parser.add_argument("--output_dir", required=True, help="Checkpoint folder to write.")
    parser.add_argument("--text_column", default="text", help="Column of the transcriptions.")
    parser.add_argument("--vocab_size", type=int, default=400, help="Tokenizer vocabulary, special tokens included.")
    parser.add_argument("--height", type=int, default=32, help="Model input height in pixels.")
    parser.add_argument("--width", type=int, default=384, help="Model input width in pixels.")
    parser.add_argument(
        "--patch_size", type=int, nargs="+", default=[16, 4], help="ViT patch: one size, or height and width."
    )
    parser.add_argument("--hidden_size", type=int, default=128, help="Encoder and decoder width.")
    parser.add_argument("--encoder_layers", type=int, default=4, help="ViT layers.")
    parser.add_argument("--decoder_layers", type=int, default=2, help="TrOCR decoder layers.")
    parser.add_argument("--heads", type=int, default=4, help="Attention heads in both.")
    parser.add_argument("--max_positions", type=int, default=128, help="Longest decoder sequence.")
    parser.add_argument("--init_std", type=float, default=0.02, help="Std of the initial linear weights.")
    parser.add_argument(
        "--pretrain_steps", type=int, default=0,
        help="Steps of CTC pretraining of the encoder on the training lines (pretrain_encoder.py); 0: none.",
    )
    parser.add_argument("--pretrain_learning_rate", type=float, default=1e-3, help="AdamW learning rate of that pretraining.")
    parser.add_argument("--image_column", default="image", help="Column of the line images (for pretraining).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the initial weights.")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="Size defaults; explicit flags still override.")
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    dataset = load_from_disk(args.dataset)
    tokenizer = train_tokenizer(dataset["train"][args.text_column], args.vocab_size)
    image_processor = ViTImageProcessor(
        size={"height": args.height, "width": args.width},
        resample=Image.BICUBIC,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    model = build_model(tokenizer, args)
    model.generation_config.decoder_start_token_id = tokenizer.eos_token_id
    if args.pretrain_steps:
        cer = pretrain_encoder(
            model.encoder, image_processor, dataset["train"], dataset["validation"], args.text_column,
            args.image_column, args.pretrain_steps, learning_rate=args.pretrain_learning_rate, seed=args.seed,
        )
        print(f"Encoder pretrained for {args.pretrain_steps} steps: its CTC head reads validation at CER {cer:.1f}")
    model.save_pretrained(args.output_dir)
    TrOCRProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(args.output_dir)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"Wrote a {parameters / 1e6:.2f}M-parameter TrOCR, vocabulary {len(tokenizer)}, to {args.output_dir}")


if __name__ == "__main__":
    main()
