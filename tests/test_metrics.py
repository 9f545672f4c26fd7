import numpy as np
import pytest
from transformers import EvalPrediction

from trocr_recipe.metrics import GeneratedTextMetrics, corpus_cer, corpus_wer, line_cer


def test_corpus_cer_is_not_the_mean_of_line_cers():
    references = ["ab", "abcdefghij"]
    predictions = ["xb", "abcdefghij"]
    # 1 edit over 12 reference characters, where the per-line mean would be (50 + 0) / 2.
    assert corpus_cer(references, predictions) == pytest.approx(100 / 12)
    assert np.mean([line_cer(r, p) for r, p in zip(references, predictions)]) == pytest.approx(25.0)


def test_cer_is_case_sensitive_and_keeps_spacing():
    assert corpus_cer(["presto !"], ["presto!"]) == pytest.approx(100 / 8)
    assert corpus_cer(["You 're"], ["you 're"]) == pytest.approx(100 / 7)
    assert corpus_cer(["a b "], ["a b"]) == pytest.approx(100 / 4)


def test_wer_counts_words():
    assert corpus_wer(["a b c d"], ["a x c d"]) == pytest.approx(25.0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        corpus_cer(["a"], ["a", "b"])


def test_compute_metrics_decodes_without_clean_up(processor):
    tokenizer = processor.tokenizer
    references = ["hey presto !", "You 're a star ."]
    ids = [[tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
           for text in references]
    width = max(map(len, ids))
    # Gathered generations come padded with -100.
    padded = np.array([row + [-100] * (width - len(row)) for row in ids])
    metrics = GeneratedTextMetrics(tokenizer, references)
    scores = metrics(EvalPrediction(predictions=padded, label_ids=None))
    assert metrics.predictions == references
    assert scores == {"cer": 0.0, "wer": 0.0}
