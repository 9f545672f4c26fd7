"""A deterministic reference trace that another training loop replays step by step.

`run_trocr.py RECIPE --trace_steps N` trains N optimizer steps with dropout and augmentation
off and writes `<output_dir>/trace/`: every batch the model consumed, its lines' ids and
texts, the step's loss, label tokens, gradient norm, learning rate and parameter norms, and
`settings.json` (what a loop must share to be comparable). A foreign loop swaps its
DataLoader for `ReferenceBatches`, remakes the labels from `batch.texts` with its own label
code and logs with `StepLog`; compare_runs.py then names the first cause of a difference.
See docs/step_comparison.md."""

import json
import logging
import math
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from .checks import pitfall_doc
from .data import OcrCollator
from .errors import BadInput
from .modeling import pretrained
from .outputs import JsonlLog, read_jsonl

logger = logging.getLogger("trocr_recipe")

TRACE_DIR = "trace"
SETTINGS = "settings.json"
STEPS = "steps.jsonl"
STEP_LOG = "step_log.jsonl"  # StepLog's file: not loss_log.jsonl, which a loop may write itself
FORMAT = 1
LOSS = (
    "cross-entropy summed over the label tokens (labels != -100), divided by the label tokens of the whole "
    "optimizer step"
)
DROPOUT_NOTE = (
    "off: every dropout probability of the model (and layerdrop) was 0 during the trace; in your loop call "
    "trocr_recipe.steptrace.disable_dropout(model) or train under model.eval() (TrOCR has no batch norm)"
)
AUGMENTATION_NOTE = "off: the batches are the plain resized lines; ReferenceBatches gives them ready to use"
INDEX_KEY = "trace_index"  # the training rows of a batch, taken out again before the model sees it


# ---------------------------------------------------------------------------------------
# Replaying a trace: what a foreign loop uses


class ReferenceBatch(dict):
    """One batch as the reference model consumed it: {"pixel_values", "labels"}, so that
    `model(**batch)` works; where it sits in the run is in attributes, not keys:
    `step` (optimizer step, from 1), `micro_step` (from 0), `last` (the step's last
    micro-batch: clip and step the optimizer after it), `step_tokens` (label tokens of the
    whole optimizer step, the loss's divisor), `ids` (the lines' ids) and `texts` (the
    lines' texts, for a loop's own label code)."""

    step: int
    micro_step: int
    last: bool
    step_tokens: int
    ids: list[str]
    source: str  # the steps.jsonl row it came from, for errors

    @property
    def texts(self) -> list[str]:
        """The lines' texts, in the batch's order: labels made from them by a loop's own code
        keep that code's mistakes visible."""
        if self._texts is None:
            raise ValueError(f"{self.source}: step {self.step} has no line texts (a trace written before they were "
                             "kept): write the trace again, or look the texts up in your dataset by batch.ids")
        return self._texts


