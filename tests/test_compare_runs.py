"""compare_runs.py on synthetic run folders: no model, no training."""

import json
import math

import pytest
from PIL import Image

import compare_runs

STEPS = range(1, 13)


def losses(part_at=None, factor=1 + 1e-3):
    """A falling loss curve; from step `part_at` on, multiplied by `factor`."""
    return {s: (5.0 * math.exp(-0.1 * s)) * (factor if part_at and s >= part_at else 1.0) for s in STEPS}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_run(
    folder, loss=None, rate=lambda s: 1e-5 * s, results=None, predictions=None, eval_log=None, trainer_state=None,
    grad_norm=None, param_norms=None, log="loss_log.jsonl",
):
    """A run folder as run_trocr.py writes it; `eval_log` / `trainer_state` give the CER curve {step: cer},
    `grad_norm` a gradient norm per step and `param_norms` the two groups' norms per step (as a foreign
    loop's StepLog writes them, into `log`)."""
    folder.mkdir(parents=True)
    loss = losses() if loss is None else loss
    rows = [{"step": s, "loss": v, "learning_rate": rate(s), "epoch": s / 4} for s, v in loss.items()]
    for row in rows if grad_norm else []:
        row["grad_norm"] = grad_norm(row["step"])
    for row in rows if param_norms else []:
        row["param_norms"] = param_norms(row["step"])
    write_jsonl(folder / log, rows)
    if results is not None:
        (folder / "all_results.json").write_text(json.dumps(results))
    for split, rows in (predictions or {}).items():
        write_jsonl(folder / f"predictions_{split}.jsonl", rows)
    if eval_log is not None:
        write_jsonl(folder / "eval_log.jsonl", [{"step": s, "eval_cer": c, "eval_wer": c} for s, c in eval_log.items()])
    if trainer_state is not None:
        evaluations = [{"eval_cer": c, "eval_loss": 0.5, "step": s} for s, c in trainer_state.items()]
        history = [{"loss": 1.0, "step": 1}, *evaluations]  # training entries carry no eval_cer
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 12, "log_history": history}))
    return folder


def run(capsys, *argv):
    code = compare_runs.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def report_line(out, label):
    """The first row of a report section (indented) whose label starts with `label`."""
    return next(line for line in out.splitlines() if line.startswith("  ") and line.strip().startswith(label))


RESULTS = {
    "baseline_cer": 40.0, "eval_cer": 10.0, "eval_wer": 30.0, "test_cer": 12.0, "test_wer": 33.0, "train_loss": 1.2,
}


def test_identical_runs_agree(tmp_path, capsys):
    a = make_run(tmp_path / "a", results=RESULTS, trainer_state={4: 20.0, 8: 15.0, 12: 10.0})
    b = make_run(tmp_path / "b", results=RESULTS, eval_log={4: 20.0, 8: 15.0, 12: 10.0})
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 0
    assert "steps compared        12 (1-12)" in out
    assert "largest gap           0 (identical at every common step)" in out
    assert "agrees at all 12 steps" in report_line(out, "learning rate")
    assert "3 evaluation(s) (trainer_state.json)" in report_line(out, "A ")
    assert "3 evaluation(s) (eval_log.jsonl)" in report_line(out, "B ")
    assert report_line(out, "test_cer").split() == ["test_cer", "12.0000", "12.0000", "+0.0000"]
    assert "train_loss" not in out  # CER and WER only
    assert "the runs agree within the tolerances (exit 0)" in out


def test_runs_that_part_at_step_7(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", loss=losses(part_at=7))
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    parting = report_line(out, "loss parts at step")
    assert parting.split()[4:9] == ["7:", "A", f"{losses()[7]:.9g}", "B", f"{losses(part_at=7)[7]:.9g}"]
    assert float(report_line(out, "largest gap").split()[2]) == pytest.approx(1e-3 / (1 + 1e-3), rel=1e-3)
    assert "the loss parts at step 7" in out.split("Verdict")[1]
    # A looser tolerance accepts the same runs; --max_steps 6 stops before they part.
    assert run(capsys, a, b, "--plot", tmp_path / "p.png", "--loss_rtol", "2e-3")[0] == 0
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "p.png", "--max_steps", "6")
    assert code == 0 and "steps compared        6 (1-6)" in out


