"""The checks of your own loop stand alone: they import none of the recipe's modules (which
need transformers 5.23 and say so at import), so they also run in a researcher's environment
on transformers 4.46 (`make test-check` runs this file there)."""

import importlib
import subprocess
import sys

import pytest
import transformers

from conftest import ROOT

RECIPE = ("trocr_recipe.loop_setup", "trocr_recipe.trainer", "trocr_recipe.generation", "trocr_recipe.pipeline")


def test_the_checks_import_none_of_the_recipe():
    code = ("import sys, trocr_recipe.loopcheck, trocr_recipe.steptrace, check_loop, compare_runs; "
            f"print(sorted(name for name in sys.modules if name in {RECIPE!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", RECIPE)
def test_the_recipe_names_the_transformers_it_needs(module, monkeypatch):
    import trocr_recipe

    monkeypatch.setattr(transformers, "__version__", "4.46.3")
    for name in ("trocr_recipe.recipe_only", module):  # imported afresh, the guard with them
        monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.delattr(trocr_recipe, name.rsplit(".", 1)[1], raising=False)
    with pytest.raises(ImportError, match=r"needs transformers>=5\.23, this environment has 4\.46\.3: pip install"):
        importlib.import_module(module)
