"""The plain loop as a template: it imports nothing of the Trainer, `trainable` gives both
loops the same steps, the never-worse decision on the configured metric, and the worked
methods of docs/custom_loop.md applied to a copy of the script and run."""

import os
import subprocess
import sys

from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TRAINER_MODULES = ("transformers.trainer", "transformers.trainer_seq2seq", "trocr_recipe.trainer")


def test_the_plain_loop_imports_nothing_of_the_trainer(tiny_args):
    """A whole run (train, evaluate, save, resume machinery) in a fresh process: neither
    transformers' Trainer nor trocr_recipe/trainer.py is ever imported."""
    code = ("import sys, run_trocr_no_trainer\n"
            f"run_trocr_no_trainer.main({tiny_args + ['--max_steps', '2', '--eval_steps', '2', '--save_steps', '2']!r})\n"
            "print('MODULES', sorted(m for m in sys.modules if 'trainer' in m))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.split("MODULES", 1)[1]
    assert "run_trocr_no_trainer" in loaded  # the list is of the run's modules
    for name in TRAINER_MODULES:
        assert f"'{name}'" not in loaded, name
