"""The reference trace (run_trocr.py --trace_steps) replayed by a plain PyTorch loop, and
compare_runs.py naming the cause when the loop computes something else."""

import json
import logging
import re

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
from trocr_recipe.steptrace import ReferenceBatches, StepLog, disable_dropout, no_decay_names, parameter_norms

STEPS = 20
DECAY = 0.05  # large enough for a weight decay on the wrong group to show in float32 within two steps
MAX_LENGTH = 64  # the loop's own label width, as tutorials pad


@pytest.fixture(scope="module")
def trace_run(tiny_data, tiny_model, tmp_path_factory):
    """A 20-step trace of recipes/tiny.json, written once for the module."""
    out = tmp_path_factory.mktemp("trace") / "reference"
    args = [str(ROOT / "recipes" / "tiny.json"), "--model_name_or_path", str(tiny_model),
            "--dataset_name", str(tiny_data), "--output_dir", str(out), "--trace_steps", str(STEPS),
            "--weight_decay", str(DECAY)]
    run_trocr.main(args)
    return out


def replay_code() -> str:
    """The replay of docs/step_comparison.md, exactly as printed there."""
    text = (ROOT / "docs" / "step_comparison.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", text[text.index("## 2. Replay it in your loop"):], re.S).group(1)


def users_code(processor, mistakes=(), step_tokens=False):
    """The five functions the docs' replay calls, as a tutorial-style loop writes them: its own
    special tokens, labels padded to max_length, the model's loss (or, with `step_tokens`, the
    token sum over the step's label tokens, as gradient accumulation needs), AdamW and a
    schedule, with `mistakes` planted (bos, pad, start; lr10, no_clip, no_warmup, decay_all)."""
    tokenizer = processor.tokenizer

    def set_up_model(model):
        start = tokenizer.bos_token_id if "start" in mistakes else tokenizer.eos_token_id
        model.config.decoder_start_token_id = start
        model.config.pad_token_id = tokenizer.pad_token_id

    def make_labels(texts):
        if "bos" in mistakes:  # the tokenizer's default: <s> text </s>
            ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
        else:
            tokens = tokenizer(texts, add_special_tokens=False).input_ids
            ids = [t[: MAX_LENGTH - 1] + [tokenizer.eos_token_id] for t in tokens]
            ids = [i + [tokenizer.pad_token_id] * (MAX_LENGTH - len(i)) for i in ids]
        labels = torch.tensor(ids)
        return labels if "pad" in mistakes else labels.masked_fill(labels.eq(tokenizer.pad_token_id), -100)

    def compute_loss(model, batch, labels):
        if not step_tokens:  # the model's own loss: the micro-batch's token mean
            return model(pixel_values=batch["pixel_values"], labels=labels).loss
        logits = model(pixel_values=batch["pixel_values"], labels=labels).logits
        token_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return token_sum / batch.step_tokens

    def make_optimizer(model, lr, weight_decay, schedule, warmup_steps, total_steps):
        lr = 10 * lr if "lr10" in mistakes else lr
        if "decay_all" in mistakes:
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            no_decay = {n for n, _ in model.named_parameters() if n.endswith("bias") or "norm" in n}
            optimizer = torch.optim.AdamW([
                {"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": weight_decay},
                {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
            ], lr=lr)
        warmup = 0 if "no_warmup" in mistakes else warmup_steps
        return optimizer, transformers.get_scheduler(schedule, optimizer, warmup, total_steps)

    def optimizer_step(model, optimizer, scheduler, max_grad_norm):
        if "no_clip" not in mistakes:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    return {"set_up_model": set_up_model, "make_labels": make_labels, "compute_loss": compute_loss,
            "make_optimizer": make_optimizer, "optimizer_step": optimizer_step}


def docs_loop(trace, output_dir, processor, mistakes=(), step_tokens=False):
    """A loop of another repository replayed with the docs' code, its own functions plugged in."""
    code = replay_code()
    assert code.count('"runs/ref/trace"') == 1 and code.count('"runs/mine"') == 1
    code = code.replace('"runs/ref/trace"', repr(str(trace))).replace('"runs/mine"', repr(str(output_dir)))
    exec(code, users_code(processor, mistakes, step_tokens))
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
        assert len(row["micro_batches"][0]["texts"]) == 4 and set(row["param_norms"]) == {"decay", "no_decay"}
    settings = json.loads((trace / "settings.json").read_text())
    assert settings["optimizer"]["lr"] == 5e-4 and settings["optimizer"]["weight_decay"] == DECAY
    assert settings["schedule"] == {"name": "inverse_sqrt", "warmup_steps": 2, "total_steps": STEPS, "kwargs": {}}
    assert settings["max_grad_norm"] == 1.0 and settings["gradient_accumulation_steps"] == 1
    assert settings["per_device_train_batch_size"] == 4 and settings["seed"] == 42
    decayed = {name for group in settings["param_groups"] if group["weight_decay"] for name in group["params"]}
    assert settings["no_decay"] and all(name.endswith("bias") or "norm" in name for name in settings["no_decay"])
    assert decayed and not decayed & set(settings["no_decay"])
    # The parameter norms' groups are the reference optimizer's groups.
    model = VisionEncoderDecoderModel.from_pretrained(settings["model_name_or_path"])
    assert no_decay_names(model) == set(settings["no_decay"])
    assert steps[0]["learning_rate"] == 0  # warm-up from 0: nothing moves at step 1
    assert steps[0]["param_norms"] == pytest.approx(parameter_norms(model), rel=1e-12)
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
        assert batch.texts == list(lines["text"])


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


def test_the_docs_replay_of_the_fixed_loop_agrees(trace_run, processor, tmp_path, capsys):
    theirs = docs_loop(trace_run / "trace", tmp_path / "theirs", processor)
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    assert code == 0, out
    reference, replayed = read_jsonl(trace_run / "trace" / "steps.jsonl"), read_jsonl(theirs / "step_log.jsonl")
    assert len(replayed) == STEPS and not (theirs / "loss_log.jsonl").exists()
    assert max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(reference, replayed)) < 1e-5
    for group in ("decay", "no_decay"):
        gaps = [abs(a["param_norms"][group] - b["param_norms"][group]) / a["param_norms"][group]
                for a, b in zip(reference, replayed)]
        assert max(gaps) < 1e-9, group
    assert "CAUSE" not in out


