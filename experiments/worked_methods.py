#!/usr/bin/env python
"""The worked methods of docs/custom_loop.md measured against the plain fine-tuning they
change: each diff applied to a copy of run_trocr_no_trainer.py, the demo's stage 2 run with
it once per seed, beside the plain loop on the same recipe and seeds.

    make demo                                          # runs/demo and data/newhand
    python experiments/worked_methods.py --seeds 42 43 44   # about 10 minutes on a 2-core CPU

Prints a Markdown table of test CER (mean and range over the seeds, and against the plain
run of the same seed); writes it with every figure to <output_dir>/methods.md and
methods.json; --readme puts it into docs/custom_loop.md.
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

from pitfalls import mean_range, write_readme  # noqa: E402

DOC = ROOT / "docs" / "custom_loop.md"
START, END = "<!-- methods:start -->", "<!-- methods:end -->"
# name -> (index of the diff in docs/custom_loop.md, or None for the plain loop; the method's values)
METHODS = {
    "plain fine-tuning": (None, {}),
    "extra loss: confidence penalty, entropy_weight 0.1": (0, {"entropy_weight": 0.1}),
    "layer-wise rate: encoder_lr_scale 0.1": (1, {"encoder_lr_scale": 0.1}),
}


def worked_methods() -> list[str]:
    """The diffs of docs/custom_loop.md's worked methods, in order."""
    return re.findall(r"```diff\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


def script_with(diff: str | None, folder: Path) -> Path:
    """A copy of run_trocr_no_trainer.py in `folder` with `diff` applied (git apply), or the script itself."""
    if diff is None:
        return ROOT / "run_trocr_no_trainer.py"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_trocr_no_trainer.py").write_text((ROOT / "run_trocr_no_trainer.py").read_text())
    (folder / "method.diff").write_text(diff)
    applied = subprocess.run(["git", "apply", "method.diff"], cwd=folder, capture_output=True, text=True)
    if applied.returncode:
        raise SystemExit(f"{DOC}: a worked method's diff no longer applies to run_trocr_no_trainer.py:\n"
                         f"{applied.stderr}")
    return folder / "run_trocr_no_trainer.py"


def run(script: Path, args, method: dict, seed: int, output_dir: Path) -> dict:
    """One stage-2 run; its all_results.json."""
    command = [sys.executable, str(script), args.recipe, "--seed", str(seed), "--output_dir", str(output_dir),
               "--disable_tqdm", "true", *args.extra]
    if method:
        command += ["--method", json.dumps(method)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((output_dir / "all_results.json").read_text())


def markdown(table: dict, args) -> str:
    """Test CER per method over the seeds, and against the plain run of each seed."""
    plain = table["plain fine-tuning"]
    lines = [f"`{args.recipe}` run by `run_trocr_no_trainer.py`, as is and with each worked method applied, once per "
             f"seed ({', '.join(map(str, args.seeds))}). Test CER: corpus-level, generate-based, the model the run "
             f"keeps; baseline {plain[0]['baseline_test_cer']:.2f} (the starting model).", "",
             "| method | test CER, mean (range) | against the plain run: mean (range) | validation CER |",
             "|---|---|---|---|"]
    for name, rows in table.items():
        cers = [row["test_cer"] for row in rows]
        gaps = [row["test_cer"] - base["test_cer"] for row, base in zip(rows, plain)]
        lines.append(f"| {name} | {mean_range(cers)} | {mean_range(gaps, '+.2f')} | "
                     f"{statistics.mean(row['eval_cer'] for row in rows):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo_newhand.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--output_dir", default="runs/methods")
    parser.add_argument("--readme", action="store_true", help=f"write the table into {DOC.relative_to(ROOT)}")
    parser.add_argument("extra", nargs="*", help="more flags for every run, after --, e.g. -- --max_steps 40")
    args = parser.parse_args(argv)
    diffs, output, started = worked_methods(), Path(args.output_dir), time.time()
    table = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (index, method) in METHODS.items():
            script = script_with(None if index is None else diffs[index], Path(scratch) / str(index))
            for seed in args.seeds:
                row_started = time.time()
                folder = output / f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}-{seed}"
                shutil.rmtree(folder, ignore_errors=True)  # a run in a folder with checkpoints resumes
                row = run(script, args, method, seed, folder)
                table.setdefault(name, []).append(row)
                print(f"{name}, seed {seed}: test CER {row['baseline_test_cer']:.2f} -> {row['test_cer']:.2f} "
                      f"({time.time() - row_started:.0f} s)", flush=True)
    text = markdown(table, args)
    (output / "methods.md").write_text(text, encoding="utf-8")
    (output / "methods.json").write_text(json.dumps({"settings": vars(args), "seconds": round(time.time() - started),
                                                     "runs": table}, indent=2) + "\n", encoding="utf-8")
    print(text)
    if args.readme:
        write_readme(text, DOC, START, END)
    print(f"{time.time() - started:.0f} s in all; wrote {output / 'methods.md'} and methods.json")


if __name__ == "__main__":
    main()