class ReferenceBatches:
    """The batches of a trace folder, in the order the reference consumed them: one per
    optimizer step, or with gradient_accumulation_steps > 1 that many micro-batches per step
    (each a `ReferenceBatch`: `batch.step`, `batch.last`). `len()` counts the batches yielded.

    `.settings` is `settings.json`: model_name_or_path (the starting weights), optimizer
    {name, lr, betas, eps, weight_decay}, param_groups [{weight_decay, params: names}],
    no_decay (parameter names without weight decay), schedule {name, warmup_steps,
    total_steps, kwargs}, max_grad_norm, gradient_accumulation_steps,
    per_device_train_batch_size, seed, steps, special_tokens, loss, dropout, augmentation.
    `.steps` holds the reference's own row per step (loss, label_tokens, grad_norm,
    learning_rate, param_norms)."""

    def __init__(self, trace_dir):
        self.trace_dir = Path(trace_dir)
        if (self.trace_dir / TRACE_DIR / SETTINGS).is_file():  # the run folder was given
            self.trace_dir = self.trace_dir / TRACE_DIR
        self.settings = read_settings(self.trace_dir)
        self.steps = read_steps(self.trace_dir)
        pixels = self.settings.get("pixel_values", {})
        self._collator = OcrCollator(pixels.get("image_mean", [0.5] * 3), pixels.get("image_std", [0.5] * 3),
                                     pixels.get("rescale_factor", 1 / 255))

    def __len__(self) -> int:
        return sum(len(row["micro_batches"]) for row in self.steps)

    def __iter__(self):
        for row in self.steps:
            for micro_step, part in enumerate(row["micro_batches"]):
                yield self._load(row, micro_step, part)

    def by_step(self):
        """Yields (step, [its micro-batches]) per optimizer step."""
        for row in self.steps:
            yield row["step"], [self._load(row, i, part) for i, part in enumerate(row["micro_batches"])]

    def _load(self, row: dict, micro_step: int, part: dict) -> ReferenceBatch:
        from safetensors.torch import load_file

        path = self.trace_dir / part["file"]
        try:
            tensors = load_file(path)
            pixels, labels = tensors["pixel_values"], tensors["labels"]
        except Exception as error:  # OSError, KeyError, safetensors' own SafetensorError
            raise ValueError(f"{path}: cannot read the step {row['step']} batch ({type(error).__name__}: "
                             f"{error})") from None
        batch = ReferenceBatch(pixel_values=self._collator.normalize(pixels), labels=labels.to(torch.long))
        batch.step, batch.micro_step = row["step"], micro_step
        batch.last = micro_step == len(row["micro_batches"]) - 1
        batch.step_tokens, batch.ids = row["label_tokens"], list(part["ids"])
        batch._texts = list(part["texts"]) if "texts" in part else None
        batch.source = str(self.trace_dir / STEPS)
        return batch


def read_settings(trace_dir: Path) -> dict:
    path = Path(trace_dir) / SETTINGS
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no trace settings (write one with run_trocr.py RECIPE --trace_steps N)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    except (OSError, ValueError, RecursionError) as error:  # a folder, not UTF-8, nested too deep
        raise ValueError(f"{path}: cannot read the trace settings ({type(error).__name__}: {error})") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trace settings file of format {FORMAT}")
    return settings


def read_steps(trace_dir: Path) -> list[dict]:
    path = Path(trace_dir) / STEPS
    try:
        rows = read_jsonl(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the trace run stopped before its first step?)") from None
    except json.JSONDecodeError as error:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)  # as read_jsonl reads them
        raise ValueError(f"{path}, line {lines.index(error.doc) + 1}: not valid JSON ({error.msg})") from None
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{path}: cannot read the trace steps ({type(error).__name__}: {error})") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not {"step", "loss", "label_tokens", "micro_batches"} <= set(row):
            raise ValueError(f'{path}, row {n}: needs "step", "loss", "label_tokens" and "micro_batches"')
    return rows


