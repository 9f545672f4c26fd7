"""The reference trace (run_trocr.py --trace_steps) replayed by a plain PyTorch loop, and
compare_runs.py naming the cause when the loop computes something else."""

import json
import math
import logging

import pytest
import torch
import transformers
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import VisionEncoderDecoderModel

import compare_runs
import run_trocr
from conftest import ROOT
from trocr_recipe.data import ImageTransform, OcrCollator, image_size
from trocr_recipe.outputs import read_jsonl
from trocr_recipe.steptrace import ReferenceBatches, StepLog, disable_dropout

STEPS = 20


@pytest.fixture(scope="module")
def trace_run(tiny_data, tiny_model, tmp_path_factory):
    """A 20-step trace of recipes/tiny.json, written once for the module."""
    out = tmp_path_factory.mktemp("trace") / "reference"
    args = [str(ROOT / "recipes" / "tiny.json"), "--model_name_or_path", str(tiny_model),
            "--dataset_name", str(tiny_data), "--output_dir", str(out), "--trace_steps", str(STEPS)]
    run_trocr.main(args)
    return out


def foreign_loop(trace, output_dir, pads_counted=False, bos_kept=False, lr_factor=1.0, clip=True):
    """A loop of another repository, in plain PyTorch: the trace's batches instead of its own
    DataLoader, AdamW, the schedule and clipping of the trace's settings, the token-mean loss."""
    batches = ReferenceBatches(trace)
    settings = batches.settings
    tokens = settings["special_tokens"]
    model = VisionEncoderDecoderModel.from_pretrained(settings["model_name_or_path"])
    model.config.decoder_start_token_id = tokens["decoder_start_token_id"]
    model.config.pad_token_id = tokens["pad_token_id"]
    model.eval()  # dropout off, as in the trace; gradients still flow
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for n in g["params"]], "weight_decay": g["weight_decay"]}
              for g in settings["param_groups"]]
    opt = settings["optimizer"]
    optimizer = torch.optim.AdamW(groups, lr=opt["lr"] * lr_factor, betas=tuple(opt["betas"]), eps=opt["eps"])
    schedule = settings["schedule"]
    scheduler = transformers.get_scheduler(
        schedule["name"], optimizer, num_warmup_steps=schedule["warmup_steps"],
        num_training_steps=schedule["total_steps"], scheduler_specific_kwargs=schedule["kwargs"],
    )
    step_loss = 0.0
    with StepLog(output_dir) as log:
        for batch in batches:
            labels = batch["labels"]
            if pads_counted:
                labels = labels.masked_fill(labels.eq(-100), tokens["pad_token_id"])
            if bos_kept:
                labels = torch.nn.utils.rnn.pad_sequence(
                    [torch.cat([torch.tensor([tokens["bos_token_id"]]), row[row.ne(-100)]]) for row in labels],
                    batch_first=True, padding_value=-100,
                )
            logits = model(pixel_values=batch["pixel_values"], labels=labels).logits
            token_sum = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            # The reference's loss: token sum over the label tokens of the whole optimizer step.
            planted = pads_counted or bos_kept
            loss = token_sum / (labels.ne(-100).sum() if planted else batch.step_tokens)
            loss.backward()
            step_loss += loss.item()
            if not batch.last:  # gradient accumulation: more micro-batches to this step
                continue
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"] if clip else math.inf)
            rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            log.log(batch.step, step_loss, rate, grad_norm=norm)
            step_loss = 0.0
    return output_dir


def compare(capsys, reference, theirs, tmp_path):
    code = compare_runs.main([str(reference), str(theirs), "--plot", str(tmp_path / "compare.png")])
    return code, capsys.readouterr().out


def cause_line(out):
    return next(line for line in out.splitlines() if line.startswith("CAUSE"))


