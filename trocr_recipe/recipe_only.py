"""Imported first by the recipe's own modules (loop_setup, trainer, generation, pipeline): on a
transformers older than the recipe's, an ImportError that says so, where the checks of your
own loop (loopcheck, check_loop.py, compare_runs.py, ReferenceBatches, StepLog) still work."""

import transformers
from packaging.version import Version

RECIPE_TRANSFORMERS = "5.23"  # requirements.txt; the checks need requirements/base.txt's 4.46

if Version(transformers.__version__) < Version(RECIPE_TRANSFORMERS):
    raise ImportError(
        f"The recipe (run_trocr.py, run_trocr_no_trainer.py, predict.py; trocr_recipe.loop_setup, trainer, generation, "
        f"pipeline) needs transformers>={RECIPE_TRANSFORMERS}, this environment has {transformers.__version__}: "
        f"pip install 'transformers>={RECIPE_TRANSFORMERS},<6' in an environment of its own. The checks of your own "
        "loop (trocr_recipe.loopcheck, check_loop.py, compare_runs.py, ReferenceBatches, StepLog) work from 4.46.")