class StepLog(JsonlLog):
    """`<output_dir>/step_log.jsonl`, a foreign loop's steps in compare_runs.py's format: one
    row per optimizer step, `loss` the step's mean token loss (not a micro-batch's),
    `learning_rate` the rate the step used, `grad_norm` the total gradient norm before
    clipping (optional: it tells a scaled loss from an optimizer difference) and, given the
    model, `param_norms` after the step's update (weight decay on the wrong parameters shows
    there). A context manager, or call `.close()`; the file starts empty. Its name is not
    loss_log.jsonl, so that a loop's own loss log beside it is never mixed in."""

    def __init__(self, output_dir, model=None):
        super().__init__(str(output_dir), STEP_LOG)
        self.start(0)
        self.model = model
        self.last_step = None

    def log(self, step: int, loss, learning_rate, grad_norm=None) -> None:
        """Call it after optimizer.step(): the parameter norms are those of the updated model."""
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"{self.path}: step {step} logged after step {self.last_step}: one row per optimizer step"
            )
        rate = None if learning_rate is None else float(learning_rate)
        row = {"step": step, "loss": float(loss), "learning_rate": rate}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.model is not None:
            row["param_norms"] = parameter_norms(self.model)
        self.write(row)
        self.last_step = step

    def close(self) -> None:
        """Rows are written as they come: nothing is left to flush."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def no_decay_names(model) -> set[str]:
    """Biases and LayerNorm parameters: those the Trainer, and so the reference, does not decay."""
    norms = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    return norms | {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}


def parameter_norms(model) -> dict[str, float]:
    """The norm of the decayed weights and of the rest (biases and LayerNorm), in float64: two
    loops that update alike agree on both, weight decay on the wrong group moves one alone."""
    skip = no_decay_names(model)
    squares = {"decay": 0.0, "no_decay": 0.0}
    for name, parameter in model.named_parameters():
        norm = torch.linalg.vector_norm(parameter.detach(), dtype=torch.float64)
        squares["no_decay" if name in skip else "decay"] += float(norm) ** 2
    return {group: math.sqrt(value) for group, value in squares.items()}


def disable_dropout(model) -> list[tuple[str, float]]:
    """Sets every dropout probability of the model to 0: nn.Dropout modules, the float
    `*dropout*` / `*layerdrop*` attributes TrOCR and ViT read at each forward, and their
    configs. Returns (config key, old value) for each config value changed."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_probability_name(name) and isinstance(value, float) and value:
                setattr(module, name, 0.0)
    changed = []
    configs = [("", model.config)] + [
        (f"{part}.", getattr(model.config, part)) for part in ("encoder", "decoder") if hasattr(model.config, part)
    ]
    for prefix, config in configs:
        for key, value in config.to_diff_dict().items():
            if _is_probability_name(key) and isinstance(value, (int, float)) and not isinstance(value, bool) and value:
                setattr(config, key, 0.0)
                changed.append((prefix + key, value))
    return changed


def _is_probability_name(name: str) -> bool:
    return "dropout" in name or "layerdrop" in name


def starting_model(settings: dict):
    """The trace's starting weights, special tokens as the reference set them, dropout off."""
    from transformers import VisionEncoderDecoderModel

    try:  # never the folder's own code; an error the caller reports as a ValueError
        model = pretrained(VisionEncoderDecoderModel, settings["model_name_or_path"], "the trace's model_name_or_path",
                           revision=settings.get("model_revision") or "main")
    except BadInput as error:
        raise ValueError(str(error)) from None
    tokens = settings["special_tokens"]
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokens["decoder_start_token_id"]
        config.eos_token_id = tokens["eos_token_id"]
        config.pad_token_id = tokens["pad_token_id"]
    disable_dropout(model)
    return model


# ---------------------------------------------------------------------------------------
# Writing a trace: run_trocr.py --trace_steps N


def configure_trace_run(model_args, data_args, training_args):
    """With --trace_steps N: a short deterministic run (N steps, augmentation off, no
    evaluation, no checkpoints) and its StepTrace callback; None without it."""
    steps = data_args.trace_steps
    if not steps:
        return None
    if not training_args.do_train:
        raise SystemExit("--trace_steps traces training steps: do_train must be true")
    if training_args.world_size > 1:
        raise SystemExit(f"--trace_steps: a trace is written by one process, not {training_args.world_size}")
    logger.info("Trace mode: max_steps %s -> %d, the trace's steps", training_args.max_steps, steps)
    training_args.max_steps = steps
    if data_args.augment:
        logger.info("Trace mode: augmentation off (augment true -> false), so that a batch is the same in any loop")
        data_args.augment = False
    logger.info("Trace mode: evaluation, prediction and checkpoints skipped; the run stops after step %d", steps)
    training_args.do_eval = training_args.do_predict = training_args.load_best_model_at_end = False
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy  # the recipe's: SaveStrategy is new in 4.47

    training_args.eval_strategy, training_args.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
    data_args.early_stopping_patience = None
    return StepTrace(training_args.output_dir, model_args)