def test_trace_holds_every_step_and_the_settings(trace_run):
    trace = trace_run / "trace"
    steps = read_jsonl(trace / "steps.jsonl")
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    # The run's own loss log is there too, with the same losses.
    assert [row["loss"] for row in read_jsonl(trace_run / "loss_log.jsonl")] == [row["loss"] for row in steps]
    for row in steps:
        assert row["grad_norm"] > 0 and row["learning_rate"] >= 0 and row["label_tokens"] > 0
        assert len(row["micro_batches"]) == 1 and len(row["micro_batches"][0]["ids"]) == 4
    settings = json.loads((trace / "settings.json").read_text())
    assert settings["optimizer"]["lr"] == 5e-4 and settings["optimizer"]["weight_decay"] == 1e-4
    assert settings["schedule"] == {"name": "inverse_sqrt", "warmup_steps": 2, "total_steps": STEPS, "kwargs": {}}
    assert settings["max_grad_norm"] == 1.0 and settings["gradient_accumulation_steps"] == 1
    assert settings["per_device_train_batch_size"] == 4 and settings["seed"] == 42
    decayed = {name for group in settings["param_groups"] if group["weight_decay"] for name in group["params"]}
    assert settings["no_decay"] and all(name.endswith("bias") or "norm" in name for name in settings["no_decay"])
    assert decayed and not decayed & set(settings["no_decay"])
    assert "off" in settings["dropout"] and "off" in settings["augmentation"]
    # Evaluation is skipped in trace mode.
    assert "eval_cer" not in json.loads((trace_run / "all_results.json").read_text())


def test_the_loop_check_module_offers_the_replay_pieces():
    """`trocr_recipe.loopcheck` is the one import a foreign loop needs."""
    from trocr_recipe import loopcheck, steptrace

    assert loopcheck.ReferenceBatches is steptrace.ReferenceBatches and loopcheck.StepLog is steptrace.StepLog


def test_reference_batches_are_the_named_lines_unaugmented(trace_run, tiny_data, tiny_model, processor):
    batches = ReferenceBatches(trace_run / "trace")
    assert len(batches) == STEPS
    train = load_from_disk(str(tiny_data))["train"]
    row_of = {line_id: row for row, line_id in enumerate(train["id"])}
    transform = ImageTransform("image", image_size(processor.image_processor), train=False)
    collator = OcrCollator.from_image_processor(processor.image_processor)
    for step, batch in enumerate(batches, 1):
        assert set(batch) == {"pixel_values", "labels"} and batch.step == step and batch.last
        lines = train.select([row_of[line_id] for line_id in batch.ids])
        texts = processor.tokenizer(list(lines["text"]), add_special_tokens=False)["input_ids"]
        pixels = transform({"image": list(lines["image"]), "labels": texts})["pixel_values"]
        expected = collator([{"pixel_values": p, "labels": t + [processor.tokenizer.eos_token_id]}
                             for p, t in zip(pixels, texts)])
        assert batch["pixel_values"].dtype == torch.float32 and batch["labels"].dtype == torch.long
        assert torch.equal(batch["pixel_values"], expected["pixel_values"]), step
        assert torch.equal(batch["labels"], expected["labels"]), step
        assert batch.step_tokens == int(batch["labels"].ne(-100).sum())


def test_trace_turns_dropout_off(tiny_model, processor):
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    assert model.config.decoder.dropout > 0
    changed = dict(disable_dropout(model))
    assert changed["decoder.dropout"] > 0 and model.config.decoder.dropout == 0
    model.train()
    pixels = torch.randn(2, 3, *image_size(processor.image_processor))
    labels = torch.tensor([[5, 6, 2], [7, 2, -100]])
    first, second = (model(pixel_values=pixels, labels=labels).logits for _ in range(2))
    assert torch.equal(first, second)


def test_a_loop_replaying_the_trace_agrees(trace_run, tmp_path, capsys):
    theirs = foreign_loop(trace_run / "trace", tmp_path / "theirs")
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    assert code == 0, out
    reference, replayed = read_jsonl(trace_run / "loss_log.jsonl"), read_jsonl(theirs / "loss_log.jsonl")
    assert len(replayed) == STEPS
    gaps = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(reference, replayed)]
    assert max(gaps) < 1e-5
    assert "CAUSE" not in out


@pytest.mark.parametrize("planted, named", [
    ({"pads_counted": True}, "'pad tokens counted in the loss'"),
    ({"bos_kept": True}, "'<s> kept in the labels'"),
])
def test_a_loss_mistake_is_named_at_step_1(trace_run, tmp_path, capsys, planted, named):
    theirs = foreign_loop(trace_run / "trace", tmp_path / "theirs", **planted)
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    assert code == 1
    cause = cause_line(out)
    assert cause.startswith("CAUSE at step 1: the loss.") and f"matches {named}" in cause, cause
    assert "Fix:" in cause


