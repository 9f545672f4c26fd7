"""One check per pitfall of docs/pitfalls.md, shared by the recipe's preflight
(trocr_recipe.checks), the check of a plain loop (trocr_recipe.loopcheck) and of a
Seq2SeqTrainer script (trocr_recipe.trainercheck). Each check reads a `Subject` and returns
at most one `Finding`; `run_checks` runs them all, each on its own, so that one that cannot
run becomes a note and the others still run."""

from . import evaluation, forbidden, generation, labels, model, pixels  # noqa: F401  (registers the checks)
from .core import CHECKS, NOT_CHECKED, PITFALLS_DOC, Finding, Subject, pitfall_doc

__all__ = ["CHECKS", "PITFALLS_DOC", "Finding", "Subject", "pitfall_doc", "run_checks"]


def run_checks(subject: Subject, numbers=None) -> list[Finding]:
    """The findings of every registered check (or of `numbers`), by pitfall number; a check
    that raises gives a `not_checked` warning with the exception instead."""
    findings = []
    for number in sorted(CHECKS if numbers is None else numbers):
        name, check = CHECKS[number]
        try:
            found = check(subject)
        except Exception as error:  # a user's object must never stop the other checks
            found = Finding(
                "not_checked", "warning", f"Pitfall {number} ({name}) could not be checked on these objects.",
                pitfall=number, evidence=f"{type(error).__name__}: {error}",
                effect=NOT_CHECKED, fix="see the evidence; the other checks ran",
            )
        if found is not None:
            findings.append(found)
    return findings
