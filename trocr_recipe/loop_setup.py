"""What the plain loop (run_trocr_no_trainer.py) builds before training, as the Trainer builds
it, so that both runs match step for step: the arguments it implements, the seed, the
accelerator, the data loaders and TensorBoard. Nothing here imports the Trainer."""

from . import recipe_only  # noqa: F401, I001  (first: an older transformers is named at import)

import logging
import os
from copy import deepcopy
from functools import partial

from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import GenerationConfig, set_seed
from transformers.trainer_utils import align_special_tokens, enable_full_determinism, seed_worker

from .never_worse import metric_name

logger = logging.getLogger("trocr_recipe")

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def check_supported(training_args) -> None:
    """Arguments the plain loop does not implement stop the run, instead of being ignored."""
    unsupported = {
        "deepspeed": training_args.deepspeed,
        "fsdp": training_args.fsdp,
        "activation_checkpointing": training_args.activation_checkpointing,
        "torch_compile": training_args.torch_compile,
        "label_smoothing_factor": training_args.label_smoothing_factor,
    }
    named = [name for name, value in unsupported.items() if value]
    if training_args.train_sampling_strategy not in ("random", "sequential"):
        named.append(f"train_sampling_strategy={training_args.train_sampling_strategy}")
    if str(training_args.lr_scheduler_type).split(".")[-1].lower() in ("reduce_lr_on_plateau", "greedy"):
        named.append(f"lr_scheduler_type={training_args.lr_scheduler_type}")
    if str(getattr(training_args.optim, "value", training_args.optim)) not in OPTIMIZERS:
        named.append(f"optim={getattr(training_args.optim, 'value', training_args.optim)} (it builds {' or '.join(OPTIMIZERS)})")
    if named:
        raise SystemExit(f"run_trocr_no_trainer.py does not implement: {', '.join(named)} (use run_trocr.py)")
    if metric_name(training_args) not in ("cer", "wer"):
        raise SystemExit(
            f"metric_for_best_model={training_args.metric_for_best_model}: the custom loop keeps the best "
            "checkpoint by validation cer or wer"
        )


def seed_function(training_args):
    """The Trainer's: enable_full_determinism (deterministic kernels too) or set_seed."""
    return enable_full_determinism if training_args.full_determinism else set_seed


def configure_like_trainer(model, training_args) -> None:
    """What Trainer.__init__ does once the model is loaded: seeds again, before anything draws
    from the random generators; the generation config of the arguments; use_cache."""
    seed_function(training_args)(training_args.seed)
    config = training_args.generation_config
    if config is not None:  # Seq2SeqTrainer.load_generation_config: an object, a folder or a file
        config = deepcopy(config) if isinstance(config, GenerationConfig) else (
            GenerationConfig.from_pretrained(os.path.dirname(config), os.path.basename(config))
            if os.path.isfile(config) else GenerationConfig.from_pretrained(config))
        config.validate(strict=True)
        model.generation_config = config
    model.config.use_cache = training_args.use_cache


def make_accelerator(training_args) -> Accelerator:
    """Mixed precision, data loader sharding and seeding, TensorBoard, as the Trainer's accelerator."""
    accelerator_config = training_args.accelerator_config.to_dict()
    dataloader_config = DataLoaderConfiguration(
        split_batches=accelerator_config["split_batches"],
        dispatch_batches=accelerator_config["dispatch_batches"],
        even_batches=accelerator_config["even_batches"],
        use_seedable_sampler=accelerator_config["use_seedable_sampler"],
        data_seed=training_args.data_seed,
        non_blocking=accelerator_config["non_blocking"],
    )
    accelerator = Accelerator(
        mixed_precision=training_args.mixed_precision,
        dataloader_config=dataloader_config,
        # Gradient accumulation is done by the loop itself, not by accelerate.
        gradient_accumulation_steps=1,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if wants_tensorboard(training_args) else None,
        project_config=ProjectConfiguration(project_dir=training_args.output_dir, logging_dir=training_args.output_dir),
        cpu=training_args.use_cpu,
    )
    if accelerator.is_main_process:
        os.makedirs(training_args.output_dir, exist_ok=True)
    return accelerator


def wants_tensorboard(training_args) -> bool:
    report_to = training_args.report_to or []
    report_to = [report_to] if isinstance(report_to, str) else report_to
    return "tensorboard" in report_to or "all" in report_to


def before_training(accelerator, training_args, model, processor, results: dict) -> None:
    """What Trainer.train does before its first step: the tokenizer's special tokens onto config
    and generation config; TensorBoard started, with the baseline as step 0 of eval/cer."""
    align_special_tokens(accelerator.unwrap_model(model), processor)
    if not wants_tensorboard(training_args):
        return
    from transformers.integrations.integration_utils import default_logdir

    hparams = {k: v for k, v in training_args.to_dict().items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(os.environ.get("TENSORBOARD_LOGGING_DIR") or default_logdir(), config=hparams)
    if "baseline_cer" in results:
        accelerator.log({"eval/cer": results["baseline_cer"], "eval/wer": results["baseline_wer"]}, step=0)


def make_dataloaders(accelerator, training_args, inputs, collator) -> dict:
    """Prepared loaders per split: train first, so that its sampler is the one accelerate's
    state files name."""
    loaders = {}
    if training_args.do_train:
        loaders["train"] = make_dataloader(accelerator, training_args, inputs["train"], collator, train=True)
    for role in ("validation", "test"):
        loaders[role] = make_dataloader(accelerator, training_args, inputs[role], collator, train=False)
    return loaders


def make_dataloader(accelerator, training_args, dataset, collator, train: bool):
    args = training_args
    params = dict(
        batch_size=args.train_batch_size if train else args.eval_batch_size,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        prefetch_factor=args.dataloader_prefetch_factor,
        in_order=args.dataloader_in_order,
        drop_last=args.dataloader_drop_last,
    )
    if train:
        # Trainer: a plain RandomSampler, which accelerate's `prepare` replaces by its
        # SeedableRandomSampler (use_seedable_sampler, seeded by data_seed or the seed) and
        # whose order `set_epoch` changes per epoch. Workers reseed `random`, numpy and torch
        # with seed_worker: the augmentation draws from the global `random`.
        sampler_type = RandomSampler if args.train_sampling_strategy == "random" else SequentialSampler
        params["sampler"] = sampler_type(dataset)
        params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)
    elif args.world_size <= 1:
        params["sampler"] = SequentialSampler(dataset)
    # Note: every pass over a torch DataLoader draws its base seed from the global torch RNG,
    # so each evaluation consumes one draw, as the Trainer's evaluations do.
    return accelerator.prepare(DataLoader(dataset, **params))
