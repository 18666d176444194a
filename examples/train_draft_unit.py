#!/usr/bin/env python
"""Train a draft unit (EAGLE) on a frozen causal LM, for lossless speculative decoding (`use_draft_unit=True`).

    # the frozen model answers the instructions (its own greedy answers: self-distillation), its top features of
    # those answers and of a text are cached once, then the draft unit trains on them
    python examples/train_draft_unit.py --model_name_or_path MODEL_DIR \\
        --prompts_file examples/data/draft_instructions.json --train_file data/ptb/ptb.train.txt \\
        --max_train_samples 200 --feature_cache_dir outputs/draft-features --draft_vocabulary_size 8192 \\
        --output_dir outputs/model-with-draft-unit --per_device_train_batch_size 8 --learning_rate 5e-4 \\
        --num_train_epochs 8 --save_strategy epoch

`--model_name_or_path` is an ADNet checkpoint (which keeps a draft unit it has, or gets a new one) or a plain
Transformers causal LM, wrapped with its weights unchanged (and saved with `exit_policy="none"`, so that its plain
`generate()` stays the model's own). The unit learns best from text like what the model generates: its own answers
to `--prompts_file` (a JSON list of instructions, through the tokenizer's chat template) are the closest. Every
stage resumes where it stopped: the answers (`answers.jsonl` in the cache folder), the feature shards, and training
(`--resume_from_checkpoint`, or the output folder's last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import TrainingArguments, set_seed

from adnet_examples.arguments import build_model, parse_arguments, resume_checkpoint, save_results
from adnet_examples.data import as_blocks, chat_prompts, check_block_size, load_tokenizer, token_blocks
from adnet_hf import ADNetForCausalLM
from adnet_hf.losses_adnet import DRAFT_FEATURE_WEIGHT, DRAFT_TOKEN_WEIGHT
from adnet_hf.speculative_adnet import frequent_tokens
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
    """The training text (the model's answers to instructions, a text file, or both), cut into blocks of
    `block_size` tokens, and where their top features are cached."""

    feature_cache_dir: str = field(metadata={"help": "Folder of the answers and cached feature shards (resumable)."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "JSON list of instructions the frozen model answers (chat template)."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Plain training text."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N blocks of train_file."})
    max_answer_tokens: int = field(default=256, metadata={"help": "Longest answer the model gives."})
    answer_batch_size: int = field(default=16, metadata={"help": "Instructions answered per generate call."})
    shard_size: int = field(default=256, metadata={"help": "Blocks per feature shard."})
    feature_batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass when caching features."})


@dataclass
class DraftUnitArguments:
    """The draft unit's vocabulary and loss."""

    draft_vocabulary_size: int | None = field(
        default=None,
        metadata={"help": "Draft over the N most frequent tokens of the training text (default: every token)."},
    )
    feature_weight: float = field(default=DRAFT_FEATURE_WEIGHT, metadata={"help": "Weight of the feature regression."})
    token_weight: float = field(
        default=DRAFT_TOKEN_WEIGHT, metadata={"help": "Weight of the next-token cross-entropy."}
    )
    feature_noise: float = field(
        default=0.1,
        metadata={"help": "Width of the uniform noise on the features the unit reads, as a share of their RMS."},
    )


@torch.inference_mode()
def answer(model: ADNetForCausalLM, prompts: list[list[int]], max_tokens: int, pad_id: int) -> list[list[int]]:
    """The model's greedy answers to a batch of prompts (left-padded), each up to its end-of-sequence token; in eval
    mode (a model in training mode runs its training-time layers)."""
    model.eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id, exit_policy="none"
    )
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    answers = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:end])
    return answers


