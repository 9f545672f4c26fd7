"""Teach a fresh ViT encoder to see letters before the recipe fine-tunes the whole TrOCR:
a linear CTC head over the training texts' characters, trained on the training lines, then
thrown away. The stand-in for TrOCR's pretrained encoder: trained from scratch by the
sequence-to-sequence loss alone, a tiny ViT stays at the language-model floor for thousands
of CPU steps (the decoder learns to guess the words and the image gives it too weak a signal
to learn where to look), while with CTC it reads within a few hundred steps, and the decoder
then learns to attend from the first steps."""

import jiwer
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

BLANK = 0


def line_pixels(split, image_column: str, image_processor, rows: list[int] | None = None) -> torch.Tensor:
    """The processor's pixel values of some lines of a split (all of them without `rows`)."""
    lines = split if rows is None else split.select(rows)
    return image_processor(images=[image.convert("RGB") for image in lines[image_column]], return_tensors="pt").pixel_values


class ResizedLines:
    """Every line decoded once and kept resized, as uint8 with one channel for a gray line (a
    twelfth of the processor's float32 RGB); a batch normalized as the processor does."""

    def __init__(self, split, image_column: str, image_processor):
        height, width = image_processor.size["height"], image_processor.size["width"]
        self.mean = torch.tensor(image_processor.image_mean).view(-1, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(-1, 1, 1)
        self.scale, self.resample = image_processor.rescale_factor, image_processor.resample
        gray = all(image.mode in ("1", "L") for image in split.select(range(min(len(split), 8)))[image_column])
        images = tqdm(split[image_column], desc="Decoding the training lines once", unit="line")
        self.lines = torch.stack([self.resized(image, "L" if gray else "RGB", (width, height)) for image in images])

    def resized(self, image, mode: str, size: tuple[int, int]) -> torch.Tensor:
        array = np.array(image.convert(mode).resize(size, self.resample), dtype=np.uint8)
        return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        pixels = self.lines[rows].float().expand(-1, len(self.mean), -1, -1)
        return (pixels * self.scale - self.mean) / self.std


def ctc_targets(texts: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    alphabet = sorted(set("".join(texts)))
    index = {char: position + 1 for position, char in enumerate(alphabet)}  # 0 is the blank
    return alphabet, [torch.tensor([index[char] for char in text]) for text in texts]


def greedy_decode(log_probs: torch.Tensor, alphabet: list[str]) -> list[str]:
    """Best path: repeated labels merged, blanks dropped."""
    lines = []
    for path in log_probs.argmax(-1).tolist():
        merged = [label for position, label in enumerate(path) if position == 0 or label != path[position - 1]]
        lines.append("".join(alphabet[label - 1] for label in merged if label != BLANK))
    return lines


def pretrain_encoder(encoder, image_processor, train, validation, text_column: str, image_column: str, steps: int,
                     batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0) -> float:
    """Trains `encoder` in place; returns the CTC head's CER (%) on `validation`."""
    texts = list(train[text_column])
    alphabet, targets = ctc_targets(texts)
    known = set(alphabet)
    head = torch.nn.Linear(encoder.config.hidden_size, len(alphabet) + 1)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=learning_rate)
    ctc = torch.nn.CTCLoss(blank=BLANK, zero_infinity=True)  # a line longer than the patches: no loss

    def log_probs(batch_pixels):
        hidden = encoder(pixel_values=batch_pixels).last_hidden_state[:, 1:]  # the patches, not [CLS]
        return head(hidden).log_softmax(-1)

    lines = ResizedLines(train, image_column, image_processor)
    generator = torch.Generator().manual_seed(seed)
    encoder.train()
    progress = tqdm(range(steps), desc="Pretraining the encoder with CTC", unit="step")
    for _ in progress:
        batch = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
        scores = log_probs(lines[batch])
        labels = [targets[row] for row in batch]
        loss = ctc(
            scores.transpose(0, 1),
            torch.cat(labels),
            torch.full((batch_size,), scores.shape[1]),
            torch.tensor([len(label) for label in labels]),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")

    encoder.eval()
    references = list(validation[text_column])
    with torch.no_grad():
        predictions = greedy_decode(log_probs(line_pixels(validation, image_column, image_processor)), alphabet)
    unseen = set("".join(references)) - known
    if unseen:
        print(f"validation characters never seen in training (unreadable by the CTC head): {sorted(unseen)}")
    return 100 * jiwer.cer(references, predictions)
