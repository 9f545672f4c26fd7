#!/usr/bin/env python
"""Fine-tune TrOCR on handwritten text lines with a plain PyTorch loop, written the way the
community "fine-tune TrOCR on IAM" notebooks write it: a Dataset that runs the processor
on each image, a DataLoader, AdamW, tqdm, a CER on the validation split after each epoch.

    python train.py --model models/tiny --data data/tiny --output_dir runs/tutorial
    python train.py ... --mistakes all          # the four classic mistakes, as tutorials make them
    python train.py ... --mistakes pad,bos      # or some of them: bos, pad, start, teacher_forced

The training uses nothing from the trocr_recipe project; only the three check hooks do,
one line each in the training loop:

    --check                 check_loop() on the first training batch: prints the findings, exits 1 on an error
    --save_batch PATH       saves the first training batch and the model as set up (in --output_dir),
                            for `python check_loop.py --model OUTPUT_DIR --batch PATH`
    --reference_trace DIR   trains on a reference run's batches and settings (run_trocr.py --trace_steps N
                            writes DIR) and writes step_log.jsonl, for `python compare_runs.py REFERENCE OUTPUT_DIR`
"""

import argparse
import sys
from pathlib import Path

import jiwer
import torch
from datasets import load_from_disk
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import TrOCRProcessor, VisionEncoderDecoderModel, get_scheduler

MISTAKES = ("bos", "pad", "start", "teacher_forced")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="models/tiny", help="a TrOCR checkpoint folder or Hub id")
parser.add_argument("--data", default="data/tiny", help="a save_to_disk folder: train, validation, test; image, text")
parser.add_argument("--output_dir", default="runs/tutorial")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: after the epochs)")
parser.add_argument("--lr", type=float, default=5e-5)
parser.add_argument("--batch_size", type=int, default=4)
parser.add_argument("--max_target_length", type=int, default=64)
parser.add_argument("--num_beams", type=int, default=4)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--mistakes", default="", help=f"comma list of {', '.join(MISTAKES)}; 'all' for the four")
parser.add_argument("--check", action="store_true", help="check_loop() on the first training batch, then stop")
parser.add_argument("--save_batch", metavar="PATH",
                    help="save the first training batch (and the model, in output_dir) for check_loop.py, then stop")
parser.add_argument("--reference_trace", metavar="DIR", help="train on a reference trace's batches and settings")
args = parser.parse_args()
mistakes = set(MISTAKES) if args.mistakes == "all" else set(filter(None, args.mistakes.split(",")))
if mistakes - set(MISTAKES):
    parser.error(f"--mistakes: unknown {','.join(sorted(mistakes - set(MISTAKES)))}; choose from {','.join(MISTAKES)}")
torch.manual_seed(args.seed)
Path(args.output_dir).mkdir(parents=True, exist_ok=True)

# ---------------------------------------------------------------------------------------
# Data: each item is a line image through the processor and its text as label ids.

processor = TrOCRProcessor.from_pretrained(args.model)
tokenizer = processor.tokenizer
dataset = load_from_disk(args.data)


class IAMDataset(Dataset):
    def __init__(self, split, processor, max_target_length=64):
        self.split = split
        self.processor = processor
        self.max_target_length = max_target_length

    def __len__(self):
        return len(self.split)

    def __getitem__(self, idx):
        item = self.split[idx]
        image, text = item["image"].convert("RGB"), item["text"]
        pixel_values = self.processor(image, return_tensors="pt").pixel_values.squeeze()
        return {"pixel_values": pixel_values, "labels": torch.tensor(self.labels(text)), "text": text}

    def labels(self, text):
        max_length = self.max_target_length
        if "bos" in mistakes:
            # MISTAKE bos: the tokenizer's default, <s> text </s>: the model learns to write <s> first.
            labels = self.processor.tokenizer(text, padding="max_length", max_length=max_length, truncation=True)
            labels = labels.input_ids
        else:
            ids = self.processor.tokenizer(text, add_special_tokens=False).input_ids[: max_length - 1]
            labels = ids + [tokenizer.eos_token_id]
            labels += [tokenizer.pad_token_id] * (max_length - len(labels))
        if "pad" in mistakes:
            return labels  # MISTAKE pad: pad ids left in the labels count in the loss
        return [label if label != tokenizer.pad_token_id else -100 for label in labels]


train_dataset = IAMDataset(dataset["train"], processor, args.max_target_length)
eval_dataset = IAMDataset(dataset["validation"], processor, args.max_target_length)
test_dataset = IAMDataset(dataset["test"], processor, args.max_target_length)
train_dataloader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True)
eval_dataloader = DataLoader(eval_dataset, batch_size=args.batch_size)
test_dataloader = DataLoader(test_dataset, batch_size=args.batch_size)

# ---------------------------------------------------------------------------------------
# Model: special tokens on the config (the label shift reads it) and on the generation
# config (generate() reads it), beam search on the generation config.

model = VisionEncoderDecoderModel.from_pretrained(args.model)
if "start" in mistakes:
    # MISTAKE start: tutorials start the decoder from cls_token_id, <s> in TrOCR's tokenizer, and
    # set it on model.config only: the loss trains from <s> while generate() starts from </s>.
    model.config.decoder_start_token_id = tokenizer.bos_token_id
