#!/usr/bin/env python
"""Is my loop right? Compare two runs step by step: loss, learning rate, validation CER,
final CER / WER and the lines predicted differently, plus a plot of both runs.

    python compare_runs.py runs/small runs/small-custom          # two run folders
    python compare_runs.py a/loss_log.jsonl b/loss_log.jsonl     # or two loss logs
    python compare_runs.py runs/small runs/small-custom --max_steps 100 --loss_rtol 1e-4

A run folder holds `loss_log.jsonl` or, written by trocr_recipe.steptrace.StepLog,
`step_log.jsonl` (read first when both are there), and, when the run wrote them,
`all_results.json`, `predictions_<split>.jsonl`, and a validation-CER curve:
`eval_log.jsonl` (one {"step", "eval_cer", ...} per evaluation) or else the Trainer's
`trainer_state.json` (its `log_history`; the latest checkpoint's if the run stopped early).

Any training loop can be compared: write `loss_log.jsonl`, one JSON object per optimizer
step (not per micro-batch), each step once:

    {"step": 1, "loss": 6.0315, "learning_rate": 0.0, "epoch": 0.008}

`step` is an integer, `loss` the step's mean token loss, `learning_rate` (optional, may be
null) the rate the step used, `epoch` and `grad_norm` (before clipping) optional. Steps are
matched by number.

When the reference run holds a trace (`run_trocr.py RECIPE --trace_steps N`, replayed by the
other loop through trocr_recipe.steptrace.ReferenceBatches), the report ends with the likely
CAUSE at the first parting step: the loss (step 1, matched against every combination of the
usual loss mistakes computed on the trace's first batch), the optimizer (a later step, or
parameter norms that part: StepLog given the model logs them), or decoding / the metric
(losses agree, CER does not). See docs/step_comparison.md.

Exit code: 0 when the runs agree within the tolerances; 1 when they differ (the loss or
learning rate parts beyond --loss_rtol, the steps logged differ, or a CER / WER, final or
during training, differs by more than --cer_atol); 2 for bad input (a missing file, a
malformed line: the file and line are named).
"""

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trocr_recipe.errors import ArgumentParser, BadInput, finite, read_json_object, run_cli
from trocr_recipe.outputs import LOSS_LOG, RESULTS

TRACE = "trace"  # a trace run's folder of batches and settings (trocr_recipe.steptrace)
STEP_LOG = "step_log.jsonl"  # a replaying loop's StepLog (trocr_recipe.steptrace.STEP_LOG)
DOCS = "docs/step_comparison.md"

EVAL_LOG = "eval_log.jsonl"
TRAINER_STATE = "trainer_state.json"
# The order the results table lists metric prefixes in; others follow alphabetically.
RESULT_ORDER = ("baseline", "eval", "test")
MAX_RANGES = 10  # step ranges listed for the steps logged by one run only
# The largest step number read: ten million optimizer steps is far past any TrOCR run, and the
# report's work grows with the step numbers.
MAX_STEP = 10**7
PLOT_FORMATS = set(FigureCanvasAgg(Figure()).get_supported_filetypes())
# The parameter groups whose norms StepLog and a trace log: weights, and biases with LayerNorm.
NORM_GROUPS = {"decay": "the decayed weights", "no_decay": "the biases and LayerNorm parameters (no_decay)"}
# Parameter norms are compared at --loss_rtol / NORM_RTOL_DIVISOR: a correct replay's agree to
# about 1e-10, while a weight decay of 1e-4 on the no-decay group moves theirs by 4e-7 in 20 steps
# (docs/step_comparison.md).
NORM_RTOL_DIVISOR = 100


@dataclass
class Run:
    label: str  # "A" or "B"
    name: str  # short name, for the legend and the default plot file name
    path: Path
    losses: dict[int, float]
    learning_rates: dict[int, float]
    eval_cer: dict[int, float]  # validation CER during training, by step
    eval_source: str | None  # the file the CER curve came from
    results: dict  # all_results.json, empty if absent
    predictions: dict[str, dict[str, dict]]  # split -> line id -> row
    grad_norms: dict[int, float] = field(default_factory=dict)  # before clipping, when logged
    trace: Path | None = None  # the run's trace folder, when it wrote one
    param_norms: dict[int, dict] = field(default_factory=dict)  # {"decay", "no_decay"} after each update, when logged


@dataclass
class Cause:
    """The likely cause of the first difference, for the report's last line."""

    step: int | None
    kind: str  # "loss", "optimizer", "decoding", "steps", "learning rate log", "no trace"
    text: str


# ---------------------------------------------------------------------------------------
# Reading


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """The JSON object of each non-blank line of a JSONL file, with its line number."""
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.readlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: cannot read ({err})") from None
    numbered = []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except (ValueError, RecursionError) as err:  # RecursionError: a line nested thousands deep
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(";")[0]
            raise BadInput(f"{path}, line {n}: not valid JSON ({reason})") from None
        if not isinstance(row, dict):
            raise BadInput(f"{path}, line {n}: expected a JSON object, got {json.dumps(row)[:80]}")
        numbered.append((n, row))
    return numbered


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP


def _is_score(value) -> bool:
    """A CER or WER: a finite number (a NaN would agree with any other value)."""
    return _is_number(value) and math.isfinite(value)


