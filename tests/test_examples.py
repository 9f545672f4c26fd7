"""examples/tutorial_loop/train.py, a training loop written as the community tutorials write
it, checked the way a user checks a loop of their own: run from a folder outside this
repository, with trocr_recipe importable only through `pip install -e`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOP = ROOT / "examples" / "tutorial_loop" / "train.py"
BATCH_MISTAKES = ("bos_in_labels", "pad_not_ignored", "decoder_start_bos")
ALL_MISTAKES = BATCH_MISTAKES + ("teacher_forced_eval",)
TRACE_STEPS = 20


def run(cwd, *argv, timeout=300):
    """A command run as the user runs it: this interpreter, from `cwd`, no PYTHONPATH (one
    thread: with models this small, a second one only waits)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    result.output = result.stdout + result.stderr
    return result


def run_loop(cwd, tiny_data, tiny_model, *argv):
    return run(cwd, LOOP, "--model", tiny_model, "--data", tiny_data, "--batch_size", "4", *argv)


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A working folder outside the repository, where trocr_recipe is importable only as installed."""
    path = tmp_path_factory.mktemp("user")
    assert ROOT not in path.parents
    return path


def test_the_check_tools_come_from_the_installed_project(outside):
    found = run(outside, "-c", "import trocr_recipe; print(trocr_recipe.__file__)")
    assert found.returncode == 0, (
        f"trocr_recipe is not importable from outside the repository: `pip install -e {ROOT}` first\n{found.output}"
    )
    assert Path(found.stdout.strip()) == ROOT / "trocr_recipe" / "__init__.py"


@pytest.fixture(scope="module")
def checked(outside, tiny_data, tiny_model):
    """The loop with --check and --save_batch, broken (the four mistakes) and fixed."""
    results = {}
    for name, mistakes in (("broken", "all"), ("fixed", "")):
        folder = outside / name
        results[name] = run_loop(outside, tiny_data, tiny_model, "--mistakes", mistakes, "--output_dir", folder,
                                 "--check", "--save_batch", folder / "batch.pt")
        results[name].folder = folder
    return results


def findings(output):
    """{name: (level, its printed block)} of the findings printed as `[level] name: message`
    followed by indented lines (evidence, effect, fix)."""
    blocks = re.findall(r"^\[(error|warning)\] (\w+): (.*\n(?:    .*\n?)*)", output, re.M)
    return {name: (level, block) for level, name, block in blocks}


# What each mistake's evidence must show on the tiny tokenizer: <s> is id 0, <pad> id 1.
EVIDENCE = {
    "bos_in_labels": r"evidence: line \d+: \[0, ",
    "pad_not_ignored": r"evidence: .*\b1, 1, 1\b",
    "decoder_start_bos": r"evidence: .*decoder_start_token_id=0\b",
    "teacher_forced_eval": r"evidence: .*argmax",
}


def test_check_names_each_mistake_of_the_broken_loop(checked):
    result = checked["broken"]
    assert result.returncode == 1, result.output
    assert f"checking with {ROOT / 'trocr_recipe' / '__init__.py'}" in result.stdout
    found = findings(result.stdout)
    for name in ALL_MISTAKES:
        assert name in found, f"{name} not found in:\n{result.output}"
        level, block = found[name]
        assert level == "error" and re.search(EVIDENCE[name], block), block


def test_check_passes_the_fixed_loop(checked):
    result = checked["fixed"]
    assert result.returncode == 0, result.output
    assert "checking with" in result.stdout
    assert [level for level, _ in findings(result.stdout).values()].count("error") == 0, result.output


def test_check_loop_cli_on_a_saved_batch(checked, outside):
    """What a batch and a saved model show: the broken loop's three label and start mistakes."""
    broken = run(outside, ROOT / "check_loop.py", "--model", checked["broken"].folder,
                 "--batch", checked["broken"].folder / "batch.pt")
    assert broken.returncode == 1, broken.output
    found = findings(broken.stdout)
    for name in BATCH_MISTAKES:
        assert name in found, f"{name} not found in:\n{broken.output}"
        level, block = found[name]
        assert level == "error" and re.search(EVIDENCE[name], block), block
    fixed = run(outside, ROOT / "check_loop.py", "--model", checked["fixed"].folder,
                "--batch", checked["fixed"].folder / "batch.pt")
    assert fixed.returncode == 0, fixed.output
    assert [level for level, _ in findings(fixed.stdout).values()].count("error") == 0, fixed.output