LOSS_MISTAKES = {
    "<s> kept in the labels": "pitfall-2",
    "pad tokens counted in the loss (labels padded to 64)": "pitfall-3",
    "decoder started from <s>": "pitfall-1",
}


@pytest.mark.parametrize("planted, named", [
    (["bos"], ["<s> kept in the labels"]),
    (["pad"], ["pad tokens counted in the loss (labels padded to 64)"]),
    (["start"], ["decoder started from <s>"]),
    (["bos", "pad", "start"], list(LOSS_MISTAKES)),
], ids=["bos", "pad", "start", "all three"])
def test_a_loss_mistake_replayed_with_the_docs_code_is_named_at_step_1(trace_run, processor, tmp_path, capsys,
                                                                       planted, named):
    theirs = docs_loop(trace_run / "trace", tmp_path / "theirs", processor, planted)
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    assert code == 1
    cause = cause_line(out)
    assert cause.startswith("CAUSE at step 1: the loss.") and f"matches '{' + '.join(named)}' (" in cause, cause
    fix = cause.split("Fix:")[1]
    assert all((LOSS_MISTAKES[name] in fix) == (name in named) for name in LOSS_MISTAKES), cause


OPTIMIZER_CAUSES = {
    "lr10": "a learning rate 10 x the reference's at every step",
    "no_warmup": "no warm-up: the reference's rate rises from 0 over 2 warm-up steps",
    "no_clip": "The reference clipped the gradients",
    "decay_all": "weight decay applied to biases/LayerNorm (the no-decay group)",
}


@pytest.mark.parametrize("planted", list(OPTIMIZER_CAUSES))
def test_an_optimizer_mistake_replayed_with_the_docs_code_is_named(trace_run, processor, tmp_path, capsys, planted):
    theirs = docs_loop(trace_run / "trace", tmp_path / "theirs", processor, [planted])
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    assert code == 1
    cause = cause_line(out)
    step = int(cause.split("at step ")[1].split(":")[0])
    assert step > 1 and ": the optimizer." in cause, cause
    assert [name for name, text in OPTIMIZER_CAUSES.items() if text in cause] == [planted], cause