def read_step_values(path: Path, key: str, max_steps: int | None) -> tuple[dict[int, float], dict[int, dict]]:
    """{step: row[key]} from a JSONL file with one row per step, and the rows themselves."""
    values, rows, lines = {}, {}, {}
    for n, row in read_rows(path):
        step, value = row.get("step"), row.get(key)
        if not _is_step(step) or not _is_number(value):
            got = json.dumps(row)[:120]
            raise BadInput(f'{path}, line {n}: needs an integer "step" and a number "{key}" (steps 0 to {MAX_STEP:,}, '
                           f"numbers within float range), got {got}")
        if key != "loss" and not _is_score(value):
            raise BadInput(f"{path}, line {n}: {key} {value} is not a finite number; a CER is a percentage")
        if step in lines:
            raise BadInput(f"{path}, line {n}: step {step} already logged on line {lines[step]}")
        lines[step] = n
        if max_steps is None or step <= max_steps:
            values[step], rows[step] = float(value), row
    return values, rows


def read_loss_log(path: Path, max_steps: int | None) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    """Losses, learning rates and gradient norms by step (the last two where logged)."""
    losses, rows = read_step_values(path, "loss", max_steps)
    if not losses:
        raise BadInput(f"{path}: no steps" + (f" up to --max_steps {max_steps}" if max_steps is not None else ""))
    # The reference loop logs null when the scheduler gave no rate: compare where both have one.
    rates = {step: float(row["learning_rate"]) for step, row in rows.items() if _is_number(row.get("learning_rate"))}
    norms = {step: float(row["grad_norm"]) for step, row in rows.items() if _is_number(row.get("grad_norm"))}
    return losses, rates, norms


def read_trace(folder: Path, max_steps: int | None) -> tuple[Path | None, dict[int, float]]:
    """The run's trace folder, if any, and the gradient norms it recorded."""
    trace = folder / TRACE
    if not (trace / "settings.json").is_file():
        return None, {}
    from trocr_recipe.steptrace import read_settings

    try:
        check_settings(trace / "settings.json", read_settings(trace))
    except (ValueError, RecursionError) as error:
        raise BadInput(str(error)) from None
    steps = read_rows(trace / "steps.jsonl") if (trace / "steps.jsonl").is_file() else []
    check_first_batches(trace, steps)
    norms = {
        row["step"]: float(row["grad_norm"]) for _, row in steps
        if isinstance(row.get("step"), int) and _is_number(row.get("grad_norm"))
        and (max_steps is None or row["step"] <= max_steps)
    }
    return trace, norms


# The settings.json values the report reads, and what each must be.
SETTINGS_TYPES = {
    "model_name_or_path": str, "max_grad_norm": float, "gradient_accumulation_steps": int, "no_decay": list,
    "optimizer": {"name": str, "lr": float, "eps": float, "weight_decay": float, "betas": list},
    "schedule": {"name": str, "warmup_steps": int, "total_steps": int},
    "special_tokens": {"bos_token_id": int, "pad_token_id": int, "eos_token_id": int, "decoder_start_token_id": int},
}


def check_settings(path: Path, settings: dict, types: dict = SETTINGS_TYPES, where: str = "") -> None:
    """BadInput for a value of the trace settings of another type than the report reads."""
    for key, kind in types.items():
        if key not in settings:
            continue
        value, name = settings[key], f"{where}{key}"
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise BadInput(f"{path}: {name} is {json.dumps(value)[:60]}, expected an object")
            check_settings(path, value, kind, f"{name}.")
        elif not (_is_number(value) and math.isfinite(value) and (kind is float or isinstance(value, int))
                  if kind in (int, float) else isinstance(value, kind)):
            expected = {int: "an integer", float: "a finite number", str: "a string", list: "a list"}[kind]
            raise BadInput(f"{path}: {name} is {json.dumps(value)[:60]}, expected {expected}; write the trace again "
                           "with run_trocr.py RECIPE --trace_steps N")


def check_first_batches(trace: Path, steps: list[tuple[int, dict]]) -> None:
    """The batch files of the trace's first step, the ones the report reads: files of the
    trace folder holding pixel_values and labels (a safetensors header read, no data)."""
    from safetensors import safe_open

    path = trace / "steps.jsonl"
    for n, row in steps[:1]:
        parts = row.get("micro_batches")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise BadInput(f'{path}, line {n}: "micro_batches" must be a list of objects')
        for part in parts:
            name = part.get("file")
            if not isinstance(name, str) or Path(name).name != name:
                raise BadInput(f'{path}, line {n}: "file" {json.dumps(name)[:80]} is not a file name of the trace '
                               "folder")
            try:
                with safe_open(trace / name, "pt") as tensors:
                    keys = set(tensors.keys())
            except Exception as error:  # safetensors raises its own SafetensorError, OSError for a missing file
                raise BadInput(f"{trace / name}: cannot read the batch ({type(error).__name__}: {error}); write the "
                               "trace again") from None
            if not {"pixel_values", "labels"} <= keys:
                raise BadInput(f"{trace / name}: holds {sorted(keys)}, not pixel_values and labels")


def read_param_norms(path: Path, max_steps: int | None) -> dict[int, dict]:
    """{step: {"decay", "no_decay"}} where a row holds both parameter norms (StepLog given the
    model, a trace's steps.jsonl); rows without them are left out of this comparison only."""
    if not path.is_file():
        return {}
    norms = {}
    for _, row in read_rows(path):
        step, value = row.get("step"), row.get("param_norms")
        if isinstance(step, int) and isinstance(value, dict) and all(_is_number(value.get(k)) for k in NORM_GROUPS):
            if max_steps is None or step <= max_steps:
                norms[step] = {k: float(value[k]) for k in NORM_GROUPS}
    return norms


def latest_trainer_state(folder: Path) -> Path | None:
    """The run's trainer_state.json, or the latest checkpoint's when training stopped early."""
    if (folder / TRAINER_STATE).is_file():
        return folder / TRAINER_STATE
    checkpoints = [
        p for p in folder.glob(f"checkpoint-*/{TRAINER_STATE}") if re.fullmatch(r"checkpoint-\d+", p.parent.name)
    ]
    return max(checkpoints, key=lambda p: int(p.parent.name.split("-")[1]), default=None)


