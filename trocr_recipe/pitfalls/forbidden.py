"""Pitfall 14: generation settings that forbid a correct reading. OCR copies what is written,
repeats included; each setting is tried on the user's own label rows (the sequence generate()
would have to produce: the start token, the text ids, `</s>`), and the lines it makes
impossible are counted."""

from .core import EXAMPLES, Part, Subject, merge, pitfall
from .generation import NEUTRAL

FIX = ("remove it: del model.config.{key} and model.generation_config.{key} = {neutral} (and drop it from the "
       "Trainer's generation arguments); OCR must be free to write any line it reads")


def _repeats_ngram(sequence: list[int], size: int) -> bool:
    seen = set()
    for start in range(len(sequence) - size + 1):
        gram = tuple(sequence[start:start + size])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def _contains(sequence: list[int], words: list[int]) -> bool:
    return any(sequence[start:start + len(words)] == words for start in range(len(sequence) - len(words) + 1))


def blockers(generation, start: int) -> dict[str, tuple]:
    """Each forbidding setting that is on: key -> (its value, a test `line is impossible`, why)."""
    g = lambda key: getattr(generation, key, None)  # noqa: E731
    found = {}
    if (size := g("no_repeat_ngram_size")) and size > 0:
        found["no_repeat_ngram_size"] = (size, lambda row, size=size: _repeats_ngram([start, *row], size),
                                         f"a token sequence of {size} that occurs twice can never be written")
    if (penalty := g("repetition_penalty")) is not None and penalty != 1.0:
        found["repetition_penalty"] = (penalty, lambda row: len(set([start, *row])) < len(row) + 1,
                                       "every token already written (the start token </s> included, so the end "
                                       "of the line too) is scored down")
    if (least := g("min_length")) and least > 0:
        found["min_length"] = (least, lambda row, least=least: len(row) < least,
                               "</s> is forbidden before that length")
    if (least := g("min_new_tokens")) and least > 0:
        found["min_new_tokens"] = (least, lambda row, least=least: len(row) - 1 < least,
                                   "</s> is forbidden before that many tokens")
    if bad := g("bad_words_ids"):
        found["bad_words_ids"] = (bad, lambda row, bad=bad: any(_contains(row, list(words)) for words in bad),
                                  "those token sequences can never be written")
    if suppressed := g("suppress_tokens"):
        found["suppress_tokens"] = (suppressed, lambda row, banned=suppressed: bool(set(row) & set(banned)),
                                    "those tokens can never be written")
    if first := g("begin_suppress_tokens"):
        found["begin_suppress_tokens"] = (first, lambda row, first=first: bool(row) and row[0] in first,
                                          "no line can start with those tokens")
    if (forced := g("forced_bos_token_id")) is not None:
        found["forced_bos_token_id"] = (forced, lambda row, forced=forced: not row or row[0] != forced,
                                        "every line is forced to start with that token")
    return found


def _impossible(rows: list[list[int]], test) -> list[int]:
    return [line for line, row in enumerate(rows) if test(row)]


def _part(subject: Subject, key: str, value, test, why: str) -> Part | None:
    rows, corpus = subject.rows or [], subject.corpus or {}
    lines = _impossible(rows, test)
    whole = _impossible(corpus.get("rows", []), test)
    if not lines and not whole and key == "repetition_penalty" and value < 1.0:
        return None
    where = subject.generation_sources.get(key, "model.generation_config")
    counts = [f"{len(lines)} of {len(rows)} lines of the batch"] if rows else []
    if corpus:
        counts.append(f"{len(whole)} of {len(corpus['rows'])} lines of {corpus.get('name', 'the dataset')}")
    quoted = [f"line {line}: {subject.texts[line]!r}" for line in lines[:EXAMPLES]] if subject.texts else []
    verb = "are scored down" if key == "repetition_penalty" else "cannot be generated"
    return Part(
        "error", f"{where}.{key}={value} forbids readings: {why}.",
        f"{' and '.join(counts) or 'no lines given to count'} {verb} under it"
        + (f" ({'; '.join(quoted)})" if quoted else ""),
        "Whatever the model learned, those lines come out altered (a repeated word dropped, a short line "
        "lengthened): the CER has a floor no training removes, and a validation CER under such settings "
        "misjudges every epoch.",
        FIX.format(key=key, neutral=NEUTRAL.get(key)),
    )


@pitfall(14, "generation_forbids_lines")
def check_forbidden_readings(subject: Subject):
    """no_repeat_ngram_size, repetition_penalty, min_length / min_new_tokens, bad_words_ids,
    suppress_tokens and forced tokens, wherever decoding takes them from."""
    start = getattr(subject.generation, "decoder_start_token_id", None)
    if start is None:
        start = subject.tokenizer.eos_token_id
    parts = [_part(subject, key, *found) for key, found in blockers(subject.generation, start).items()]
    return merge(check_forbidden_readings, [part for part in parts if part])