class StepTrace(TrainerCallback):
    """Writes `<output_dir>/trace/`: per optimizer step the batches the model consumed (one
    safetensors file per micro-batch: pixel_values as the model received them, labels), the
    lines' ids and texts, the loss, label tokens, gradient norm before clipping, learning rate
    and parameter norms after the update; settings.json when training starts."""

    def __init__(self, output_dir: str, model_args):
        self.trace_dir = Path(output_dir) / TRACE_DIR
        self.model_args = model_args
        self.pending = []  # this step's micro-batches: (pixel_values, labels, rows)
        self.ids, self.texts, self.collator, self.hook, self.special_tokens = [], [], None, None, {}

    def prepare(self, run, checkpoint) -> None:
        """Before the trainer is built: dropout off, the training rows carried with each batch
        and taken out again (with the batch recorded) just before the model's forward."""
        if checkpoint:
            raise SystemExit(f"--trace_steps: a trace starts from the starting weights, not from {checkpoint}; "
                             "use a fresh output_dir or --overwrite_output_dir")
        for key, old in disable_dropout(run.model):
            logger.info("Trace mode: dropout off: %s %s -> 0.0", key, old)
        self.ids, self.texts, self.collator = run.ids["train"], run.references["train"], run.collator
        tokenizer = run.processor.tokenizer
        self.special_tokens = {
            "decoder_start_token_id": run.model.config.decoder_start_token_id, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
        }
        run.inputs["train"] = IndexedSplit(run.inputs["train"])
        run.collator = IndexingCollator(run.collator)
        self.hook = run.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, model, args, kwargs):
        rows = kwargs.pop(INDEX_KEY, None)
        if rows is not None and model.training:
            pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
            self.pending.append((pixels.detach().cpu(), kwargs["labels"].detach().cpu(), rows.tolist()))
        return args, kwargs

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step:
            raise SystemExit("--trace_steps: a trace starts at step 0, not from a resumed run")
        shutil.rmtree(self.trace_dir, ignore_errors=True)
        self.trace_dir.mkdir(parents=True)
        settings = trace_settings(args, state, self.model_args, model, optimizer, self.collator)
        settings["special_tokens"] = self.special_tokens
        (self.trace_dir / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        (self.trace_dir / STEPS).write_text("", encoding="utf-8")
        logger.info("Trace: writing %d steps to %s", state.max_steps, self.trace_dir)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "loss" not in logs or not self.pending:
            return
        from safetensors.torch import save_file

        parts, tokens = [], 0
        for micro_step, (pixels, labels, rows) in enumerate(self.pending):
            name = f"step_{state.global_step:06d}_{micro_step}.safetensors"
            save_file({"pixel_values": pixels.contiguous(), "labels": labels.contiguous()}, self.trace_dir / name)
            count = int(labels.ne(-100).sum())
            parts.append({"file": name, "ids": [self.ids[row] for row in rows],
                          "texts": [self.texts[row] for row in rows], "label_tokens": count})
            tokens += count
        self.pending = []
        row = {"step": state.global_step, "loss": logs["loss"], "label_tokens": tokens,
               "grad_norm": logs.get("grad_norm"), "learning_rate": logs.get("learning_rate"),
               "param_norms": parameter_norms(model), "micro_batches": parts}
        with (self.trace_dir / STEPS).open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(row) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
        logger.info("Trace: %d steps in %s (replay it: docs/step_comparison.md)", state.global_step, self.trace_dir)


class IndexedSplit(torch.utils.data.Dataset):
    """The training split, each row carrying its index, so the trace can name its lines."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index):
        return {**self.split[int(index)], INDEX_KEY: int(index)}


class IndexingCollator:
    """The run's collator, plus the batch's row indices (removed again by the trace's hook)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator([{k: v for k, v in f.items() if k != INDEX_KEY} for f in features])
        batch[INDEX_KEY] = torch.tensor([f[INDEX_KEY] for f in features])
        return batch


def trace_settings(args, state, model_args, model, optimizer, collator) -> dict:
    """settings.json: what a loop must share with the reference for its steps to be comparable."""
    import transformers

    inner = getattr(optimizer, "optimizer", optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        {"weight_decay": group["weight_decay"], "params": [names[id(p)] for p in group["params"]]}
        for group in inner.param_groups
    ]
    defaults = inner.defaults
    path = model_args.model_name_or_path
    return {
        "format": FORMAT,
        "model_name_or_path": str(Path(path).resolve()) if Path(path).exists() else path,
        "model_revision": model_args.model_revision,
        "optimizer": {
            "name": type(inner).__name__, "lr": args.learning_rate, "betas": list(defaults.get("betas", ())),
            "eps": defaults.get("eps"), "weight_decay": args.weight_decay,
            "trainer_optim": str(getattr(args.optim, "value", args.optim)),
        },
        "param_groups": groups,
        "no_decay": [name for group in groups if not group["weight_decay"] for name in group["params"]],
        "schedule": {
            "name": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.get_warmup_steps(state.max_steps), "total_steps": state.max_steps,
            "kwargs": args.lr_scheduler_kwargs or {},
        },
        "max_grad_norm": args.max_grad_norm,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "seed": args.seed,
        "steps": state.max_steps,
        "special_tokens": {},  # the tokenizer's, filled in by StepTrace
        "loss": LOSS,
        "dropout": DROPOUT_NOTE,
        "augmentation": AUGMENTATION_NOTE,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "pixel_values": {
            "image_mean": collator.image_mean, "image_std": collator.image_std,
            "rescale_factor": collator.rescale_factor,
        },
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }


# ---------------------------------------------------------------------------------------
# Naming the loss a loop computed: compare_runs.py, when step 1 parts


# The label mistakes, each (name, fix); any subset of them is one way of computing the labels.
BOS_KEPT = ("<s> kept in the labels", "tokenize the labels with add_special_tokens=False and append </s>: no <s> in "
            f"the labels ({pitfall_doc(2)})")
PADS_COUNTED = ("pad tokens counted in the loss", "pad the labels with -100, not the pad id, so that padding is no "
                f"part of the loss ({pitfall_doc(3)})")
START_BOS = ("decoder started from <s>", "set config.decoder_start_token_id (and the generation config's) to </s>, "
             f"as the checkpoint was trained ({pitfall_doc(1)})")
SMOOTHING = 0.1
SMOOTHED = (f"label smoothing {SMOOTHING:g}", "no label smoothing in a comparison with the reference")
PAD_WIDTHS = (32, 64, 128)  # the max_length values tutorials pad their labels to, besides the longest line
REFERENCE = "the reference loss (token sum / label tokens)"


def step_loss_variants(trace_dir) -> list[tuple[str, float, str]]:
    """The loss of the trace's first optimizer step, from the starting weights, computed the
    reference's way and in every combination of the common wrong ways (label mistakes, the
    reduction, label smoothing): (name, value, fix) each, the reference first, a combination
    named "a + b + c"."""
    batches = ReferenceBatches(trace_dir)
    settings = batches.settings
    model = starting_model(settings)
    model.eval()
    _, micro = next(batches.by_step())
    longest = getattr(model.config.decoder, "max_position_embeddings", None) or max(PAD_WIDTHS)
    with torch.no_grad():
        parts = [_token_losses(model, batch, settings["special_tokens"], longest) for batch in micro]
    variants = []
    for labels_key, labels_names in _label_ways(parts):
        for smoothed in (False, True):
            key = labels_key + (smoothed,)
            for reduction, value in _reductions([part[key] for part in parts]):
                names = labels_names + ([SMOOTHED] if smoothed else []) + ([reduction] if reduction else [])
                variants.append((" + ".join(n for n, _ in names) or REFERENCE, value,
                                 "; ".join(fix for _, fix in names)))
    variants.sort(key=lambda variant: variant[0] != REFERENCE)
    return variants


def _label_ways(parts) -> list[tuple[tuple, list]]:
    """Each subset of the label mistakes, with the widths a loop counting the pads may pad to:
    (key into _token_losses' results without the smoothing flag, [(name, fix)])."""
    ways = []
    common = set.intersection(*(set(part) for part in parts))  # a pad width wider than every micro-batch
    for key in [key for key in parts[0] if key in common]:
        bos, start, width, smoothed = key
        if smoothed:
            continue
        names = [BOS_KEPT] if bos else []
        if width is not None:
            padded = "" if width == "longest" else f" (labels padded to {width})"
            names.append((PADS_COUNTED[0] + padded, PADS_COUNTED[1]))
        ways.append(((bos, start, width), names + ([START_BOS] if start else [])))
    return ways


def _reductions(parts: list[dict]) -> list[tuple[tuple | None, float]]:
    """The step's loss from each micro-batch's token sums, counts and line means, reduced the
    reference's way (None) and the usual other ways: [(name and fix or None, value)]."""
    total, tokens = sum(p["sum"] for p in parts), sum(p["tokens"] for p in parts)
    reductions = [
        (None, total / tokens),
        (("mean of per-line means", "divide the token sum by the step's label tokens, not a mean of per-line means"),
         sum(p["line_means"] for p in parts) / sum(p["lines"] for p in parts)),
        (("sum instead of mean", "divide the summed loss by the step's label tokens"), total),
    ]
    if len(parts) > 1:
        means = [p["sum"] / p["tokens"] for p in parts]
        reductions += [
            (("mean of the micro-batch means",
              "divide by the label tokens of the whole optimizer step, not by each micro-batch's"),
             sum(means) / len(means)),
            (("micro-batch means summed (not divided by the accumulation steps)",
              "divide by the label tokens of the whole optimizer step"), sum(means)),
        ]
    return reductions


def _token_losses(model, batch, tokens, longest: int) -> dict[tuple, dict]:
    """One micro-batch's token sum, token count, line count and summed line means for each way
    of making its labels: {(bos kept, decoder from <s>, pad width or None, smoothed): sums}. The
    decoder is causal, so one forward at the widest pad width gives every narrower one."""
    results = {}
    for bos in (False, True):
        labels = _with_bos(batch["labels"], tokens["bos_token_id"]) if bos else batch["labels"]
        real = labels.ne(-100)
        widths = ["longest"] + [w for w in PAD_WIDTHS if labels.shape[1] < w <= longest]
        wide = max([labels.shape[1]] + widths[1:])
        padded = torch.full((len(labels), wide), tokens["pad_token_id"], dtype=torch.long)
        padded[:, : labels.shape[1]] = labels.masked_fill(~real, tokens["pad_token_id"])
        real = torch.nn.functional.pad(real, (0, wide - labels.shape[1]), value=False)
        for start in (False, True):
            first = tokens["bos_token_id"] if start else tokens["decoder_start_token_id"]
            inputs = torch.cat([torch.full_like(padded[:, :1], first), padded[:, :-1]], 1)
            logits = model(pixel_values=batch["pixel_values"], decoder_input_ids=inputs).logits.float().transpose(1, 2)
            for smoothed in (False, True):
                losses = torch.nn.functional.cross_entropy(
                    logits, padded, reduction="none", label_smoothing=SMOOTHING if smoothed else 0.0
                )
                for width in [None] + widths:
                    counted = real if width is None else torch.zeros_like(real)
                    if width is not None:
                        counted[:, : labels.shape[1] if width == "longest" else width] = True
                    results[(bos, start, width, smoothed)] = _sums(losses, counted)
    return results


def _sums(losses: torch.Tensor, counted: torch.Tensor) -> dict:
    """Summed in float64: reductions equal by arithmetic (one width for every line) stay equal."""
    kept = losses.double() * counted
    return {"sum": float(kept.sum()), "tokens": int(counted.sum()), "lines": len(losses),
            "line_means": float((kept.sum(1) / counted.sum(1).clamp(min=1)).sum())}


def _with_bos(labels, bos_id: int) -> torch.Tensor:
    """Each line's labels with <s> in front, -100 padded again."""
    rows = [torch.cat([torch.tensor([bos_id]), row[row.ne(-100)]]) for row in labels]
    out = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