def read_eval_curve(folder: Path, max_steps: int | None) -> tuple[dict[int, float], str | None]:
    """Validation CER by step: eval_log.jsonl (custom loops) or trainer_state.json (Trainer)."""
    if (folder / EVAL_LOG).is_file():
        return read_step_values(folder / EVAL_LOG, "eval_cer", max_steps)[0], EVAL_LOG
    state = latest_trainer_state(folder)
    if state is None:
        return {}, None
    history = read_json_object(state).get("log_history", [])
    if not isinstance(history, list):
        raise BadInput(f"{state}: log_history is {type(history).__name__}, not a list of log entries")
    bad = next((e for e in history if isinstance(e, dict) and "eval_cer" in e and not _is_score(e["eval_cer"])), None)
    if bad is not None:
        raise BadInput(f"{state}: eval_cer {json.dumps(bad['eval_cer'])} at step {bad.get('step')} is not a finite "
                       "number")
    curve = {
        entry["step"]: float(entry["eval_cer"])
        for entry in history
        if isinstance(entry, dict) and _is_score(entry.get("eval_cer")) and _is_step(entry.get("step"))
    }
    curve = {step: cer for step, cer in curve.items() if max_steps is None or step <= max_steps}
    return curve, str(state.relative_to(folder))


def read_predictions(path: Path) -> dict[str, dict]:
    by_id = {}
    for n, row in read_rows(path):
        missing = [key for key in ("id", "reference", "prediction", "cer") if key not in row]
        if missing or not _is_score(row["cer"]):
            raise BadInput(f'{path}, line {n}: needs "id", "reference", "prediction" and a finite number "cer"')
        if str(row["id"]) in by_id:
            raise BadInput(f"{path}, line {n}: line id {row['id']} appears twice")
        by_id[str(row["id"])] = row
    return by_id


def read_results(path: Path) -> dict:
    """all_results.json; a CER or WER in it that is not a finite number is bad input."""
    results = read_json_object(path)
    for key, value in results.items():
        if key.endswith(("_cer", "_wer")) and isinstance(value, (int, float)) and not _is_score(value):
            raise BadInput(f"{path}: {key} is {value}, not a finite number; a CER or WER is a percentage")
    return results


def run_name(path: Path) -> str:
    # A loss log is named after its run folder: every run's file is called loss_log.jsonl.
    if path.is_file() and path.name in (LOSS_LOG, STEP_LOG):
        path = path.parent
    return path.resolve().name if path.is_dir() else path.stem


def load_run(path: str, label: str, max_steps: int | None) -> Run:
    path = Path(path)
    if path.is_file():  # a loss log alone: nothing else to compare
        folder, loss_log = None, path
    elif path.is_dir():
        folder, loss_log = path, path / STEP_LOG if (path / STEP_LOG).is_file() else path / LOSS_LOG
        if not loss_log.is_file():
            raise BadInput(f"{path}: no {LOSS_LOG} (nor {STEP_LOG}; see the format in `python compare_runs.py --help`)")
    else:
        raise BadInput(f"{path}: no such file or folder")
    losses, rates, norms = read_loss_log(loss_log, max_steps)
    param_norms = read_param_norms(loss_log, max_steps)
    if folder is None:
        return Run(label, run_name(path), path, losses, rates, {}, None, {}, {}, norms, param_norms=param_norms)
    trace, trace_norms = read_trace(folder, max_steps)
    eval_cer, eval_source = read_eval_curve(folder, max_steps)
    results = read_results(folder / RESULTS) if (folder / RESULTS).is_file() else {}
    predictions = {
        p.stem.removeprefix("predictions_"): read_predictions(p) for p in sorted(folder.glob("predictions_*.jsonl"))
    }
    if trace is not None:
        param_norms = {**read_param_norms(trace / "steps.jsonl", max_steps), **param_norms}
    return Run(label, run_name(path), path, losses, rates, eval_cer, eval_source, results, predictions,
               {**trace_norms, **norms}, trace, param_norms)


# ---------------------------------------------------------------------------------------
# Comparing: each section prints its part of the report and returns what disagrees.


def relative_gap(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|, 1e-12); two NaNs agree (identical runs that diverged alike),
    one non-finite value against another value is an infinite gap."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    gap = abs(a - b) / max(abs(a), abs(b), 1e-12)
    return math.inf if math.isnan(gap) else gap


def step_ranges(steps) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10' (the first MAX_RANGES ranges)."""
    ranges = []
    for step in sorted(steps):
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    text = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges[:MAX_RANGES])
    return text + (f", ... ({len(ranges) - MAX_RANGES} more ranges)" if len(ranges) > MAX_RANGES else "")


def heading(title: str) -> None:
    print(f"\n== {title} ==")


def line(label: str, text: str) -> None:
    print(f"  {label:<22}{text}")


def first_parting(a: dict[int, float], b: dict[int, float], steps: list[int], rtol: float) -> int | None:
    return next((step for step in steps if relative_gap(a[step], b[step]) > rtol), None)


