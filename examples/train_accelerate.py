#!/usr/bin/env python
"""Fine-tune ADNet on a GLUE-style task with a plain `accelerate` loop: the training `run_glue_style.py` does with
`ADNetTrainer`, written out (per-group learning rates decaying to a floor, max-norm, gradient accumulation).

    python examples/train_accelerate.py --model_name_or_path PATH --train_file train.tsv --validation_file dev.tsv \\
        --output_dir outputs/my-run [the run_glue_style.py arguments]
    accelerate launch --num_processes 2 --cpu examples/train_accelerate.py ...   # or torchrun --nproc_per_node 2

It takes the same arguments as `run_glue_style.py` (those that mean something without a Trainer: the schedule is
linear or cosine), trains on `train_file`, evaluates on `validation_file` and saves the model, its tokenizer and
`eval_results.json` to `output_dir`. As the Trainer does, it saves `checkpoint-N` folders by `--save_strategy`
(`steps` or `epoch`), keeps `--save_total_limit` of them, and resumes from the last one in `output_dir` (or from
`--resume_from_checkpoint`) to the same weights as a run that was never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, SchedulerType, rotate_checkpoints

from adnet_examples.arguments import (
    GLUE_ARGUMENTS,
    command_line,
    end_run,
    offline_default,
    parse_arguments,
    prepare_glue_task,
    resume_checkpoint,
    start_afresh,
)
from adnet_examples.data import select
from adnet_hf.evaluation_adnet import evaluation_metrics, pooled_items
from adnet_hf.losses_adnet import LOSSES
from adnet_hf.trainer_adnet import ADNetTrainingArguments, adnet_optimizer_groups, apply_max_norm, floor_scheduler

logger = logging.getLogger(__name__)

OFFLINE_DEFAULT = Path(__file__).resolve().parent / "data" / "offline_default.json"
LOOP_STATE = "loop_state.json"  # in a checkpoint, beside accelerate's state: where the loop stood


@dataclass
class LoopPosition:
    """Where training stands: the optimiser updates done, the epoch, and the batches of it each process has used."""

    updates: int = 0
    epoch: int = 0
    batches: int = 0


def build_accelerator(args: ADNetTrainingArguments, loss_type: str) -> Accelerator:
    """DDP looks for unused parameters only under losses that leave some without a gradient; the seeded sampler
    shuffles the same way whatever the number of processes (as Trainer's does)."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not LOSSES[loss_type].trains_halting)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.use_cpu,
        kwargs_handlers=[ddp],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def training_updates(args: ADNetTrainingArguments, batches_per_epoch: int) -> int:
    """Optimiser steps: `max_steps` when set, else `num_train_epochs` (fractions included) of the batches."""
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * batches_per_epoch / args.gradient_accumulation_steps))