def test_a_learning_rate_difference_is_named_at_a_later_step(trace_run, tmp_path, capsys):
    theirs = foreign_loop(trace_run / "trace", tmp_path / "theirs", lr_factor=2.0)
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    assert code == 1
    cause = cause_line(out)
    # Warmup starts at 0: the rates part at step 2, the loss at step 3.
    assert cause.startswith("CAUSE at step 3: the optimizer.") and "learning rate at step 2" in cause, cause


def test_missing_clipping_is_named_as_the_optimizer(trace_run, tmp_path, capsys):
    theirs = foreign_loop(trace_run / "trace", tmp_path / "theirs", clip=False)
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    assert code == 1
    cause = cause_line(out)
    step = int(cause.split("at step ")[1].split(":")[0])
    assert step > 1 and ": the optimizer." in cause and "The reference clipped the gradients" in cause, cause
    assert "learning rates agree" in cause and "no_decay parameters" in cause


def test_trace_with_gradient_accumulation_and_workers_yields_micro_batches(tiny_args, tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="trocr_recipe"):
        run_trocr.main(tiny_args + ["--trace_steps", "2", "--gradient_accumulation_steps", "2",
                                    "--per_device_train_batch_size", "2", "--dataloader_num_workers", "1"])
    # What trace mode changed is logged.
    assert "max_steps 8 -> 2" in caplog.text
    assert "augmentation off" in caplog.text and "evaluation, prediction and checkpoints skipped" in caplog.text
    assert "dropout off: decoder.dropout 0.1 -> 0.0" in caplog.text
    batches = list(ReferenceBatches(tmp_path / "run"))
    # From a dataloader worker the model received uint8 lines (it normalizes them itself): the
    # trace keeps them so, and ReferenceBatches normalizes them the same way.
    stored = load_file(tmp_path / "run" / "trace" / "step_000001_0.safetensors")
    assert stored["pixel_values"].dtype == torch.uint8 and batches[0]["pixel_values"].dtype == torch.float32
    placed = [(b.step, b.micro_step, b.last) for b in batches]
    assert placed == [(1, 0, False), (1, 1, True), (2, 0, False), (2, 1, True)]
    steps = read_jsonl(tmp_path / "run" / "trace" / "steps.jsonl")
    for row, pair in zip(steps, (batches[:2], batches[2:])):
        assert row["label_tokens"] == pair[0].step_tokens == sum(int(b["labels"].ne(-100).sum()) for b in pair)
    # A loop that steps after each step's last micro-batch replays it.
    theirs = foreign_loop(tmp_path / "run" / "trace", tmp_path / "theirs")
    code, out = compare(capsys, tmp_path / "run", theirs, tmp_path)
    assert code == 0, out


def test_trace_steps_must_be_positive(tiny_args):
    with pytest.raises(SystemExit, match="trace_steps=0"):
        run_trocr.main(tiny_args + ["--trace_steps", "0"])


def test_step_log_rows_and_order(tmp_path):
    with StepLog(tmp_path) as log:
        log.log(1, torch.tensor(2.5), 1e-4, grad_norm=torch.tensor(0.5))
        log.log(2, 2.25, None)
        with pytest.raises(ValueError, match="step 2 logged after step 2"):
            log.log(2, 2.0, 1e-4)
    assert read_jsonl(tmp_path / "loss_log.jsonl") == [
        {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.5},
        {"step": 2, "loss": 2.25, "learning_rate": None},
    ]
    StepLog(tmp_path).close()  # a new log starts empty
    assert read_jsonl(tmp_path / "loss_log.jsonl") == []


def test_reference_batches_bad_input_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="settings.json: no trace settings"):
        ReferenceBatches(tmp_path)
    (tmp_path / "settings.json").write_text('{"format": 1,\n "oops"}')
    with pytest.raises(ValueError, match="settings.json, line 2: not valid JSON"):
        ReferenceBatches(tmp_path)
    (tmp_path / "settings.json").write_text('{"format": 1}')
    (tmp_path / "steps.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match='steps.jsonl, row 1: needs "step"'):
        ReferenceBatches(tmp_path)