def compare_losses(a: Run, b: Run, rtol: float) -> list[str]:
    heading(f"Loss per step ({LOSS_LOG} or {STEP_LOG}, relative tolerance {rtol:g})")
    failures = []
    common = sorted(set(a.losses) & set(b.losses))
    line("steps compared", f"{len(common)}" + (f" ({step_ranges(common)})" if common else ""))
    for run, other in ((a, b), (b, a)):
        only = set(run.losses) - set(other.losses)
        line(f"only in {run.label}", f"{len(only)} step(s): {step_ranges(only)}" if only else "none")
        if only:
            failures.append(f"{len(only)} step(s) logged by {run.label} only")
    if not common:
        return failures + ["no step in common"]

    parting = first_parting(a.losses, b.losses, common, rtol)
    if parting is None:
        line("loss", "agrees at every common step")
    else:
        gap = relative_gap(a.losses[parting], b.losses[parting])
        line("loss parts at step", f"{parting}: A {a.losses[parting]:.9g}  B {b.losses[parting]:.9g}  (gap {gap:.3g})")
        failures.append(f"the loss parts at step {parting}")
    largest = max(common, key=lambda step: relative_gap(a.losses[step], b.losses[step]))
    gap = relative_gap(a.losses[largest], b.losses[largest])
    line("largest gap", f"{gap:.3g} at step {largest}" if gap else "0 (identical at every common step)")
    line("last common step", f"{common[-1]}: A {a.losses[common[-1]]:.9g}  B {b.losses[common[-1]]:.9g}")

    rate_steps = [step for step in common if step in a.learning_rates and step in b.learning_rates]
    rate_parting = first_parting(a.learning_rates, b.learning_rates, rate_steps, rtol)
    if not rate_steps:
        line("learning rate", "not logged by both runs: not compared")
    elif rate_parting is None:
        line("learning rate", f"agrees at all {len(rate_steps)} steps logged by both")
    else:
        values = f"A {a.learning_rates[rate_parting]:.9g}  B {b.learning_rates[rate_parting]:.9g}"
        line("learning rate", f"first differs at step {rate_parting}: {values}")
        failures.append(f"the learning rate differs from step {rate_parting}")
    return failures


def compare_param_norms(a: Run, b: Run, rtol: float) -> list[str]:
    """The norm of each parameter group after each update, where both runs logged it (a trace;
    StepLog given the model): an update that differs shows here before it shows in the loss."""
    steps = sorted(set(a.param_norms) & set(b.param_norms))
    if not steps:
        return []
    rtol = rtol / NORM_RTOL_DIVISOR
    heading(f"Parameter norms after each update (relative tolerance {rtol:g}: --loss_rtol / {NORM_RTOL_DIVISOR})")
    failures = []
    for group, what in NORM_GROUPS.items():
        parting = first_parting({s: a.param_norms[s][group] for s in steps},
                                {s: b.param_norms[s][group] for s in steps}, steps, rtol)
        if parting is None:
            line(group, f"agrees at all {len(steps)} steps logged by both")
            continue
        values = f"A {a.param_norms[parting][group]:.9g}  B {b.param_norms[parting][group]:.9g}"
        line(group, f"first differs after step {parting}: {values}")
        failures.append(f"the norm of {what} differs after step {parting}")
    return failures


def compare_eval_curves(a: Run, b: Run, atol: float) -> list[str]:
    heading(f"Validation CER during training (absolute tolerance {atol:g})")
    for run in (a, b):
        if run.eval_cer:
            line(run.label, f"{len(run.eval_cer)} evaluation(s) ({run.eval_source})")
        elif run.path.is_file():
            line(run.label, "no CER curve: a loss log alone was given")
        else:
            line(run.label, f"no CER curve: no eval_cer in {run.eval_source or f'{EVAL_LOG} or {TRAINER_STATE}'}")
    common = sorted(set(a.eval_cer) & set(b.eval_cer))
    if not common:
        if a.eval_cer and b.eval_cer:
            line("common steps", "none: the runs evaluated at different steps")
        return []
    diffs = {step: abs(a.eval_cer[step] - b.eval_cer[step]) for step in common}
    largest = max(common, key=diffs.get)
    line("common steps", f"{len(common)} ({step_ranges(common)})")
    values = f"A {a.eval_cer[largest]:.4f}  B {b.eval_cer[largest]:.4f}"
    line("largest difference", f"{diffs[largest]:.4g} at step {largest}: {values}")
    parting = next((step for step in common if diffs[step] > atol), None)
    if parting is None:
        return []
    line("first differs at step", f"{parting}: A {a.eval_cer[parting]:.4f}  B {b.eval_cer[parting]:.4f}")
    return [f"the validation CER differs from step {parting}"]


def result_order(key: str) -> tuple:
    prefix = key.rsplit("_", 1)[0]
    return (RESULT_ORDER.index(prefix) if prefix in RESULT_ORDER else len(RESULT_ORDER), key)


def compare_results(a: Run, b: Run, atol: float, counted: bool) -> list[str]:
    heading(f"CER / WER ({RESULTS}, percent, absolute tolerance {atol:g})")
    keys = sorted(
        {k for run in (a, b) for k, v in run.results.items() if k.endswith(("_cer", "_wer")) and _is_number(v)},
        key=result_order,
    )
    if not keys:
        where = "one run" if a.results or b.results else "either run"
        line("", f"no CER or WER to compare (no {RESULTS} in {where})")
        return []
    print(f"  {'metric':<22}{'A':>12}{'B':>12}{'B - A':>12}")
    failures = []
    for key in keys:
        va, vb = a.results.get(key), b.results.get(key)
        both = _is_number(va) and _is_number(vb)
        cells = [f"{v:12.4f}" if _is_number(v) else f"{'-':>12}" for v in (va, vb)]
        print(f"  {key:<22}{''.join(cells)}" + (f"{vb - va:+12.4f}" if both else f"{'-':>12}"))
        if both and abs(vb - va) > atol:
            failures.append(f"{key} differs by {vb - va:+.4g} (A {va:.4f}, B {vb:.4f})")
    if failures and not counted:
        line("", "(not part of the verdict: with --max_steps only the first steps are compared)")
        return []
    return failures


