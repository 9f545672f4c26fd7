#!/usr/bin/env python
"""Seconds per optimizer step of run_trocr.py (Seq2SeqTrainer) and of
run_trocr_no_trainer.py (the plain accelerate loop) on the same run.

    python benchmarks/bench_train.py                 # the figure of docs/speed.md
    python benchmarks/bench_train.py --quick         # smoke test

The tiny data and model are built into a temporary folder by the project's own
data_scripts (make_synthetic.py, make_tiny_model.py --preset tiny, as `make tiny`); both
scripts' main() then run in this process on recipes/tiny.json, with evaluation, saving and
test scoring turned off (they are not training) and --max_steps set, so that both do the
same work: the same batches, augmentation, forward, backward, clipping, optimizer,
scheduler and per-step logging (loss_log.jsonl, TensorBoard). The runs alternate
(trainer, loop, loop, trainer, ...).

A step is timed between two consecutive rows written to loss_log.jsonl, which both loops
write once per optimizer step (trocr_recipe.outputs.LossLog.append is wrapped to note the
time): start-up, the first step (warm-up, data loader start) and everything after the
last step are left out. The last line is `bench_train ratio=X.XX`: loop time over Trainer
time per step (1.00 = the Trainer costs nothing; the target is >= 0.95).
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_common_args, median, print_table, progress, ratio_line, setup  # noqa: E402


import make_synthetic  # noqa: E402
import make_tiny_model  # noqa: E402
import run_trocr  # noqa: E402
import run_trocr_no_trainer  # noqa: E402
from trocr_recipe import outputs  # noqa: E402

LOOPS = {"trainer": run_trocr.main, "loop": run_trocr_no_trainer.main}


@contextlib.contextmanager
def step_clock(times: list[float]):
    """Notes the time of every loss_log.jsonl row (one per optimizer step, both loops)."""
    append = outputs.LossLog.append

    def timed(self, *args, **kwargs):
        append(self, *args, **kwargs)
        times.append(time.perf_counter())

    outputs.LossLog.append = timed
    try:
        yield
    finally:
        outputs.LossLog.append = append


@contextlib.contextmanager
def output_to(path: Path):
    """The runs' logs and progress bars go to a file, at the file-descriptor level, so that
    they cost what they cost without filling the table."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_once(name: str, recipe_args: list[str], output_dir: Path, log: Path) -> list[float]:
    """One run's step durations in seconds (the first step left out)."""
    times: list[float] = []
    with step_clock(times), output_to(log):
        LOOPS[name](recipe_args + ["--output_dir", str(output_dir)])
    if len(times) < 3:
        raise SystemExit(f"{name}: only {len(times)} steps were logged; see {log}")
    return [later - earlier for earlier, later in zip(times, times[1:])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=40, help="Optimizer steps per run (8 per epoch of the tiny data).")
    parser.add_argument("--preset", choices=("tiny", "demo"), default="tiny",
                        help="Model size of data_scripts/make_tiny_model.py (tiny: recipes/tiny.json's model).")
    parser.add_argument("--num_train", type=int, default=32, help="Training lines generated (make tiny: 32).")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="Further recipe flags for both runs, e.g. --extra --gradient_accumulation_steps 2.")
    parser.add_argument("--keep", metavar="DIR", default=None, help="Build data, model and runs in DIR and keep them.")
    add_common_args(parser, repeats=7)
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps = 5
    device = setup(args)
    use_cpu = ["--use_cpu", "true"] if device.type == "cpu" else []

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        log = work / "runs.log"
        data, model = work / "data", work / "model"
        progress(f"building the tiny data and model in {work} (logs of the runs: {log})")
        with output_to(log):
            make_synthetic.main(["--output_dir", str(data), "--num_train", str(args.num_train),
                                 "--num_validation", "8", "--num_test", "7", "--seed", str(args.seed)])
            make_tiny_model.main(["--dataset", str(data), "--output_dir", str(model), "--preset", args.preset])
        recipe_args = [
            str(ROOT / "recipes" / "tiny.json"), "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--max_steps", str(args.max_steps), "--do_eval", "false", "--do_predict", "false",
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        ] + use_cpu + args.extra

        names = list(LOOPS)
        steps = {name: [] for name in names}  # per run: step durations
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else reversed(names):
                progress(f"repetition {repeat + 1}/{args.repeats}: {name}, {args.max_steps} steps")
                steps[name].append(run_once(name, recipe_args, work / f"{name}-{repeat}", log))

    # Per run: the mean step (everything between the first and the last logged step) and the
    # median step; across runs, the median of each.
    rows, per_step = [], {}
    for name in names:
        means = [sum(run) / len(run) for run in steps[name]]
        medians = [median(run) for run in steps[name]]
        per_step[name] = median(means)
        rows.append([name, 1000 * per_step[name], 1000 * median(medians), 1000 * min(means), 1000 * max(means)])
    for row in rows:
        row.append(per_step["loop"] / per_step[row[0]])
    print(f"# recipes/tiny.json, model preset {args.preset}, {args.max_steps} steps per run "
          f"({args.max_steps - 1} timed), {args.repeats} run(s) each")
    print_table(["run", "ms/step", "median step", "fastest run", "slowest run", "loop/this"], rows)
    ratio_line("bench_train", per_step["loop"] / per_step["trainer"])


if __name__ == "__main__":
    main()
