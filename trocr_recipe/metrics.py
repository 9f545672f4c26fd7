"""Corpus CER / WER as the paper's scorer computes them, and the compute_metrics hook.

Scores raw reference strings (never labels decoded back) against predictions decoded
without the tokenizer's clean-up, which would glue `presto !` into `presto!`."""

import jiwer
import numpy as np

# jiwer's defaults strip and squeeze whitespace; the paper scores raw, case-sensitive strings.
_CHARS = jiwer.ReduceToListOfListOfChars()
_WORDS = jiwer.ReduceToListOfListOfWords()


def corpus_cer(references: list[str], predictions: list[str]) -> float:
    """100 x (sum of character edit distances) / (sum of reference lengths)."""
    _check_lengths(references, predictions)
    return 100.0 * jiwer.cer(references, predictions, reference_transform=_CHARS, hypothesis_transform=_CHARS)


def corpus_wer(references: list[str], predictions: list[str]) -> float:
    _check_lengths(references, predictions)
    return 100.0 * jiwer.wer(references, predictions, reference_transform=_WORDS, hypothesis_transform=_WORDS)


def line_cer(reference: str, prediction: str) -> float:
    """One line's CER, for the predictions file; never averaged into the corpus figure."""
    edits = jiwer.process_characters(reference, prediction, _CHARS, _CHARS)
    return 100.0 * (edits.substitutions + edits.deletions + edits.insertions) / max(1, len(reference))


def _check_lengths(references, predictions):
    if len(references) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def decode(tokenizer, token_ids) -> list[str]:
    """Generated ids (padded with -100 when gathered) to text, without clean-up."""
    token_ids = np.where(np.asarray(token_ids) < 0, tokenizer.pad_token_id, token_ids)
    return tokenizer.batch_decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class GeneratedTextMetrics:
    """`compute_metrics` for Seq2SeqTrainer with predict_with_generate.

    The trainer hands over generated ids only; the raw reference strings of the split being
    scored are set in `references` beforehand (evaluation keeps dataset order), and the
    decoded predictions of the last call stay in `predictions` for the predictions file.
    Rows past the references are dropped (see `one_per_reference`).
    """

    def __init__(self, tokenizer, references: list[str]):
        self.tokenizer = tokenizer
        self.references = references
        self.predictions: list[str] = []

    def __call__(self, eval_prediction) -> dict[str, float]:
        generated = eval_prediction.predictions
        if isinstance(generated, tuple):
            generated = generated[0]
        self.predictions = decode(self.tokenizer, self.one_per_reference(generated))
        return {
            "cer": corpus_cer(self.references, self.predictions),
            "wer": corpus_wer(self.references, self.predictions),
        }

    def one_per_reference(self, generated):
        """The first row of each line: over several processes, Seq2SeqTrainer gathers with plain
        `gather`, and the rows accelerate repeats to even out the last batch come last
        (tests/test_distributed.py; docs/compatibility.md)."""
        if len(generated) < len(self.references):
            raise ValueError(f"{len(generated)} generated rows for {len(self.references)} references")
        return generated[: len(self.references)]