def compare_predictions(a: Run, b: Run, top_lines: int) -> None:
    for split in sorted(set(a.predictions) | set(b.predictions)):
        if split not in a.predictions or split not in b.predictions:
            owner = a if split in a.predictions else b
            heading(f"Predictions: {split}")
            line("", f"predictions_{split}.jsonl in {owner.label} only: not compared")
            continue
        rows_a, rows_b = a.predictions[split], b.predictions[split]
        common = [i for i in rows_a if i in rows_b]
        heading(f"Predictions: {split} ({len(common)} lines in both)")
        for run, rows in ((a, rows_a), (b, rows_b)):
            if len(rows) > len(common):
                line(f"only in {run.label}", f"{len(rows) - len(common)} lines")
        mismatched = [i for i in common if rows_a[i]["reference"] != rows_b[i]["reference"]]
        if mismatched:
            line("references differ", f"{len(mismatched)} lines (e.g. {mismatched[0]}): not the same ground truth")
        differ = [i for i in common if rows_a[i]["prediction"] != rows_b[i]["prediction"]]
        # Largest per-line CER difference first; ids break ties so the report is stable.
        differ.sort(key=lambda i: (-abs(rows_b[i]["cer"] - rows_a[i]["cer"]), i))
        top = f"; the top {min(top_lines, len(differ))} by CER difference:" if differ else ""
        line("lines that differ", f"{len(differ)} lines{top}")
        for i in differ[:top_lines]:
            ra, rb = rows_a[i], rows_b[i]
            print(f"    {i}  CER A {ra['cer']:.2f}  B {rb['cer']:.2f}  (B - A {rb['cer'] - ra['cer']:+.2f})")
            print(f"      reference  {ra['reference']}")
            print(f"      A          {ra['prediction']}")
            print(f"      B          {rb['prediction']}")


# ---------------------------------------------------------------------------------------
# The likely cause of the first difference


def find_cause(a: Run, b: Run, failures: list[str], rtol: float, cause_rtol: float) -> Cause | None:
    """The likely cause, checked in the order a difference shows: the steps' numbering, the
    step-1 loss, a later step (the optimizer), then validation CER with agreeing losses."""
    if not failures:
        return None
    common = sorted(set(a.losses) & set(b.losses))
    parting = first_parting(a.losses, b.losses, common, rtol) if common else None
    moved, _ = first_group_parting(a, b, rtol)
    if parting is None and moved is None:
        return logged_rate_cause(a, b, common, rtol) or decoding_cause(a, b, failures)
    if 0 in b.losses and 1 in a.losses and relative_gap(b.losses[0], a.losses[1]) <= rtol:
        return Cause(1, "steps", f"their steps are numbered from 0: their step 0 has the reference's step-1 loss "
                                 f"({a.losses[1]:.6g}). Fix: log step = optimizer steps done, counting from 1.")
    if parting is None:  # the losses agree, the parameters do not
        return optimizer_cause(a, b, None, rtol) if a.trace is not None else None
    if a.trace is None:
        return Cause(parting, "no trace", f"the loss parts at step {parting}. {a.path} has no {TRACE}/: write one with "
                     "`run_trocr.py RECIPE --trace_steps 20` and replay it in your loop (ReferenceBatches), and "
                     f"compare_runs.py names the cause ({DOCS}).")
    if parting == 1:
        return loss_cause(a, b, cause_rtol)
    return optimizer_cause(a, b, parting, rtol)


def loss_cause(a: Run, b: Run, cause_rtol: float) -> Cause:
    """Step 1 parts with the same weights and pixels: which loss computation (a combination of
    the usual mistakes) gives their number."""
    from transformers.utils import logging as hf_logging

    from trocr_recipe.steptrace import step_loss_variants

    theirs, reference = b.losses[1], a.losses[1]
    hf_logging.disable_progress_bar()
    try:
        variants = step_loss_variants(a.trace)
    except (OSError, ValueError, KeyError) as error:
        return Cause(1, "loss", f"the loss or the inputs (their step-1 loss {theirs:.6g}, the reference's "
                     f"{reference:.6g}); the loss variants could not be computed: {error}")
    note = ""
    if relative_gap(variants[0][1], reference) > cause_rtol:
        note = (f" (Note: the starting weights now give {variants[0][1]:.6g}, not the trace's {reference:.6g}: "
                "has the checkpoint changed since the trace?)")
    name, value, fix, also = closest_variant(variants, theirs)
    if name == variants[0][0] or relative_gap(value, theirs) > cause_rtol:
        name, value, _, _ = closest_variant(variants[1:], theirs)
        return Cause(1, "loss", f"the loss or the inputs. Their step-1 loss {theirs:.6g} matches no combination of the "
                     f"usual loss mistakes (closest: '{name}' {value:.6g}); the reference's is {reference:.6g}. With "
                     "the same weights and pixels the step-1 loss must agree: feed the batches' pixel_values "
                     "unchanged, start from the settings' model_name_or_path with dropout off, and compare your "
                     f"label and loss code with the settings' loss ({DOCS}).{note}")
    also_text = f" (on this batch as well as {', '.join(also)})" if also else ""
    return Cause(1, "loss", f"the loss. Their step-1 loss {theirs:.6g} matches '{name}' ({value:.6g}){also_text}; "
                 f"the reference's is {reference:.6g}. Fix: {fix}. See {DOCS}.{note}")


