#!/usr/bin/env python
"""Train a draft unit (EAGLE) on a frozen causal LM, for lossless speculative decoding (`use_draft_unit=True`).

    # the frozen model's top features of Penn Treebank, cached once, then the draft unit trained on them
    python examples/train_draft_unit.py --model_name_or_path MODEL_DIR --train_file data/ptb/ptb.train.txt \\
        --feature_cache_dir outputs/ptb-features --block_size 256 --output_dir outputs/model-with-draft-unit \\
        --per_device_train_batch_size 8 --learning_rate 3e-4 --num_train_epochs 2

`--model_name_or_path` is an ADNet checkpoint (which keeps a draft unit it has, or gets a new one) or a plain
Transformers causal LM, wrapped with its weights unchanged. The feature cache is resumable: a shard already written
is skipped. Only the draft unit trains; the output folder holds the whole model with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import transformers
from run_clm import check_block_size, load_tokenizer
from transformers import TrainingArguments, set_seed

from adnet_examples.arguments import build_model, parse_arguments
from adnet_examples.data import token_blocks
from adnet_hf import ADNetForCausalLM
from adnet_hf.trainer_adnet import DraftUnitTrainer, TopFeatureShards, cache_top_features

logger = logging.getLogger(__name__)


@dataclass
class DraftModelArguments:
    """The frozen model and its tokenizer."""

    model_name_or_path: str = field(metadata={"help": "An ADNet checkpoint or a plain causal LM (folder or Hub id)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not model_name_or_path's."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path."})


@dataclass
class DraftDataArguments:
    """A plain text file cut into blocks of `block_size` tokens, and where their top features are cached."""

    train_file: str = field(metadata={"help": "Training text."})
    feature_cache_dir: str = field(metadata={"help": "Folder of the cached feature shards (resumable)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks."})
    shard_size: str = field(metadata={"help": "Folder of the cached feature shards (resumable)."})
    shard_size: int = field(default=256, metadata={"help": "Blocks per feature shard."})
    feature_batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass when caching features."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(
        (DraftModelArguments, DraftDataArguments, TrainingArguments), argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    backbone_kwargs = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else None
    model = build_model(ADNetForCausalLM, model_args.model_name_or_path, None, {"draft_unit": True}, backbone_kwargs)
    check_block_size(model, data_args.block_size)
    blocks = token_blocks(tokenizer, data_args.train_file, data_args.block_size, data_args.max_train_samples)
    cache_top_features(model, blocks, data_args.feature_cache_dir, data_args.shard_size, data_args.feature_batch_size)
    trainer = DraftUnitTrainer(
        model=model,
        args=training_args,
        train_dataset=TopFeatureShards(data_args.feature_cache_dir),
        processing_class=tokenizer,
    )
    metrics = trainer.train().metrics
    trainer.save_model()
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    return metrics


if __name__ == "__main__":
    main()
