"""Teach a fresh ViT encoder to see letters before the recipe fine-tunes the whole TrOCR:
a linear CTC head over the training texts' characters, trained on the training lines, then
thrown away. The stand-in for TrOCR's pretrained encoder: trained from scratch by the
sequence-to-sequence loss alone, a tiny ViT stays at the language-model floor for thousands
of CPU steps (the decoder learns to guess the words and the image gives it too weak a signal
to learn where to look), while with CTC it reads within a few hundred steps, and the decoder
then learns to attend from the first steps."""

from functools import partial

import jiwer
import torch
from tqdm import tqdm

BLANK = 0


def line_pixels(split, image_column: str, image_processor, rows: list[int] | None = None) -> torch.Tensor:
    """The processor's pixel values of some lines of a split (all of them without `rows`)."""
    lines = split if rows is None else split.select(rows)
    return image_processor(images=[image.convert("RGB") for image in lines[image_column]], return_tensors="pt").pixel_values


def streamed_batches(split, image_column: str, image_processor, rows: torch.Tensor):
    """Each row of `rows` (line indices) as a batch of pixel values, decoded by one worker
    while the model trains on the previous batch: the training images are never all in memory."""
    return torch.utils.data.DataLoader(
        range(len(split)), batch_sampler=rows.tolist(), num_workers=1, prefetch_factor=4,
        collate_fn=partial(line_pixels, split, image_column, image_processor),
    )


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

    rows = torch.randint(len(texts), (steps, batch_size), generator=torch.Generator().manual_seed(seed))
    batches = streamed_batches(train, image_column, image_processor, rows)
    encoder.train()
    progress = tqdm(zip(rows.tolist(), batches), total=steps, desc="Pretraining the encoder with CTC", unit="step")
    for batch, batch_pixels in progress:
        scores = log_probs(batch_pixels)
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