def closest_variant(variants: list[tuple[str, float, str]], theirs: float, listed: int = 3):
    """The variant nearest their loss, the simplest combination among those the batch cannot
    tell apart from it (a barely trained model's losses lie close), and up to `listed` others
    as near: (name, value, fix, [others])."""
    gaps = [relative_gap(value, theirs) for _, value, _ in variants]
    near = max(10 * min(gaps), 1e-6)
    ties = sorted((name.count(" + "), gap, i) for i, (gap, (name, _, _)) in enumerate(zip(gaps, variants))
                  if gap <= near)
    name, value, fix = variants[ties[0][2]]
    parts = set(name.split(" + "))
    # Left out: the named variant plus a part that changes nothing here (equal by arithmetic).
    others = [i for _, _, i in sorted(ties[1:], key=lambda t: t[1])
              if not (parts < set(variants[i][0].split(" + ")) and relative_gap(variants[i][1], value) < 1e-9)]
    return name, value, fix, [f"'{variants[i][0]}' ({variants[i][1]:.6g})" for i in others[:listed]]


def optimizer_cause(a: Run, b: Run, parting: int | None, rtol: float) -> Cause:
    """Step 1 agrees and a later step parts (`parting`; None when only the parameters part):
    the learning rate, a scaled gradient, the update of one parameter group, or the update."""
    from trocr_recipe.steptrace import read_settings

    settings = read_settings(a.trace)
    moved, groups = first_group_parting(a, b, rtol)
    update = min(s for s in (moved, parting and parting - 1) if s)  # the first update that differs
    if parting is None:
        head = "the optimizer. The losses agree at every step, the parameters do not"
    else:
        head = f"the optimizer. The losses agree up to step {parting - 1} and part at step {parting}"
    try:
        text = rate_text(a, b, update + 1, rtol, settings) or scaled_gradient_text(a, b, update + 1, rtol, settings)
        text = text or group_text(a, b, moved, groups, settings) or update_text(a, b, update + 1, rtol, settings)
    except KeyError as error:
        text = f"; {a.trace / 'settings.json'} lacks {error}, so the settings to compare cannot be named"
    return Cause(parting or moved, "optimizer", f"{head}{text}")


def rate_text(a: Run, b: Run, parting: int, rtol: float, settings: dict) -> str | None:
    """The first learning rate that differs before the loss parts (the rate of step s shows at s + 1),
    named as a scaled optimizer.lr or a missing warm-up where the rates show one."""
    common = sorted(set(a.learning_rates) & set(b.learning_rates))
    rate = first_parting(a.learning_rates, b.learning_rates, [s for s in common if s < parting], rtol)
    if rate is None:
        return None
    schedule, lr = settings["schedule"], settings["optimizer"]["lr"]
    theirs, ours = b.learning_rates[rate], a.learning_rates[rate]
    where = f"their learning rate at step {rate} is {theirs:.6g}, the reference's {ours:.6g}"
    ratio = rate_ratio(a, b, common, rtol)
    if ratio is not None:
        why = (f"a learning rate {ratio:.4g} x the reference's at every step: their peak rate is {ratio * lr:.6g}, "
               f"optimizer.lr is {lr:g}. Fix: lr={lr:g}")
    elif schedule["warmup_steps"] and rate <= schedule["warmup_steps"] and theirs > ours:
        why = (f"no warm-up: the reference's rate rises from {a.learning_rates[common[0]]:.6g} over "
               f"{schedule['warmup_steps']} warm-up steps, theirs is already {theirs:.6g}. Fix: "
               f"num_warmup_steps={schedule['warmup_steps']} in the scheduler ({schedule['name']})")
    else:
        why = (f"the learning rate. Compare optimizer.lr {lr:g} and the schedule ({schedule['name']}, warmup_steps "
               f"{schedule['warmup_steps']}, total_steps {schedule['total_steps']}): the rate a step uses is read "
               "before scheduler.step()")
    return f": {where}: {why}. See {DOCS}."


def rate_ratio(a: Run, b: Run, steps: list[int], rtol: float) -> float | None:
    """Their rate over the reference's where it is one constant factor (other than 1) at every step."""
    ratios = [b.learning_rates[s] / a.learning_rates[s] for s in steps if a.learning_rates[s]]
    zeros_agree = all(relative_gap(b.learning_rates[s], 0.0) <= rtol for s in steps if not a.learning_rates[s])
    if not ratios or not zeros_agree or any(relative_gap(r, ratios[0]) > max(rtol, 1e-6) for r in ratios):
        return None
    return ratios[0] if relative_gap(ratios[0], 1.0) > rtol else None


def first_group_parting(a: Run, b: Run, rtol: float) -> tuple[int | None, list[str]]:
    """The first step after whose update a parameter group's norm differs, and the groups that do."""
    for step in sorted(set(a.param_norms) & set(b.param_norms)):
        groups = [g for g in NORM_GROUPS
                  if relative_gap(a.param_norms[step][g], b.param_norms[step][g]) > rtol / NORM_RTOL_DIVISOR]
        if groups:
            return step, groups
    return None, []


def group_text(a: Run, b: Run, step: int | None, groups: list[str], settings: dict) -> str | None:
    """One parameter group alone parts, by what the reference's weight decay would make of it:
    decay shrinks a group's norm by about weight_decay x the rates summed so far."""
    if step is None or len(groups) != 1 or not all(s in a.learning_rates for s in range(1, step + 1)):
        return None
    group, other = groups[0], next(g for g in NORM_GROUPS if g != groups[0])
    theirs, ours = b.param_norms[step][group], a.param_norms[step][group]
    decay = settings["optimizer"]["weight_decay"]
    expected = decay * sum(a.learning_rates[s] for s in range(1, step + 1))
    shrunk = (ours - theirs) / ours if group == "no_decay" else (theirs - ours) / ours
    if not expected or not 0.5 <= shrunk / expected <= 2:
        return None
    evidence = (f": after step {step}'s update the norm of {NORM_GROUPS[group]} is {theirs:.9g}, the reference's "
                f"{ours:.9g} (relative {shrunk:.3g}; weight_decay {decay:g} x the rates so far: {expected:.3g}), while "
                f"{NORM_GROUPS[other]} agree")
    name = ("weight decay applied to biases/LayerNorm (the no-decay group)" if group == "no_decay"
            else "no weight decay on the decayed weights")
    return (f"{evidence}: {name}. Fix: two parameter groups as settings.json's param_groups: weight_decay {decay:g} "
            f"on the weights, 0.0 on its {len(settings['no_decay'])} no_decay parameters (biases and LayerNorm). "
            f"See {DOCS}.")


