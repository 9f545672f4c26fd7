#!/usr/bin/env python
"""The two stages of `make demo`, side by side: stage 1's CER on its synthetic hands (each
font apart), then the new hand's test CER read by the stage-1 model (before) and after
fine-tuning on that hand, with a few of its test lines: reference, before, after.

    python data_scripts/demo_report.py            # after make demo
"""

import argparse
import json
from pathlib import Path

from datasets import load_from_disk

from trocr_recipe.metrics import corpus_cer
from trocr_recipe.outputs import read_jsonl


def read_results(run: Path) -> dict:
    path = run / "all_results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found. Run `make demo` first: it writes both stages' runs.")
    return json.loads(path.read_text(encoding="utf-8"))


def cer_per_font(run: Path, dataset: str) -> dict[str, float]:
    """The test CER of each font, from the run's predictions and the dataset's `font` column."""
    test = load_from_disk(dataset)["test"]
    font = dict(zip(test["id"], test["font"]))
    rows: dict[str, list[dict]] = {}
    for row in read_jsonl(run / "predictions_test.jsonl"):
        rows.setdefault(font[row["id"]], []).append(row)
    return {
        name: corpus_cer([row["reference"] for row in group], [row["prediction"] for row in group])
        for name, group in sorted(rows.items())
    }


def before_and_after(run: Path, count: int) -> list[tuple[str, str, str]]:
    """Test lines of the new hand whose reading changed: (reference, before, after)."""
    before = {row["id"]: row["prediction"] for row in read_jsonl(run / "predictions_baseline_test.jsonl")}
    after = read_jsonl(run / "predictions_test.jsonl")
    changed = [(row["reference"], before[row["id"]], row["prediction"]) for row in after
               if before[row["id"]] != row["prediction"]]
    return changed[:count]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", default="runs/demo", help="Stage-1 run folder (synthetic hands).")
    parser.add_argument("--stage1_data", default="data/synthetic", help="Its dataset, for the font of each line.")
    parser.add_argument("--stage2", default="runs/demo-newhand", help="Stage-2 run folder (the new hand).")
    parser.add_argument("--lines", type=int, default=5, help="Test lines of the new hand to show.")
    args = parser.parse_args(argv)

    stage1, stage2 = Path(args.stage1), Path(args.stage2)
    first, second = read_results(stage1), read_results(stage2)
    fonts = ", ".join(f"{name} {cer:.1f}" for name, cer in cer_per_font(stage1, args.stage1_data).items())
    print(f"Stage 1, synthetic hands: validation CER {first['eval_cer']:.1f}, test CER {first['test_cer']:.1f} "
          f"({fonts})")
    print(f"Stage 2, a new hand: test CER {second['baseline_test_cer']:.1f} before fine-tuning, "
          f"{second['test_cer']:.1f} after (validation {second['baseline_cer']:.1f} -> {second['eval_cer']:.1f})")
    for reference, before, after in before_and_after(stage2, args.lines):
        print(f"  reference: {reference}\n  before:    {before}\n  after:     {after}")
    print(f"Figures: {stage1 / 'all_results.json'}, {stage2 / 'all_results.json'}; "
          f"lines read worst: {stage2 / 'worst_test.png'}")


if __name__ == "__main__":
    main()