def self_distilled_ids(model, tokenizer, data_args: DraftDataArguments) -> torch.Tensor:
    """Every instruction and the model's answer to it, one token stream; the answers are appended to
    `answers.jsonl` in the cache folder as they come, and a rerun answers only what is missing."""
    prompts = chat_prompts(tokenizer, data_args.prompts_file)
    folder = Path(data_args.feature_cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    answers = saved_answers(folder, prompts, model, data_args.max_answer_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = data_args.answer_batch_size
    with (folder / "answers.jsonl").open("a", encoding="utf-8") as file:
        for start in tqdm(range(len(answers), len(prompts), batch), desc="answering instructions", unit="batch"):
            for row in answer(model, prompts[start : start + batch], data_args.max_answer_tokens, pad):
                file.write(json.dumps(row) + "\n")
                answers.append(row)
            file.flush()
    return torch.tensor([token for prompt, reply in zip(prompts, answers) for token in prompt + reply])


def saved_answers(folder: Path, prompts: list[list[int]], model, max_tokens: int) -> list[list[int]]:
    """The answers a stopped run saved, if they were made for these prompts, by this model, at this length (in
    `answers.meta.json`); a last line cut short by the stop is dropped."""
    meta = {
        "model": model.config._name_or_path,
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "max_answer_tokens": max_tokens,
    }
    path, meta_path = folder / "answers.jsonl", folder / "answers.meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text(encoding="utf-8")) != meta:
        raise ValueError(
            f"{folder} holds answers to other instructions, by another model or of another length "
            f"({meta_path}): pass an empty --feature_cache_dir."
        )
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    answers = []
    for line in lines:
        try:
            answers.append(json.loads(line))
        except json.JSONDecodeError:  # the last line, cut short
            path.write_text("".join(json.dumps(row) + "\n" for row in answers), encoding="utf-8")
            break
    return answers


def training_blocks(model, tokenizer, data_args: DraftDataArguments) -> torch.Tensor:
    """The answers' stream, then `train_file`'s, cut into blocks of `block_size` tokens (the rest dropped)."""
    if data_args.prompts_file is None and data_args.train_file is None:
        raise ValueError("Pass --prompts_file (instructions the model answers), --train_file (text), or both.")
    parts = []
    if data_args.prompts_file is not None:
        ids = self_distilled_ids(model, tokenizer, data_args)
        parts.append(as_blocks(ids, data_args.block_size))
    if data_args.train_file is not None:
        parts.append(token_blocks(tokenizer, data_args.train_file, data_args.block_size, data_args.max_train_samples))
    return torch.cat(parts)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, unit_args, training_args = parse_arguments(
        (DraftModelArguments, DraftDataArguments, DraftUnitArguments, TrainingArguments), argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    checkpoint = resume_checkpoint(training_args)
    tokenizer = load_tokenizer(model_args)
    backbone_kwargs = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else None
    model = build_model(
        ADNetForCausalLM,
        model_args.model_name_or_path,
        None,
        {},
        backbone_kwargs,
        new_model_defaults={"exit_policy": "none"},
    ).to(training_args.device)
    check_block_size(model, data_args.block_size)
    blocks = training_blocks(model, tokenizer, data_args)
    logger.info("%d training blocks of %d tokens", len(blocks), data_args.block_size)
    size = unit_args.draft_vocabulary_size
    if model.draft_unit is None:
        model.add_draft_unit(None if size is None else frequent_tokens(blocks, size, model.config.vocab_size))
    elif size is not None and size != model.config.draft_vocabulary_size:
        raise ValueError(
            f"--draft_vocabulary_size {size}: the model's draft unit has a vocabulary of "
            f"{model.config.draft_vocabulary_size} already; leave the option out to train it further."
        )
    cache_top_features(model, blocks, data_args.feature_cache_dir, data_args.shard_size, data_args.feature_batch_size)
    trainer = DraftUnitTrainer(
        model=model,
        args=training_args,
        feature_weight=unit_args.feature_weight,
        token_weight=unit_args.token_weight,
        feature_noise=unit_args.feature_noise,
        train_dataset=TopFeatureShards(data_args.feature_cache_dir),
        processing_class=tokenizer,
    )
    metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    trainer.save_model()
    return save_results(trainer, "train", metrics)


if __name__ == "__main__":
    main()