def first_norm_parting(a: Run, b: Run, parting: int, rtol: float) -> tuple[int | None, list[int]]:
    """The first step before `parting` whose gradient norms differ, and the steps both logged."""
    steps = [s for s in sorted(set(a.grad_norms) & set(b.grad_norms)) if s < parting]
    return first_parting(a.grad_norms, b.grad_norms, steps, max(rtol, 1e-4)), steps


def scaled_gradient_text(a: Run, b: Run, parting: int, rtol: float, settings: dict) -> str | None:
    """Gradient norms that differ from the first step on, with the same loss: a scaled backward."""
    norm, steps = first_norm_parting(a, b, parting, rtol)
    if norm is None or norm != steps[0]:
        return None
    ratio = b.grad_norms[norm] / a.grad_norms[norm] if a.grad_norms[norm] else math.inf
    return (f": at step {norm} their gradient norm is {ratio:.4g} x the reference's ({b.grad_norms[norm]:.6g} vs "
            f"{a.grad_norms[norm]:.6g}) with the same loss: the loss they backpropagate is not the loss they log "
            f"(divided by the accumulation steps, or scaled). Compare gradient_accumulation_steps "
            f"{settings['gradient_accumulation_steps']}: the step's loss is divided by the label tokens of the whole "
            f"step, once. See {DOCS}.")


def update_text(a: Run, b: Run, parting: int, rtol: float, settings: dict) -> str:
    """Same rates and gradients, a different update: clipping when the reference clipped, then
    weight decay, betas, eps and the optimizer."""
    norm, steps = first_norm_parting(a, b, parting, rtol)
    update = norm - 1 if norm is not None else parting - 1
    agree = "the learning rates agree" if any(s in b.learning_rates for s in a.learning_rates) else (
        "the learning rates are not logged by both")
    if norm is not None:
        agree += f" and the gradient norms part first, at step {norm}"
    limit = settings["max_grad_norm"]
    clipped = [s for s in range(1, update + 1) if a.grad_norms.get(s, 0) > limit > 0]
    if clipped:
        clipping = (f"The reference clipped the gradients at step(s) {step_ranges(clipped)} (norm "
                    f"{max(a.grad_norms[s] for s in clipped):.4g} > max_grad_norm {limit:g}): check clipping first, "
                    f"torch.nn.utils.clip_grad_norm_(model.parameters(), {limit:g}) before optimizer.step(). ")
    else:
        clipping = f"The reference did not clip before step {update + 1} (max_grad_norm {limit:g}). "
    adam = settings["optimizer"]
    return (f"; {agree}, so an update up to step {update} differs (Adam hides a scaled gradient for a while). "
            f"{clipping}Otherwise compare weight decay ({adam['weight_decay']:g}, none on the "
            f"{len(settings['no_decay'])} no_decay parameters: biases and LayerNorm), betas {adam['betas']}, eps "
            f"{adam['eps']:g} and the optimizer ({adam['name']}) with {a.trace / 'settings.json'}. See {DOCS}.")


def logged_rate_cause(a: Run, b: Run, common: list[int], rtol: float) -> Cause | None:
    """The losses agree but the logged rates do not: the rates used agree, the logging differs."""
    steps = [s for s in common if s in a.learning_rates and s in b.learning_rates]
    rate = first_parting(a.learning_rates, b.learning_rates, steps, rtol)
    if rate is None:
        return None
    shifted = [s for s in steps if s + 1 in a.learning_rates]
    if shifted and all(relative_gap(b.learning_rates[s], a.learning_rates[s + 1]) <= rtol for s in shifted):
        detail = "their rate at each step is the reference's at the next step: it is read after scheduler.step()"
    else:
        detail = f"at step {rate} theirs is {b.learning_rates[rate]:.6g}, the reference's {a.learning_rates[rate]:.6g}"
    return Cause(rate, "learning rate log", f"the learning rate as logged. The losses agree at every step, so the "
                 f"rates used agree; {detail}. Fix: log the rate the step used, read before scheduler.step().")


def decoding_cause(a: Run, b: Run, failures: list[str]) -> Cause | None:
    """The losses agree while a CER or WER differs: the models train alike, they are scored differently."""
    cer = [f for f in failures if "CER" in f or "_cer" in f or "_wer" in f]
    if not cer:
        return None
    steps = sorted(set(a.eval_cer) & set(b.eval_cer))
    step = next((s for s in steps if a.eval_cer[s] != b.eval_cer[s]), None)
    return Cause(step, "decoding", f"decoding or the metric. The losses agree at every step, yet {cer[0]}: the "
                 "models train alike and are scored differently. Compare generation (num_beams, max_length, "
                 "decoder_start_token_id </s>, length_penalty, early_stopping) and the CER itself (generate-based, "
                 f"not teacher-forced; corpus-level; on the raw references). See {DOCS}.")


def print_cause(cause: Cause) -> None:
    where = f" at step {cause.step}" if cause.step is not None else ""
    print(f"\nCAUSE{where}: {cause.text}")


# ---------------------------------------------------------------------------------------
# Plot


