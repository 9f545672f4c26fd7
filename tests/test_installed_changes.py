"""requirements/installed_changes.py, which make test-check runs on `pip install -e .` in a
researcher's environment: an upgrade or a removal fails, a test or font package fails, a
downgrade is printed and passes."""

import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "requirements" / "installed_changes.py"
BEFORE = "torch==2.6.0+cu124\ntransformers==4.46.3\nfsspec==2026.9.0\n"


def changes(tmp_path, after: str):
    (tmp_path / "before.txt").write_text(BEFORE)
    (tmp_path / "after.txt").write_text(after)
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "before.txt"), str(tmp_path / "after.txt")],
                          capture_output=True, text=True)


def test_nothing_upgraded_passes_and_a_downgrade_is_printed(tmp_path):
    done = changes(tmp_path, BEFORE.replace("fsspec==2026.9.0", "fsspec==2026.6.0") + "datasets==5.0.1\n")
    assert done.returncode == 0, done.stdout
    assert "upgraded or removed: none" in done.stdout and "downgraded: fsspec 2026.9.0 -> 2026.6.0" in done.stdout


def test_an_upgrade_a_removal_or_a_test_package_fails(tmp_path):
    upgraded = changes(tmp_path, BEFORE.replace("transformers==4.46.3", "transformers==5.25.0"))
    assert upgraded.returncode == 1 and "transformers 4.46.3 -> 5.25.0" in upgraded.stdout
    removed = changes(tmp_path, "torch==2.6.0+cu124\nfsspec==2026.9.0\n")
    assert removed.returncode == 1 and "transformers 4.46.3 -> removed" in removed.stdout
    local_upgrade = changes(tmp_path, BEFORE.replace("torch==2.6.0+cu124", "torch==2.13.0+cpu"))
    assert local_upgrade.returncode == 1 and "torch 2.6.0+cu124 -> 2.13.0+cpu" in local_upgrade.stdout
    extras = changes(tmp_path, BEFORE + "pytest==8.4.0\nfontpkg-caveat==2.0.0\n")
    assert extras.returncode == 1 and "installed: pytest, fontpkg-caveat" in extras.stdout
