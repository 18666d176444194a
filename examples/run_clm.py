#!/usr/bin/env python
"""Train ADNet for causal language modelling on plain text files (after Transformers' `run_clm.py`).

    # GPT-2 from a config, trained from scratch on Penn Treebank with the GPT-2 tokenizer
    python examples/run_clm.py --backbone_config '{"model_type": "gpt2", "n_layer": 6, "n_embd": 256, "n_head": 4}' \\
        --tokenizer_name data/gpt2-tokenizer --train_file data/ptb/ptb.train.txt \\
        --validation_file data/ptb/ptb.valid.txt --test_file data/ptb/ptb.test.txt \\
        --output_dir outputs/ptb-gpt2-adnet --do_train --do_eval --do_predict

    # units only, on a frozen pretrained Llama-family LM shipped as GGUF
    python examples/run_clm.py --model_name_or_path DIR --gguf_file model.gguf --freeze_full_depth ...

    # the LayerSkip way (early-exit loss at every exit with the shared head, layer dropout rising with depth)
    python examples/run_clm.py --backbone_config '{"model_type": "gpt2", ...}' --num_fixed_steps 0 \
        --loss_type layerskip --early_exit_loss_scale 0.2 --layer_dropout 0.1 ...

    # exit adapters on a frozen model, so that its head can read its intermediate layers (drafts, exits), trained
    # towards the model's own full-depth prediction
    python examples/run_clm.py --model_name_or_path DIR --exit_adapters true --freeze_full_depth \
        --exit_distillation true --loss_type layerskip ...

Evaluation reports perplexity with the configured exit policy, perplexity at full depth and the mean number of
backbone layers executed per token, and writes them to `eval_results.json` / `predict_results.json`. Perplexity is
pooled over every predicted token of the set (`adnet_hf.evaluation_adnet`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import transformers
from torch.utils.data import DataLoader
from transformers import Trainer, default_data_collator, set_seed

from adnet_examples.arguments import (
    ADNetArguments,
    TextModelArguments,
    build_task_model,
    end_run,
    num_blocks,
    parse_arguments,
    read_json_argument,
    resume_checkpoint,
    save_results,
    start_afresh,
)
from adnet_examples.data import TextBlocks, check_block_size, load_tokenizer, token_blocks
from adnet_hf.evaluation_adnet import evaluate_batches, perplexity, token_losses
from adnet_hf.exits_adnet import FULL_DEPTH
from adnet_hf.trainer_adnet import ADNetTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments(TextModelArguments):
    """`TextModelArguments` for a causal LM, which may be shipped as GGUF; a `--backbone_config`'s vocab_size
    follows the tokenizer."""

    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path."})


@dataclass
class DataArguments:
    """Plain text files, cut into blocks of `block_size` tokens."""

    train_file: str | None = field(default=None, metadata={"help": "Training text."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation text."})
    test_file: str | None = field(default=None, metadata={"help": "Test text (--do_predict)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N blocks of eval/test."})

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(
                f"--block_size must be at least 2 (a block predicts its tokens from the ones before), got "
                f"{self.block_size}."
            )


def load_model(model_args: ModelArguments, adnet_args: ADNetArguments, tokenizer):
    """The model and its trainer class; a backbone from a config gets the tokenizer's vocabulary and its end token."""
    backbone = None
    if model_args.backbone_config is not None:
        backbone = read_json_argument(model_args.backbone_config)
        backbone.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id"):
            backbone.setdefault(name, tokenizer.eos_token_id)
    backbone_kwargs = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else None
    return build_task_model("text-generation", model_args, adnet_args, {}, backbone, backbone_kwargs)


@torch.no_grad()
def lm_metrics(model, loader: DataLoader, exit_policy: str | None = None) -> dict[str, float]:
    """Perplexity over every predicted token (`evaluation_adnet`); for ADNet also the steps and layers run per token,
    with `exit_policy` (default: the configured one)."""
    if model.config.model_type == "adnet":
        return evaluate_batches(model, loader, exit_policy)
    losses = []
    for batch in loader:
        input_ids, labels = batch["input_ids"].to(model.device), batch["labels"].to(model.device)
        losses.append(token_losses(model(input_ids=input_ids).logits, labels))
    return {"perplexity": perplexity(torch.cat(losses))}


def evaluate_perplexity(trainer: Trainer, dataset, prefix: str) -> dict[str, float]:
    """Perplexity pooled over every predicted token of `dataset`, not exp of the mean of per-batch losses, and the
    layers run per token; for ADNet with the configured exits and at full depth, the policy passed per call.

    Token losses are not gathered across processes, so every process evaluates the whole set.
    """
    model = trainer.model.eval()
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    configured = lm_metrics(model, loader)
    metrics = {f"{prefix}_num_blocks": num_blocks(model), **{f"{prefix}_{k}": v for k, v in configured.items()}}
    if model.config.model_type == "adnet":
        metrics[f"{prefix}_exit_policy"] = policy = model.config.exit_policy
        full_depth = configured if policy == FULL_DEPTH else lm_metrics(model, loader, FULL_DEPTH)
        metrics.update({f"{prefix}_full_depth_{key}": value for key, value in full_depth.items()})
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, adnet_args, data_args, training_args = parse_arguments(
        (ModelArguments, ADNetArguments, DataArguments, ADNetTrainingArguments), argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    checkpoint = resume_checkpoint(training_args) if training_args.do_train else None
    tokenizer = load_tokenizer(model_args)
    model, trainer_class = load_model(model_args, adnet_args, tokenizer)
    check_block_size(model, data_args.block_size)
    splits = {"train": data_args.train_file, "eval": data_args.validation_file, "test": data_args.test_file}
    data = {
        split: TextBlocks(
            token_blocks(
                tokenizer,
                path,
                data_args.block_size,
                data_args.max_train_samples if split == "train" else data_args.max_eval_samples,
            )
        )
        for split, path in splits.items()
        if path is not None
    }

    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=data.get("train"),
        eval_dataset=data.get("eval"),
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    results: dict[str, float] = {}
    if training_args.do_train:
        start_afresh(training_args, inputs=(model_args.model_name_or_path, model_args.tokenizer_name))
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        results.update(save_results(trainer, "train", train_result.metrics))
    evaluations = (("eval", "eval", training_args.do_eval), ("test", "predict", training_args.do_predict))
    for split, prefix, wanted in evaluations:
        if wanted and split in data:
            results.update(save_results(trainer, prefix, evaluate_perplexity(trainer, data[split], prefix)))
    end_run(trainer.accelerator)
    return results


if __name__ == "__main__":
    main()