else:
    model.config.decoder_start_token_id = tokenizer.eos_token_id  # the pretrained decoder starts from </s>
    model.generation_config.decoder_start_token_id = tokenizer.eos_token_id
model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
model.config.vocab_size = model.config.decoder.vocab_size
model.generation_config.max_length = args.max_target_length
model.generation_config.num_beams = args.num_beams
model.generation_config.early_stopping = args.num_beams > 1


def decode(ids):
    return tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def generate_step(model, batch):
    """The text generate() reads in each line of a batch, as at test time."""
    model.eval()
    with torch.no_grad():
        return decode(model.generate(batch["pixel_values"]))


def validation_step(model, batch):
    if "teacher_forced" in mistakes:
        # MISTAKE teacher_forced: the argmax of the labelled forward pass, each token predicted
        # from the true ones before it, while the test split is read with generate().
        model.eval()
        with torch.no_grad():
            return decode(model(pixel_values=batch["pixel_values"], labels=batch["labels"]).logits.argmax(-1))
    return generate_step(model, batch)


def cer(model, dataloader, predict):
    predictions, references = [], []
    for batch in dataloader:
        predictions += predict(model, batch)
        references += batch["text"]
    return 100 * jiwer.cer(references, predictions)


# ---------------------------------------------------------------------------------------
# The check hooks: the only code here that uses trocr_recipe (pip install -e path/to/it).


def check(batch):
    """check_loop() on one training batch, with this loop's validation step; exit 1 on an error."""
    import trocr_recipe
    from trocr_recipe.loopcheck import check_loop, format_findings

    print(f"checking with {trocr_recipe.__file__}")
    pixels_and_labels = {"pixel_values": batch["pixel_values"], "labels": batch["labels"]}
    findings = check_loop(model, processor, pixels_and_labels, texts=batch["text"], evaluate=validation_step)
    print(format_findings(findings))
    sys.exit(1 if any(finding.level == "error" for finding in findings) else 0)


def save_batch(batch, path):
    """One training batch, and the model and processor as this loop set them up (in
    output_dir), for `python check_loop.py --model OUTPUT_DIR --batch PATH`; then stop
    (after --check, if asked too)."""
    torch.save({"pixel_values": batch["pixel_values"], "labels": batch["labels"], "texts": batch["text"]}, path)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"saved a batch of {len(batch['text'])} lines to {path}, the model to {args.output_dir}")
    if not args.check:
        sys.exit(0)


def replay(trace_dir):
    """The reference run's optimizer steps, optimizer, schedule and clipping, and a step log
    for compare_runs.py. The labels are made from each line's text by this loop's own label
    code and the model keeps this loop's special tokens, so that their mistakes show in its
    loss; the micro-batches of a step (gradient accumulation) are trained as one batch, the
    same token mean."""
    from trocr_recipe.steptrace import ReferenceBatches, StepLog

    reference = ReferenceBatches(trace_dir)
    settings, adam, schedule = reference.settings, reference.settings["optimizer"], reference.settings["schedule"]
    parameters = dict(model.named_parameters())
    groups = [{"params": [parameters[name] for name in group["params"]], "weight_decay": group["weight_decay"]}
              for group in settings["param_groups"]]
    optimizer = torch.optim.AdamW(groups, lr=adam["lr"], betas=tuple(adam["betas"]), eps=adam["eps"])
    scheduler = get_scheduler(schedule["name"], optimizer, schedule["warmup_steps"], schedule["total_steps"],
                              scheduler_specific_kwargs=schedule["kwargs"])

    def steps():
        for _, micro_batches in reference.by_step():
            texts = [text for batch in micro_batches for text in batch.texts]
            yield {"pixel_values": torch.cat([batch["pixel_values"] for batch in micro_batches]),
                   "labels": torch.tensor([train_dataset.labels(text) for text in texts]), "text": texts}

    step_log = StepLog(args.output_dir, model=model)
    return steps(), optimizer, scheduler, settings["max_grad_norm"], settings["steps"], step_log


# ---------------------------------------------------------------------------------------
# Training.

optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
scheduler, max_grad_norm, step_log = None, float("inf"), None
if args.reference_trace:
    train_dataloader, optimizer, scheduler, max_grad_norm, args.max_steps, step_log = replay(args.reference_trace)

step = 0
for epoch in range(args.epochs):
    model.train()
    if args.reference_trace:
        model.eval()  # the reference trace is taken with dropout off
    for batch in tqdm(train_dataloader, desc=f"epoch {epoch}"):
        if args.save_batch: save_batch(batch, args.save_batch)
        if args.check: check(batch)

        outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        loss = outputs.loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)  # inf: the norm, no clipping
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        step += 1

        if step_log: step_log.log(step, loss.item(), learning_rate, grad_norm.item())
        if step == args.max_steps:
            break
    if args.reference_trace:
        break
    validation_cer = cer(model, eval_dataloader, validation_step)
    print(f"epoch {epoch}: step {step}, loss {loss.item():.4f}, validation CER {validation_cer:.2f}")
    if step == args.max_steps:
        break

if args.reference_trace:
    print(f"wrote {step} steps to {step_log.path}")
else:
    print(f"test CER {cer(model, test_dataloader, generate_step):.2f}")
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