@pytest.fixture(scope="module")
def reference(outside, tiny_data, tiny_model):
    """The reference recipe's run with a trace of its first TRACE_STEPS steps (in-process, as
    tests/test_run_trocr.py runs it, on one thread)."""
    import torch

    import run_trocr

    folder = outside / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_trocr.main([str(ROOT / "recipes" / "tiny.json"), "--model_name_or_path", str(tiny_model),
                        "--dataset_name", str(tiny_data), "--output_dir", str(folder),
                        "--trace_steps", str(TRACE_STEPS)])
    finally:
        torch.set_num_threads(threads)
    assert len((folder / "trace" / "steps.jsonl").read_text().splitlines()) == TRACE_STEPS
    return folder


def replay_and_compare(outside, tiny_data, tiny_model, reference, capsys, name, mistakes=""):
    """The loop on the reference trace, then `compare_runs.py REFERENCE THEIRS`: (exit code, report)."""
    import compare_runs

    folder = outside / name
    replayed = run_loop(outside, tiny_data, tiny_model, "--mistakes", mistakes, "--output_dir", folder,
                        "--reference_trace", reference / "trace")
    assert replayed.returncode == 0, replayed.output
    rows = [json.loads(line) for line in (folder / "step_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, TRACE_STEPS + 1))
    assert all(set(row["param_norms"]) == {"decay", "no_decay"} for row in rows)
    capsys.readouterr()
    code = compare_runs.main([str(reference), str(folder), "--plot", str(folder / "compare.png")])
    assert (folder / "compare.png").is_file()
    return code, capsys.readouterr().out


def test_the_fixed_loop_replays_the_reference_steps(outside, tiny_data, tiny_model, reference, capsys):
    code, report = replay_and_compare(outside, tiny_data, tiny_model, reference, capsys, "replay-fixed")
    assert code == 0, report
    assert int(re.search(r"steps compared\s+(\d+)", report).group(1)) >= TRACE_STEPS, report
    gap = re.search(r"largest gap\s+(\S+)", report).group(1)
    assert gap == "0" or float(gap) < 1e-5, report
    assert re.search(rf"learning rate\s+agrees at all {TRACE_STEPS} steps", report), report


@pytest.mark.parametrize("mistake, cause", [
    ("pad", "pad tokens counted in the loss (labels padded to 64)"),
    ("bos", "<s> kept in the labels"),
    ("bos,pad,start", "<s> kept in the labels + pad tokens counted in the loss (labels padded to 64) + decoder started "
                      "from <s>"),
], ids=["pad", "bos", "all three"])
def test_a_loss_mistake_is_named_at_step_1(outside, tiny_data, tiny_model, reference, capsys, mistake, cause):
    """The loop's own label code (labels padded to its max_length 64) and special tokens, on the trace's lines."""
    name = f"replay-{mistake.replace(',', '-')}"
    code, report = replay_and_compare(outside, tiny_data, tiny_model, reference, capsys, name, mistake)
    assert code == 1, report
    named = re.search(r"^CAUSE at step (\d+): the loss\..* matches '([^']*)'", report, re.M)
    assert named and named.group(1) == "1" and named.group(2) == cause, report


def test_the_loop_trains_without_the_project(outside, tiny_data, tiny_model):
    """Only the check hooks import trocr_recipe: with it unimportable the loop still trains."""
    blocked = ("import runpy, sys; sys.modules['trocr_recipe'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = run(outside, "-c", blocked, LOOP, "--model", tiny_model, "--data", tiny_data, "--output_dir",
                 outside / "plain", "--max_steps", "2", "--num_beams", "1", "--max_target_length", "16")
    assert result.returncode == 0, result.output
    assert re.search(r"^epoch 0: step 2, loss [\d.]+, validation CER [\d.]+$", result.stdout, re.M), result.output
    assert re.search(r"^test CER [\d.]+$", result.stdout, re.M), result.output
    assert (outside / "plain" / "model.safetensors").is_file()
