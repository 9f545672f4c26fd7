"""Smoke test of benchmarks/: each script runs on tiny sizes (--quick) and ends with its
`NAME ratio=X.XX` line. No timing is asserted: the figures are in docs/speed.md."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("name", ["bench_data", "bench_eval", "bench_train"])
def test_benchmark_runs_and_prints_its_ratio(name):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(rf"{name} ratio=\d+\.\d\d", lines[-1]), lines[-5:]
    # The table before it: a header row and its rule.
    assert any(set(line.replace(" ", "")) == {"-"} for line in lines), result.stdout
