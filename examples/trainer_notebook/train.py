#!/usr/bin/env python
"""Fine-tune TrOCR with Seq2SeqTrainer, written the way the most copied community notebook
("Fine-tune TrOCR on the IAM Handwriting Database using Seq2SeqTrainer") writes it: a
Dataset that runs the processor on each image and pads labels to max_length, the special
tokens and beam settings set on model.config, default_data_collator, predict_with_generate,
and a compute_metrics that decodes the label ids back into references.

    python train.py --model models/tiny --data data/tiny --output_dir runs/notebook
    python train.py ... --mistakes all      # the notebook's own mistakes: start, bos, beam_settings, label_references
    python train.py ... --check             # check_trainer(trainer) before training: prints, exits 1 on an error

The training uses nothing from the trocr_recipe project; only --check does, in one line.
"""

import argparse
import sys

import jiwer
import pandas as pd
import torch
from datasets import load_from_disk
from torch.utils.data import Dataset
from transformers import (
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrOCRProcessor,
    VisionEncoderDecoderModel,
    default_data_collator,
)

MISTAKES = ("start", "bos", "beam_settings", "label_references")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="models/tiny", help="a TrOCR checkpoint folder or Hub id")
parser.add_argument("--data", default="data/tiny", help="a save_to_disk folder: train, validation; image, text")
parser.add_argument("--output_dir", default="runs/notebook")
parser.add_argument("--max_steps", type=int, default=8)
parser.add_argument("--max_target_length", type=int, default=64, help="label length (longer lines are truncated)")
parser.add_argument("--mistakes", default="", help=f"comma list of {', '.join(MISTAKES)}; 'all' for every one")
parser.add_argument("--check", action="store_true", help="check_trainer(trainer) before training, then stop")
args = parser.parse_args()
mistakes = set(MISTAKES) if args.mistakes == "all" else set(filter(None, args.mistakes.split(",")))
if mistakes - set(MISTAKES):
    parser.error(f"--mistakes: unknown {','.join(sorted(mistakes - set(MISTAKES)))}; choose from {','.join(MISTAKES)}")
torch.manual_seed(42)

# The data: a DataFrame of texts, images read by the Dataset, labels padded to max_length.
dataset = load_from_disk(args.data)
processor = TrOCRProcessor.from_pretrained(args.model)


class IAMDataset(Dataset):
    def __init__(self, split, processor, max_target_length=64):
        self.split = split
        self.df = pd.DataFrame({"text": split["text"]})
        self.processor = processor
        self.max_target_length = max_target_length

    def __len__(self):
        return len(self.df)

    def __getitem__(self, idx):
        text = self.df["text"][idx]
        image = self.split[idx]["image"].convert("RGB")
        pixel_values = self.processor(image, return_tensors="pt").pixel_values
        if "bos" in mistakes:  # the notebook: the tokenizer's <s> text </s>, padded
            labels = self.processor.tokenizer(text, padding="max_length", max_length=self.max_target_length,
                                              truncation=True).input_ids
        else:
            ids = self.processor.tokenizer(text, add_special_tokens=False).input_ids[: self.max_target_length - 1]
            ids = ids + [processor.tokenizer.eos_token_id]
            labels = ids + [self.processor.tokenizer.pad_token_id] * (self.max_target_length - len(ids))
        labels = [label if label != self.processor.tokenizer.pad_token_id else -100 for label in labels]
        return {"pixel_values": pixel_values.squeeze(), "labels": torch.tensor(labels)}


train_dataset = IAMDataset(dataset["train"], processor, args.max_target_length)
eval_dataset = IAMDataset(dataset["validation"], processor, args.max_target_length)

# The model: special tokens and beam settings.
model = VisionEncoderDecoderModel.from_pretrained(args.model)
if "start" in mistakes:
    model.config.decoder_start_token_id = processor.tokenizer.cls_token_id
else:
    model.config.decoder_start_token_id = processor.tokenizer.sep_token_id
    model.generation_config.decoder_start_token_id = processor.tokenizer.sep_token_id
model.config.pad_token_id = processor.tokenizer.pad_token_id
model.config.vocab_size = model.config.decoder.vocab_size
model.config.eos_token_id = processor.tokenizer.sep_token_id
if "beam_settings" in mistakes:  # the notebook's config cell, as first written
    model.config.max_length = 64
    model.config.early_stopping = True
    model.config.no_repeat_ngram_size = 3
    model.config.length_penalty = 2.0
    model.config.num_beams = 4
else:
    model.generation_config.max_length = 64
    model.generation_config.early_stopping = True
    model.generation_config.num_beams = 4

# The metric.
texts_of_eval = list(eval_dataset.df["text"])


def compute_metrics(pred):
    labels_ids = pred.label_ids
    pred_ids = pred.predictions
    if "label_references" in mistakes:  # the notebook: references decoded back from the label ids
        pred_str = processor.batch_decode(pred_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        labels_ids[labels_ids == -100] = processor.tokenizer.pad_token_id
        label_str = processor.batch_decode(labels_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    else:
        pred_str = processor.batch_decode(pred_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        label_str = texts_of_eval[: len(pred_str)]
    return {"cer": jiwer.cer(label_str, pred_str)}


training_args = Seq2SeqTrainingArguments(
    predict_with_generate=True,
    eval_strategy="steps",
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    output_dir=args.output_dir,
    logging_steps=2,
    save_steps=1000,
    eval_steps=4,
    max_steps=args.max_steps,
    report_to=[],
    use_cpu=True,
)
trainer = Seq2SeqTrainer(
    model=model,
    processing_class=processor.image_processor,
    args=training_args,
    compute_metrics=compute_metrics,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    data_collator=default_data_collator,
)

if args.check:  # the one line that uses trocr_recipe (pip install -e path/to/it)
    from trocr_recipe.trainercheck import check_trainer, format_findings, has_errors

    findings = check_trainer(trainer, processor=processor)
    print(format_findings(findings))
    sys.exit(1 if has_errors(findings) else 0)

trainer.train()
print(trainer.evaluate())
