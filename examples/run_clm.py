#!/usr/bin/env python
"""Train ADNet for causal language modelling on plain text files (after Transformers' `run_clm.py`).

    # GPT-2 from a config, trained from scratch on Penn Treebank with the GPT-2 tokenizer
    python examples/run_clm.py --backbone_config '{"model_type": "gpt2", "n_layer": 6, "n_embd": 256, "n_head": 4}' \\
        --tokenizer_name ../shared/data/gpt2-tokenizer --train_file ../shared/data/ptb/ptb.train.txt \\
        --validation_file ../shared/data/ptb/ptb.valid.txt --test_file ../shared/data/ptb/ptb.test.txt \\
        --output_dir outputs/ptb-gpt2-adnet --do_train --do_eval --do_predict

    # units only, on a frozen pretrained Llama-family LM shipped as GGUF
    python examples/run_clm.py --model_name_or_path DIR --gguf_file model.gguf --freeze_full_depth ...

Evaluation reports perplexity with the configured exit policy, perplexity at full depth and the mean number of
backbone layers executed per token, and writes them to `eval_results.json` / `predict_results.json`.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer, Trainer, default_data_collator, set_seed

from adnet_hf import ADNetForCausalLM
from adnet_hf.trainer_adnet import ADNetTrainer, ADNetTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adnet_arguments import (  # noqa: E402
    ADNetArguments, build_model, build_plain_model, freeze_full_depth_field, parse_arguments,
    plain_baseline_field, read_json_argument, total_layers,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to train."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A causal LM checkpoint (GPT-2, Llama family) or a saved ADNet checkpoint."}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path."})
    backbone_config: str | None = field(
        default=None,
        metadata={"help": "Instead of a checkpoint: a backbone trained from scratch, from this config (a JSON file or "
                          "an inline JSON object with a model_type); its vocab_size follows the tokenizer."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder, if not the model's."})
    freeze_full_depth: bool = freeze_full_depth_field()
    plain_baseline: bool = plain_baseline_field("causal LM")


@dataclass
class DataArguments:
    """Plain text files, cut into blocks of `block_size` tokens."""

    train_file: str | None = field(default=None, metadata={"help": "Training text."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation text."})
    test_file: str | None = field(default=None, metadata={"help": "Test text (--do_predict)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N blocks of eval/test."})


class TextBlocks(torch.utils.data.Dataset):
    """A text file as consecutive blocks of token ids, each its own labels (the model shifts them)."""

    def __init__(self, tokenizer, path: str, block_size: int, max_blocks: int | None):
        ids = tokenizer(Path(path).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        count = len(ids) // block_size
        if max_blocks is not None:
            count = min(count, max_blocks)
        self.blocks = ids[: count * block_size].view(count, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def load_tokenizer(model_args: ModelArguments):
    """The tokenizer folder's tokenizer; a bare `vocab.json` + `merges.txt` folder is GPT-2's byte-level BPE."""
    source = model_args.tokenizer_name or model_args.model_name_or_path
    folder = Path(source)
    if (folder / "merges.txt").exists() and not (folder / "tokenizer_config.json").exists():
        return GPT2Tokenizer.from_pretrained(folder)
    gguf = {"gguf_file": model_args.gguf_file} if model_args.gguf_file and not model_args.tokenizer_name else {}
    return AutoTokenizer.from_pretrained(source, **gguf)


def load_model(model_args: ModelArguments, adnet_args: ADNetArguments, tokenizer):
    backbone = None
    if model_args.backbone_config is not None:
        backbone = read_json_argument(model_args.backbone_config)
        backbone.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id"):
            backbone.setdefault(name, tokenizer.eos_token_id)
    backbone_kwargs = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else None
    if model_args.plain_baseline:
        return build_plain_model(AutoModelForCausalLM, model_args.model_name_or_path, backbone, {}, backbone_kwargs)
    return build_model(ADNetForCausalLM, model_args.model_name_or_path, backbone, adnet_args.overrides(),
                       backbone_kwargs, model_args.freeze_full_depth)


def _perplexity(trainer: Trainer, dataset, prefix: str) -> dict[str, float]:
    metrics = trainer.evaluate(dataset, metric_key_prefix=prefix)
    metrics[f"{prefix}_perplexity"] = math.exp(metrics[f"{prefix}_loss"])
    return metrics


def evaluate_perplexity(trainer: Trainer, dataset, prefix: str) -> dict[str, float]:
    """Perplexity and the layers per token; for ADNet with the configured exits, and at full depth."""
    config = trainer.model.config
    metrics = _perplexity(trainer, dataset, prefix)
    metrics[f"{prefix}_total_layers"] = total_layers(trainer.model)
    if config.model_type != "adnet":
        return metrics
    policy = config.exit_policy
    config.exit_policy = "none"
    try:
        metrics.update(_perplexity(trainer, dataset, f"{prefix}_full_depth"))
    finally:
        config.exit_policy = policy
    metrics[f"{prefix}_exit_policy"] = policy
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, adnet_args, data_args, training_args = parse_arguments(
        (ModelArguments, ADNetArguments, DataArguments, ADNetTrainingArguments), sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, adnet_args, tokenizer)
    splits = {"train": data_args.train_file, "eval": data_args.validation_file, "test": data_args.test_file}
    data = {split: TextBlocks(tokenizer, path, data_args.block_size,
                              data_args.max_train_samples if split == "train" else data_args.max_eval_samples)
            for split, path in splits.items() if path is not None}

    trainer_class = Trainer if model_args.plain_baseline else ADNetTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=data.get("train"),
                            eval_dataset=data.get("eval"), processing_class=tokenizer,
                            data_collator=default_data_collator)
    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        results.update(train_result.metrics)
    evaluations = (("eval", "eval", training_args.do_eval), ("test", "predict", training_args.do_predict))
    for split, prefix, wanted in evaluations:
        if wanted and split in data:
            metrics = evaluate_perplexity(trainer, data[split], prefix)
            trainer.log_metrics(prefix, metrics)
            trainer.save_metrics(prefix, metrics)
            results.update(metrics)
    return results


if __name__ == "__main__":
    main()