def test_learning_rate_disagreement_is_reported(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", rate=lambda s: 1e-5 * s if s < 3 else 2e-5 * s)
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    assert report_line(out, "learning rate").endswith("first differs at step 3: A 3e-05  B 6e-05")
    assert "loss                  agrees at every common step" in out


@pytest.mark.parametrize(
    "lines, bad_line, message",
    [
        # A blank line before the bad one: line numbers count every line of the file.
        (['{"step": 1, "loss": 2.0}', "", '{"step": 2, "loss": 1.9,', '{"step": 3, "loss": 1.8}'], 3, "not valid JSON"),
        (['{"step": 1, "loss": 2.0}', '{"step": 2, "lr": 1e-5}'], 2, 'needs an integer "step" and a number "loss"'),
        (['{"step": 1, "loss": 2.0}', '[1, 2.0]'], 2, "expected a JSON object"),
        (['{"step": 1, "loss": 2.0}', '{"step": 1, "loss": 2.0}'], 2, "step 1 already logged on line 1"),
    ],
)
def test_malformed_loss_log_is_bad_input(tmp_path, capsys, lines, bad_line, message):
    a = make_run(tmp_path / "a")
    b = tmp_path / "b" / "loss_log.jsonl"
    b.parent.mkdir()
    b.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run(capsys, a, b.parent, "--plot", tmp_path / "plot.png")
    assert code == 2
    assert f"{b}, line {bad_line}: {message}" in err
    assert out == "" and not (tmp_path / "plot.png").exists()


def test_missing_inputs_are_bad_input(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, a, tmp_path / "empty")
    assert code == 2 and f"{tmp_path / 'empty'}: no loss_log.jsonl" in err
    code, _, err = run(capsys, tmp_path / "nowhere", a)
    assert code == 2 and f"{tmp_path / 'nowhere'}: no such file or folder" in err
    (a / "all_results.json").write_text('{\n  "eval_cer": 4.2,\n  "test_cer": \n}')
    code, _, err = run(capsys, a, a)
    assert code == 2 and f"{a / 'all_results.json'}, line 4: not valid JSON" in err


def prediction(line_id, reference, prediction, cer):
    return {"id": line_id, "reference": reference, "prediction": prediction, "cer": cer}


def test_differing_predictions_are_listed_largest_cer_difference_first(tmp_path, capsys):
    same = prediction("l0", "same line", "same line", 0.0)
    rows_a = [
        same,
        prediction("l1", "a small slip", "a small slip", 0.0),
        prediction("l2", "a big miss", "a big miss", 0.0),
        prediction("l3", "better in B", "betr in B", 18.18),
    ]
    rows_b = [
        same,
        prediction("l1", "a small slip", "a smal slip", 8.33),  # +8.33
        prediction("l2", "a big miss", "xx", 100.0),  # +100
        prediction("l3", "better in B", "better in B", 0.0),  # -18.18: ranked by the size of the difference
    ]
    a = make_run(tmp_path / "a", results=RESULTS, predictions={"test": rows_a, "validation": [same]})
    b = make_run(tmp_path / "b", results={**RESULTS, "test_cer": 12.5}, predictions={"test": rows_b})
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png", "--top_lines", "2")
    assert code == 1
    assert "test_cer differs by +0.5 (A 12.0000, B 12.5000)" in out
    assert report_line(out, "test_cer").split() == ["test_cer", "12.0000", "12.5000", "+0.5000"]
    assert "== Predictions: test (4 lines in both) ==" in out
    assert "3 lines; the top 2 by CER difference:" in report_line(out, "lines that differ")
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    l")]
    assert listed == ["l2", "l3"]  # 100 points, then 18.18; l1 (8.33) is past --top_lines
    assert "      B          xx" in out
    assert "predictions_validation.jsonl in A only: not compared" in out
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert [line.split()[0] for line in out.splitlines() if line.startswith("    l")] == ["l2", "l3", "l1"]
    # --max_steps judges the first steps only: final results are shown, not judged.
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png", "--max_steps", "12")
    assert code == 0 and "+0.5000" in report_line(out, "test_cer") and "(not part of the verdict" in out


def test_steps_missing_in_one_run(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", loss={s: v for s, v in losses().items() if s not in (4, 5, 9)})
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    assert "steps compared        9 (1-3, 6-8, 10-12)" in out
    assert report_line(out, "only in A").split()[3:] == ["3", "step(s):", "4-5,", "9"]
    assert report_line(out, "only in B").split()[3:] == ["none"]
    assert "loss                  agrees at every common step" in out
    assert "3 step(s) logged by A only" in out.split("Verdict")[1]


def test_validation_cer_curves_that_differ(tmp_path, capsys):
    a = make_run(tmp_path / "a", trainer_state={4: 20.0, 8: 15.0, 12: 10.0})
    b = make_run(tmp_path / "b", eval_log={4: 20.0, 8: 15.5, 12: 10.0})
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    assert "0.5 at step 8: A 15.0000  B 15.5000" in report_line(out, "largest difference")
    assert "8: A 15.0000  B 15.5000" in report_line(out, "first differs at step")
    assert "the validation CER differs from step 8" in out.split("Verdict")[1]


def test_plot_is_a_png(tmp_path, capsys, monkeypatch):
    a = make_run(tmp_path / "ref", trainer_state={4: 20.0, 8: 15.0, 12: 10.0})
    b = make_run(tmp_path / "mine", loss=losses(part_at=7), eval_log={4: 20.0, 8: 16.0, 12: 11.0})
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, a, b)
    assert code == 1
    assert "Plot: compare_ref_vs_mine.png" in out
    with Image.open(tmp_path / "compare_ref_vs_mine.png") as image:
        assert image.format == "PNG" and image.width > 500 and image.height > 500
        image.verify()


def test_two_loss_log_files(tmp_path, capsys, monkeypatch):
    a = make_run(tmp_path / "ref", results=RESULTS) / "loss_log.jsonl"
    b = make_run(tmp_path / "mine", results={**RESULTS, "test_cer": 50.0}) / "loss_log.jsonl"
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, a, b)
    assert code == 0  # a loss log alone: the results beside it are not read
    assert f"A = {a}\nB = {b}" in out
    assert "steps compared        12 (1-12)" in out
    assert "no CER curve: a loss log alone was given" in report_line(out, "A ")
    assert "no CER or WER to compare (no all_results.json in either run)" in out
    with Image.open(tmp_path / "compare_ref_vs_mine.png") as image:
        assert image.format == "PNG"


