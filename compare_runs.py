#!/usr/bin/env python
"""Is my loop right? Compare two runs step by step: loss, learning rate, validation CER,
final CER / WER and the lines predicted differently, plus a plot of both runs.

    python compare_runs.py runs/small runs/small-custom          # two run folders
    python compare_runs.py a/loss_log.jsonl b/loss_log.jsonl     # or two loss logs
    python compare_runs.py runs/small runs/small-custom --max_steps 100 --loss_rtol 1e-4

A run folder holds `loss_log.jsonl` (required) and, when the run wrote them,
`all_results.json`, `predictions_<split>.jsonl`, and a validation-CER curve:
`eval_log.jsonl` (one {"step", "eval_cer", ...} per evaluation) or else the Trainer's
`trainer_state.json` (its `log_history`; the latest checkpoint's if the run stopped early).

Any training loop can be compared: write `loss_log.jsonl`, one JSON object per optimizer
step (not per micro-batch), each step once:

    {"step": 1, "loss": 6.0315, "learning_rate": 0.0, "epoch": 0.008}

`step` is an integer, `loss` the step's mean token loss, `learning_rate` (optional, may be
null) the rate the step used, `epoch` optional. Steps are matched by number.

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
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trocr_recipe.outputs import LOSS_LOG, RESULTS, read_jsonl

EVAL_LOG = "eval_log.jsonl"
TRAINER_STATE = "trainer_state.json"
# The order the results table lists metric prefixes in; others follow alphabetically.
RESULT_ORDER = ("baseline", "eval", "test")
MAX_RANGES = 10  # step ranges listed for the steps logged by one run only


class BadInput(Exception):
    """A missing or malformed input file: exit code 2."""


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


# ---------------------------------------------------------------------------------------
# Reading


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """`read_jsonl`'s rows, each with its line number, each a JSON object."""
    try:
        rows = read_jsonl(path)
        lines = _lines(path)
    except json.JSONDecodeError as err:
        # read_jsonl parses one line at a time, so err.doc is the offending line itself.
        raise BadInput(f"{path}, line {_lines(path).index(err.doc) + 1}: not valid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: cannot read ({err})") from None
    numbered = list(zip((n for n, line in enumerate(lines, 1) if line.strip()), rows))
    for n, row in numbered:
        if not isinstance(row, dict):
            raise BadInput(f"{path}, line {n}: expected a JSON object, got {json.dumps(row)[:80]}")
    return numbered


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as stream:  # the same line splitting as read_jsonl
        return stream.readlines()


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_step_values(path: Path, key: str, max_steps: int | None) -> tuple[dict[int, float], dict[int, dict]]:
    """{step: row[key]} from a JSONL file with one row per step, and the rows themselves."""
    values, rows, lines = {}, {}, {}
    for n, row in read_rows(path):
        step, value = row.get("step"), row.get(key)
        if not isinstance(step, int) or isinstance(step, bool) or not _is_number(value):
            got = json.dumps(row)[:120]
            raise BadInput(f'{path}, line {n}: needs an integer "step" and a number "{key}", got {got}')
        if step in lines:
            raise BadInput(f"{path}, line {n}: step {step} already logged on line {lines[step]}")
        lines[step] = n
        if max_steps is None or step <= max_steps:
            values[step], rows[step] = float(value), row
    return values, rows


def read_loss_log(path: Path, max_steps: int | None) -> tuple[dict[int, float], dict[int, float]]:
    losses, rows = read_step_values(path, "loss", max_steps)
    if not losses:
        raise BadInput(f"{path}: no steps" + (f" up to --max_steps {max_steps}" if max_steps is not None else ""))
    # The reference loop logs null when the scheduler gave no rate: compare where both have one.
    rates = {step: float(row["learning_rate"]) for step, row in rows.items() if _is_number(row.get("learning_rate"))}
    return losses, rates


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
    history = read_json(state).get("log_history", [])
    curve = {
        entry["step"]: float(entry["eval_cer"])
        for entry in history
        if isinstance(entry, dict) and _is_number(entry.get("eval_cer")) and isinstance(entry.get("step"), int)
    }
    curve = {step: cer for step, cer in curve.items() if max_steps is None or step <= max_steps}
    return curve, str(state.relative_to(folder))


def read_predictions(path: Path) -> dict[str, dict]:
    by_id = {}
    for n, row in read_rows(path):
        missing = [key for key in ("id", "reference", "prediction", "cer") if key not in row]
        if missing or not _is_number(row["cer"]):
            raise BadInput(f'{path}, line {n}: needs "id", "reference", "prediction" and a number "cer"')
        if str(row["id"]) in by_id:
            raise BadInput(f"{path}, line {n}: line id {row['id']} appears twice")
        by_id[str(row["id"])] = row
    return by_id


def run_name(path: Path) -> str:
    # A loss log is named after its run folder: every run's file is called loss_log.jsonl.
    if path.is_file() and path.name == LOSS_LOG:
        path = path.parent
    return path.resolve().name if path.is_dir() else path.stem


def load_run(path: str, label: str, max_steps: int | None) -> Run:
    path = Path(path)
    if path.is_file():  # a loss log alone: nothing else to compare
        folder, loss_log = None, path
    elif path.is_dir():
        folder, loss_log = path, path / LOSS_LOG
        if not loss_log.is_file():
            raise BadInput(f"{path}: no {LOSS_LOG} (see the format in `python compare_runs.py --help`)")
    else:
        raise BadInput(f"{path}: no such file or folder")
    losses, rates = read_loss_log(loss_log, max_steps)
    if folder is None:
        return Run(label, run_name(path), path, losses, rates, {}, None, {}, {})
    eval_cer, eval_source = read_eval_curve(folder, max_steps)
    results = read_json(folder / RESULTS) if (folder / RESULTS).is_file() else {}
    predictions = {
        p.stem.removeprefix("predictions_"): read_predictions(p) for p in sorted(folder.glob("predictions_*.jsonl"))
    }
    return Run(label, run_name(path), path, losses, rates, eval_cer, eval_source, results, predictions)


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
    heading(f"Loss per step ({LOSS_LOG}, relative tolerance {rtol:g})")
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "--plot", type=Path, default=None,
        help="where to write the PNG (default: compare_<A>_vs_<B>.png in the current folder)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        a = load_run(args.run_a, "A", args.max_steps)
        b = load_run(args.run_b, "B", args.max_steps)
    except BadInput as err:
        print(f"compare_runs: {err}", file=sys.stderr)
        return 2

    print(f"A = {a.path}\nB = {b.path}" + (f"\nonly steps <= {args.max_steps}" if args.max_steps is not None else ""))
    failures = compare_losses(a, b, args.loss_rtol)
    failures += compare_eval_curves(a, b, args.cer_atol)
    failures += compare_results(a, b, args.cer_atol, counted=args.max_steps is None)
    compare_predictions(a, b, args.top_lines)

    plot_path = plot(a, b, args.loss_rtol, args.plot or Path(f"compare_{a.name}_vs_{b.name}.png"))
    print(f"\nPlot: {plot_path}")
    if failures:
        print("\nVerdict: the runs DIFFER (exit 1)\n" + "\n".join(f"  - {failure}" for failure in failures))
        return 1
    print("\nVerdict: the runs agree within the tolerances (exit 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