def plot(a: Run, b: Run, rtol: float, path: Path) -> Path:
    """Both loss curves, their relative gap per step and, when logged, both validation-CER
    curves. B is dashed on top of A so that identical curves still show both."""
    has_cer = bool(a.eval_cer or b.eval_cer)
    fig = Figure(figsize=(9, 3.2 * (3 if has_cer else 2)), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, gap_ax, *cer_ax = fig.subplots(3 if has_cer else 2, 1, sharex=True)
    styles = {a.label: {"lw": 1.6}, b.label: {"lw": 1.0, "ls": "--"}}

    for run in (a, b):
        steps = sorted(run.losses)
        loss_ax.plot(steps, [run.losses[s] for s in steps], label=f"{run.label}: {run.name}", **styles[run.label])
    if all(v > 0 for run in (a, b) for v in run.losses.values()):
        loss_ax.set_yscale("log")
    loss_ax.set(ylabel="training loss", title=f"{a.name} vs {b.name}")
    loss_ax.legend()

    common = sorted(set(a.losses) & set(b.losses))
    gaps = [relative_gap(a.losses[s], b.losses[s]) for s in common]
    gap_ax.plot(common, [g if math.isfinite(g) else math.nan for g in gaps], color="black", lw=1.0)
    gap_ax.axhline(rtol, color="red", ls=":", label=f"--loss_rtol {rtol:g}")
    # Linear below the tolerance (zeros included), logarithmic above it.
    gap_ax.set_yscale("symlog", linthresh=rtol if rtol > 0 else 1e-12)
    gap_ax.set_ylim(bottom=0)
    gap_ax.set(ylabel="relative loss gap |A-B|/max")
    gap_ax.legend()

    if has_cer:
        for run in (a, b):
            steps = sorted(run.eval_cer)
            cers = [run.eval_cer[s] for s in steps]
            cer_ax[0].plot(steps, cers, marker="o", label=f"{run.label}: {run.name}", **styles[run.label])
        cer_ax[0].set(ylabel="validation CER (%)")
        cer_ax[0].legend()
    fig.axes[-1].set_xlabel("optimizer step")

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", help="the reference run: its output folder, or its loss_log.jsonl")
    parser.add_argument("run_b", help="the run to check: its output folder, or its loss_log.jsonl")
    parser.add_argument(
        "--loss_rtol", type=float, default=1e-5,
        help="largest relative gap |a-b|/max(|a|,|b|) allowed between the two losses (and learning rates) "
        "at a step (default %(default)g)",
    )
    parser.add_argument(
        "--cer_atol", type=float, default=1e-6,
        help="largest difference allowed between two CERs or WERs, in percentage points (default %(default)g)",
    )
    parser.add_argument(
        "--top_lines", type=int, default=10, help="differently predicted lines listed per split (default %(default)s)"
    )
    parser.add_argument(
        "--max_steps", type=int, default=None,
        help="compare only steps <= N (loss and validation CER); final CER / WER are then shown but not judged",
    )
    parser.add_argument(
        "--cause_rtol", type=float, default=1e-3,
        help="with a trace: how close (relative) their step-1 loss must be to a loss variant to name it "
        "(default %(default)g)",
    )
    parser.add_argument(
        "--plot", type=Path, default=None,
        help="where to write the PNG (default: compare_<A>_vs_<B>.png in the current folder)",
    )
    return check_args(parser.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Tolerances finite and not negative, counts in range, a plot path that can be written."""
    for flag in ("loss_rtol", "cer_atol", "cause_rtol"):
        finite(f"--{flag}", getattr(args, flag), minimum=0)
    if args.top_lines < 0:
        raise BadInput(f"--top_lines {args.top_lines}: the number of lines to list, 0 or more")
    if args.max_steps is not None and not 1 <= args.max_steps <= MAX_STEP:
        raise BadInput(f"--max_steps {args.max_steps}: a step from 1 to {MAX_STEP:,}")
    if args.plot is not None:
        args.plot = plot_path(args.plot)
    return args


def plot_path(path: Path) -> Path:
    """The file the plot is written to: PNG when no format is named, never a folder, in a
    folder that exists or can be made."""
    if path.is_dir():
        raise BadInput(f"--plot {path}: a folder; give a file name such as {path / 'compare.png'}")
    if not path.suffix:
        path = path.with_suffix(".png")
    if path.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        formats = ", ".join(sorted(PLOT_FORMATS))
        raise BadInput(f"--plot {path}: format {path.suffix} not supported; use one of {formats}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise BadInput(f"--plot {path}: {blocking} is a file, not a folder")
    return path


def compare(argv=None) -> int:
    args = parse_args(argv)
    a = load_run(args.run_a, "A", args.max_steps)
    b = load_run(args.run_b, "B", args.max_steps)

    print(f"A = {a.path}\nB = {b.path}" + (f"\nonly steps <= {args.max_steps}" if args.max_steps is not None else ""))
    failures = compare_losses(a, b, args.loss_rtol)
    failures += compare_param_norms(a, b, args.loss_rtol)
    failures += compare_eval_curves(a, b, args.cer_atol)
    failures += compare_results(a, b, args.cer_atol, counted=args.max_steps is None)
    compare_predictions(a, b, args.top_lines)

    plot_path = plot(a, b, args.loss_rtol, args.plot or Path(f"compare_{a.name}_vs_{b.name}.png"))
    print(f"\nPlot: {plot_path}")
    if failures:
        print("\nVerdict: the runs DIFFER (exit 1)\n" + "\n".join(f"  - {failure}" for failure in failures))
        cause = find_cause(a, b, failures, args.loss_rtol, args.cause_rtol)
        if cause is not None:
            print_cause(cause)
        return 1
    print("\nVerdict: the runs agree within the tolerances (exit 0)")
    return 0


def main(argv=None) -> int:
    """0 the runs agree, 1 they differ, 2 bad input (one `error:` line on stderr, no report)."""
    return run_cli(compare, argv)


if __name__ == "__main__":
    sys.exit(main())