def test_a_weight_decay_on_every_parameter_is_found_while_the_losses_agree(trace_run, processor, tmp_path, capsys):
    """Its loss stays within 1e-5 of the reference's for 20 steps; the no-decay group's norm does not."""
    theirs = docs_loop(trace_run / "trace", tmp_path / "theirs", processor, ["decay_all"])
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    assert code == 1 and "loss                  agrees at every common step" in out, out
    assert re.search(r"no_decay\s+first differs after step 2:", out) and re.search(r"decay\s+agrees at all 20", out)
    assert cause_line(out).startswith("CAUSE at step 2: the optimizer. The losses agree at every step")


def test_an_unmatched_step_1_loss_never_advises_the_trace_labels(trace_run, tmp_path, capsys):
    """Their labels are their own: the advice is about pixels, weights and dropout, not the batches' labels."""
    rows = read_jsonl(trace_run / "loss_log.jsonl")
    theirs = tmp_path / "theirs"
    with StepLog(theirs) as log:
        for row in rows:
            log.log(row["step"], row["loss"] * (1.5 if row["step"] == 1 else 1), row["learning_rate"])
    code, out = compare(capsys, trace_run, theirs, tmp_path)
    cause = cause_line(out)
    assert code == 1 and "matches no combination of the usual loss mistakes" in cause, cause
    assert "pixel_values unchanged" in cause and "label and loss code" in cause
    assert "ReferenceBatches unchanged" not in cause and "feed the batches unchanged" not in cause


def test_trace_with_gradient_accumulation_and_workers_yields_micro_batches(tiny_args, processor, tmp_path, caplog,
                                                                          capsys):
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
    # The docs' loop, its loss divided by the step's label tokens, steps after each step's last micro-batch.
    theirs = docs_loop(tmp_path / "run" / "trace", tmp_path / "theirs", processor, step_tokens=True)
    code, out = compare(capsys, tmp_path / "run", theirs, tmp_path)
    assert code == 0, out


def test_trace_steps_must_be_positive(tiny_args):
    with pytest.raises(SystemExit, match="trace_steps=0"):
        run_trocr.main(tiny_args + ["--trace_steps", "0"])


def test_step_log_rows_and_order(tmp_path, tiny_model):
    (tmp_path / "loss_log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # the loop's own log, kept apart
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model)
    with StepLog(tmp_path) as log, StepLog(tmp_path / "with_model", model=model) as with_model:
        log.log(1, torch.tensor(2.5), 1e-4, grad_norm=torch.tensor(0.5))
        log.log(2, 2.25, None)
        with pytest.raises(ValueError, match="step 2 logged after step 2"):
            log.log(2, 2.0, 1e-4)
        with torch.no_grad():
            model.decoder.model.decoder.layernorm_embedding.weight.mul_(0.5)  # the no-decay group alone moves
        with_model.log(1, 2.5, 1e-4)
    assert log.path == tmp_path / "step_log.jsonl"
    assert read_jsonl(log.path) == [
        {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.5},
        {"step": 2, "loss": 2.25, "learning_rate": None},
    ]
    assert read_jsonl(tmp_path / "loss_log.jsonl") == [{"step": 1, "loss": 9.0}]
    norms = read_jsonl(with_model.path)[0]["param_norms"]
    fresh = parameter_norms(VisionEncoderDecoderModel.from_pretrained(tiny_model))
    assert norms["decay"] == pytest.approx(fresh["decay"], rel=1e-12) and norms["no_decay"] < fresh["no_decay"]
    StepLog(tmp_path).close()  # a new log starts empty
    assert read_jsonl(tmp_path / "step_log.jsonl") == []


def test_a_trace_without_texts_says_so(trace_run, tmp_path):
    """A trace written before the texts were kept: the error names the file and the way out."""
    import shutil

    trace = shutil.copytree(trace_run / "trace", tmp_path / "trace")
    rows = read_jsonl(trace / "steps.jsonl")
    for row in rows:
        for part in row["micro_batches"]:
            del part["texts"]
    (trace / "steps.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    batch = next(iter(ReferenceBatches(trace)))
    assert batch.ids == rows[0]["micro_batches"][0]["ids"]
    with pytest.raises(ValueError, match=r"steps.jsonl: step 1 has no line texts .*write the trace again"):
        batch.texts


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