def test_relative_gap():
    assert compare_runs.relative_gap(2.0, 2.0) == 0.0
    assert compare_runs.relative_gap(1.0, 1.001) == pytest.approx(1e-3 / 1.001)
    assert compare_runs.relative_gap(0.0, 1e-13) == pytest.approx(0.1)  # 1e-13 / the 1e-12 floor
    assert compare_runs.relative_gap(math.nan, math.nan) == 0.0
    assert compare_runs.relative_gap(math.nan, 1.0) == math.inf
    assert compare_runs.relative_gap(math.inf, 1.0) == math.inf


# ---------------------------------------------------------------------------------------
# The cause, named after the verdict


def norms(step, decay_shrink=0.0, no_decay_shrink=0.0):
    """The two groups' parameter norms after `step` updates, each group shrunk by a factor per step."""
    return {"decay": 40.0 * (1 - decay_shrink) ** step, "no_decay": 15.0 * (1 - no_decay_shrink) ** step}


def fake_trace(folder, grad_norm=lambda s: 0.5, max_grad_norm=1.0, param_norms=None):
    """A trace's settings and per-step rows, without batches: what the optimizer's cause reads."""
    trace = folder / "trace"
    trace.mkdir()
    settings = {
        "format": 1, "model_name_or_path": "models/tiny",
        "optimizer": {"name": "AdamW", "lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
        "param_groups": [{"weight_decay": 0.01, "params": ["w"]}, {"weight_decay": 0.0, "params": ["b", "ln.weight"]}],
        "no_decay": ["b", "ln.weight"],
        "schedule": {"name": "linear", "warmup_steps": 2, "total_steps": 12, "kwargs": {}},
        "max_grad_norm": max_grad_norm, "gradient_accumulation_steps": 4,
    }
    (trace / "settings.json").write_text(json.dumps(settings))
    rows = [{"step": s, "loss": v, "label_tokens": 40, "grad_norm": grad_norm(s), "learning_rate": 1e-5 * s,
             "micro_batches": []} for s, v in losses().items()]
    for row in rows if param_norms else []:
        row["param_norms"] = param_norms(row["step"])
    write_jsonl(trace / "steps.jsonl", rows)
    return folder


def cause(out):
    return next(line for line in out.splitlines() if line.startswith("CAUSE"))


def rate_cause(tmp_path, capsys, rate, part_at):
    """The cause named for their learning rates `rate(step)` and a loss that parts at `part_at`."""
    a = fake_trace(make_run(tmp_path / "a"))
    b = make_run(tmp_path / "b", loss=losses(part_at=part_at), rate=rate)
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    return cause(out)


def test_cause_a_learning_rate_that_differs_before_the_loss_parts(tmp_path, capsys):
    text = rate_cause(tmp_path, capsys, lambda s: 1e-5 * s * (2 if s >= 4 else 1), part_at=5)
    assert text.startswith("CAUSE at step 5: the optimizer.") and "learning rate at step 4 is 8e-05" in text, text
    assert "(linear, warmup_steps 2, total_steps 12)" in text and " x the reference's" not in text


def test_cause_gradients_scaled_with_the_same_loss(tmp_path, capsys):
    a = fake_trace(make_run(tmp_path / "a"), grad_norm=lambda s: 0.5)
    b = make_run(tmp_path / "b", loss=losses(part_at=3), grad_norm=lambda s: 0.125)
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    text = cause(out)
    assert text.startswith("CAUSE at step 3: the optimizer.") and "gradient norm is 0.25 x the reference's" in text
    assert "gradient_accumulation_steps 4" in text


def test_cause_clipping_when_the_reference_clipped(tmp_path, capsys):
    a = fake_trace(make_run(tmp_path / "a"), grad_norm=lambda s: 2.0)
    b = make_run(tmp_path / "b", loss=losses(part_at=4), grad_norm=lambda s: 2.0)
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    text = cause(out)
    assert text.startswith("CAUSE at step 4: the optimizer.") and "learning rates agree" in text
    assert "The reference clipped the gradients at step(s) 1-3 (norm 2 > max_grad_norm 1)" in text
    assert "weight decay (0.01, none on the 2 no_decay parameters" in text


def test_cause_no_clipping_to_blame_below_max_grad_norm(tmp_path, capsys):
    a = fake_trace(make_run(tmp_path / "a"), grad_norm=lambda s: 0.5)
    b = make_run(tmp_path / "b", loss=losses(part_at=4))
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    assert "The reference did not clip before step 4 (max_grad_norm 1)" in cause(out)


def test_cause_steps_numbered_from_zero(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", loss={s - 1: v for s, v in losses().items()})
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    assert cause(out).startswith("CAUSE at step 1: their steps are numbered from 0")


def test_cause_without_a_trace_says_how_to_get_one(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", loss=losses(part_at=7))
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    assert cause(out).startswith("CAUSE at step 7: the loss parts at step 7.") and "--trace_steps" in cause(out)


def test_cause_decoding_when_losses_agree_and_cer_does_not(tmp_path, capsys):
    a = make_run(tmp_path / "a", results=RESULTS, trainer_state={4: 20.0, 8: 15.0})
    b = make_run(tmp_path / "b", results={**RESULTS, "test_cer": 14.0}, eval_log={4: 20.0, 8: 16.0})
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    text = cause(out)
    assert text.startswith("CAUSE at step 8: decoding or the metric.") and "num_beams" in text


def test_cause_learning_rate_logged_after_the_scheduler_step(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", rate=lambda s: 1e-5 * (s + 1))
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    assert "read after scheduler.step()" in cause(out)


def test_no_cause_when_the_runs_agree(tmp_path, capsys):
    a = fake_trace(make_run(tmp_path / "a"))
    code, out, _ = run(capsys, a, make_run(tmp_path / "b"), "--plot", tmp_path / "plot.png")
    assert code == 0 and "CAUSE" not in out


def test_malformed_trace_settings_are_bad_input(tmp_path, capsys):
    a = fake_trace(make_run(tmp_path / "a"))
    (a / "trace" / "settings.json").write_text('{"format": 1,\n  oops}')
    code, _, err = run(capsys, a, make_run(tmp_path / "b"), "--plot", tmp_path / "plot.png")
    assert code == 2
    assert "settings.json, line 2: not valid JSON" in err


def test_cause_a_learning_rate_that_is_a_constant_factor_of_the_reference(tmp_path, capsys):
    text = rate_cause(tmp_path, capsys, lambda s: 1e-4 * s, part_at=3)
    assert text.startswith("CAUSE at step 3: the optimizer.") and "a learning rate 10 x the reference's" in text, text
    assert "optimizer.lr is 0.0001. Fix: lr=0.0001" in text


def test_cause_no_warm_up(tmp_path, capsys):
    """The reference's rate rises over its 2 warm-up steps; theirs starts at its peak."""
    text = rate_cause(tmp_path, capsys, lambda s: 1e-5 * max(s, 2), part_at=2)
    assert "their learning rate at step 1 is 2e-05, the reference's 1e-05: no warm-up" in text, text
    assert "10 x" not in text and "Fix: num_warmup_steps=2 in the scheduler (linear)" in text


def test_cause_weight_decay_on_the_no_decay_group_while_the_losses_agree(tmp_path, capsys):
    """Their biases and LayerNorm shrink by weight_decay x lr each step, their weights update as the reference's."""
    a = fake_trace(make_run(tmp_path / "a"), param_norms=norms)
    b = make_run(tmp_path / "b", param_norms=lambda s: norms(s, no_decay_shrink=0.01 * 1e-5 * s),
                 log="step_log.jsonl")
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    assert "loss                  agrees at every common step" in out
    assert report_line(out, "decay").strip().startswith("decay                 agrees at all 12 steps")
    assert report_line(out, "no_decay").strip().startswith("no_decay              first differs after step 2")
    text = cause(out)
    assert text.startswith("CAUSE at step 2: the optimizer. The losses agree at every step, the parameters do not")
    assert "weight decay applied to biases/LayerNorm (the no-decay group)" in text, text
    assert "The reference clipped" not in text


def test_cause_clipping_when_both_parameter_groups_part(tmp_path, capsys):
    """Both groups part at once: not a weight decay of one group; the reference clipped."""
    a = fake_trace(make_run(tmp_path / "a"), grad_norm=lambda s: 2.0, param_norms=norms)
    b = make_run(tmp_path / "b", loss=losses(part_at=4), grad_norm=lambda s: 2.0,
                 param_norms=lambda s: norms(s, 1e-6 * (s > 1), 1e-6 * (s > 1)))
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    text = cause(out)
    assert text.startswith("CAUSE at step 4: the optimizer.") and "an update up to step 2 differs" in text, text
    assert "The reference clipped the gradients at step(s) 1-2" in text and "applied to biases" not in text


def test_one_group_parting_by_another_amount_than_the_weight_decay_is_not_named_weight_decay(tmp_path, capsys):
    a = fake_trace(make_run(tmp_path / "a"), grad_norm=lambda s: 2.0, param_norms=norms)
    b = make_run(tmp_path / "b", param_norms=lambda s: norms(s, no_decay_shrink=1e-4))  # 1000 x 0.01 x 1e-5
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 1
    text = cause(out)
    assert "applied to biases" not in text and "The reference clipped the gradients" in text, text


def test_a_step_log_is_read_before_a_loops_own_loss_log(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", log="step_log.jsonl")
    write_jsonl(b / "loss_log.jsonl", [{"step": 1, "loss": 99.0}])  # the loop's own log, in its own format
    code, out, _ = run(capsys, a, b, "--plot", tmp_path / "plot.png")
    assert code == 0, out
    code, out, _ = run(capsys, a, b / "step_log.jsonl", "--plot", tmp_path / "plot.png")
    assert code == 0 and "Plot: " + str(tmp_path / "plot.png") in out