def build_optimizer(model: torch.nn.Module, args: ADNetTrainingArguments, total_updates: int, processes: int):
    """AdamW over ADNet's parameter groups, and the schedule that decays each group to its floor. The prepared
    scheduler steps once per process at every update, so its steps (warm-up included) are updates x processes."""
    if args.lr_scheduler_type not in (SchedulerType.LINEAR, SchedulerType.COSINE):
        raise ValueError(f"train_accelerate.py schedules are linear or cosine, got {args.lr_scheduler_type.value!r}.")
    decay_names = Trainer.get_decay_parameter_names(None, model)  # Trainer's rule: no decay on biases and norms
    optimizer = torch.optim.AdamW(
        adnet_optimizer_groups(model, args, decay_names),
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    warmup = args.get_warmup_steps(total_updates) * processes
    return optimizer, floor_scheduler(optimizer, args, total_updates * processes, num_warmup_steps=warmup)


def train(
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    loader: DataLoader,
    args: ADNetTrainingArguments,
    total_updates: int,
    position: LoopPosition,
    save,
) -> None:
    """Optimiser steps from `position` to `total_updates`: accumulate, clip, step, then renormalise the unit and output
    rows; `save(position)` after the updates `--save_strategy` asks for."""
    unwrapped = accelerator.unwrap_model(model)
    max_norm = unwrapped.config.max_weight_norm
    save_every = checkpoint_interval(args, total_updates)
    model.train()
    while position.updates < total_updates:
        loader.set_epoch(position.epoch)
        for batch in accelerator.skip_first_batches(loader, position.batches) if position.batches else loader:
            position.batches += 1
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            position.updates += 1
            if max_norm is not None:
                apply_max_norm(unwrapped, max_norm)
            if args.logging_steps and position.updates % args.logging_steps == 0:
                logger.info("epoch %d update %d loss %.4f", position.epoch, position.updates, loss.item())
            end_of_epoch = position.batches == len(loader)
            if (save_every and position.updates % save_every == 0) or (end_of_epoch and save_every == 0):
                save(
                    LoopPosition(
                        position.updates, position.epoch + end_of_epoch, 0 if end_of_epoch else position.batches
                    )
                )
            if position.updates == total_updates:
                return
        position.epoch, position.batches = position.epoch + 1, 0


def checkpoint_interval(args: ADNetTrainingArguments, total_updates: int) -> int | None:
    """Updates between checkpoints as the Trainer reads `--save_steps` (below 1: a fraction of the run); 0 to save at
    the end of every epoch; None for no checkpoints."""
    if args.save_strategy == SaveStrategy.STEPS:
        return math.ceil(args.save_steps * total_updates) if args.save_steps < 1 else int(args.save_steps)
    return 0 if args.save_strategy == SaveStrategy.EPOCH else None


def save_checkpoint(accelerator: Accelerator, args: ADNetTrainingArguments, tokenizer, position: LoopPosition) -> None:
    """`checkpoint-N` in `output_dir`, named as the Trainer names them: accelerate's state (the model as safetensors,
    the optimiser, the schedule, every process's random states), the tokenizer and the loop position. It is written
    under a temporary name and renamed when complete, so that a kill while saving never leaves a checkpoint that
    cannot be resumed; the oldest beyond `--save_total_limit` are then removed."""
    folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{position.updates}")
    partial_folder = folder + ".partial"
    accelerator.save_state(partial_folder, safe_serialization=True)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(partial_folder)
        Path(partial_folder, LOOP_STATE).write_text(json.dumps(asdict(position)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial_folder, folder)
        rotate_checkpoints(args.output_dir, args.save_total_limit)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, folder: str) -> LoopPosition:
    """Restore what `save_checkpoint` saved in `folder`; returns the loop position to go on from."""
    state = Path(folder, LOOP_STATE)
    if not state.is_file():
        raise ValueError(
            f"--resume_from_checkpoint {folder} is not a train_accelerate.py checkpoint: it has no {LOOP_STATE}."
        )
    accelerator.load_state(folder)
    return LoopPosition(**json.loads(state.read_text()))


def evaluate(accelerator: Accelerator, model, loader: DataLoader) -> dict[str, float]:
    """The task metrics with the configured exits and the backbone steps and layers each sample actually ran
    (`evaluation_adnet`), over the samples of every process."""
    items = pooled_items(accelerator.unwrap_model(model).eval(), loader, gather=accelerator.gather_for_metrics)
    return {f"eval_{name}": value for name, value in evaluation_metrics(items).items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the script; returns the evaluation metrics."""
    model_args, adnet_args, data_args, args = parse_arguments(
        GLUE_ARGUMENTS, argv, partial(offline_default, OFFLINE_DEFAULT)
    )
    if model_args.plain_baseline:
        raise ValueError("--plain_baseline is run_glue_style.py's (plain fine-tuning with Trainer), not this loop's.")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.save_strategy == SaveStrategy.BEST:
        raise ValueError(
            "--save_strategy best keeps the best checkpoint by evaluation during training, which "
            "train_accelerate.py does not do: use steps, epoch or no."
        )
    set_seed(args.seed)
    data_args.require_files({"train": "train_accelerate.py", "validation": "train_accelerate.py"})
    data_args.check_files()
    checkpoint = resume_checkpoint(args)
    task = prepare_glue_task(model_args, adnet_args, data_args, checkpoint)
    model, tokenizer = task.model, task.tokenizer
    collate = DataCollatorWithPadding(tokenizer)
    train_data = select(task.tokenized["train"], data_args.max_train_samples)
    eval_data = select(task.tokenized["validation"], data_args.max_eval_samples)
    # Its own generator: drawing from the global one each epoch would shift the dropout masks of a resumed run.
    train_loader = DataLoader(
        train_data,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_loader = DataLoader(eval_data, batch_size=args.per_device_eval_batch_size, collate_fn=collate)

    start_afresh(args, inputs=(model_args.model_name_or_path, model_args.tokenizer_name))
    accelerator = build_accelerator(args, model.config.loss_type)
    total_updates = training_updates(args, math.ceil(len(train_loader) / accelerator.num_processes))
    optimizer, scheduler = build_optimizer(model, args, total_updates, accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    position = LoopPosition() if checkpoint is None else load_checkpoint(accelerator, checkpoint)
    train(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_loader,
        args,
        total_updates,
        position,
        partial(save_checkpoint, accelerator, args, tokenizer),
    )
    metrics = evaluate(accelerator, model, eval_loader)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as file:
            json.dump({**metrics, "command": command_line()}, file, indent=2)
        logger.info("eval: %s", metrics)
    end_run(accelerator)
    return metrics


if __name__ == "__main__":
    main()
