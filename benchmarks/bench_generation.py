"""Causal LM: perplexity and generation tokens/s at full depth and with per-token exit.

Perplexity is teacher-forced on a text file (default: PTB test) with the exit policy applied per token (exited
tokens keep their exit state, as in generation), pooled over every predicted token by
`adnet_hf.evaluation_adnet.sweep_exits`, each setting passed per call. Generation speed is greedy decoding of a
fixed number of new tokens from prompts taken from the same text, at batch 1 and 8, timed against the same weights
at full depth.

    python -m benchmarks.bench_generation --model outputs/ptb-adnet-smollm2 \
        --data data/ptb/ptb.test.txt --name ptb_smollm2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import adnet_hf  # noqa: F401  (registers the Auto classes)
from adnet_examples.data import load_tokenizer_folder, token_blocks
from adnet_hf.evaluation_adnet import sweep_exits
from adnet_hf.exits_adnet import EXIT_RULES, FULL_DEPTH

from .common import (
    benchmark_parser,
    interleaved_seconds,
    parse_benchmark_args,
    row_policy,
    save_figure,
    write_results,
)


def generation_speed(
    model, prompts: torch.Tensor, new_tokens: int, policy: str, threshold: float, repeats: int
) -> tuple[float, float]:
    """(speed-up against full depth, tokens/s) of `policy` at `threshold` generating `new_tokens` per prompt.

    With no end-of-sequence token every run makes exactly `new_tokens`; `min_new_tokens` would do it too, but through
    logits processors that scan the whole vocabulary at every token, a cost that is not the model's.
    """

    def generate(exit_policy: str, exit_threshold: float | None = None):
        return lambda: model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            eos_token_id=None,
            do_sample=False,
            exit_policy=exit_policy,
            exit_threshold=exit_threshold,
            pad_token_id=model.generation_config.eos_token_id,
        )

    seconds = interleaved_seconds({"exit": generate(policy, threshold), "none": generate(FULL_DEPTH)}, repeats)
    return seconds["none"] / seconds["exit"], prompts.shape[0] * new_tokens / seconds["exit"]


def quality_row(record: dict, full: dict) -> dict:
    """A `sweep_exits` record as a results row: perplexity and its increase over the `full`-depth record's, layers
    per predicted token."""
    perplexity, layers = record["perplexity"], record["executed_layers"]
    return {
        "policy": row_policy(record["exit_policy"]),
        "setting": record["exit_threshold"],
        "perplexity": perplexity,
        "ppl_increase_pct": 100 * (perplexity / full["perplexity"] - 1),
        "executed_layers": layers,
        "ideal_speedup": full["executed_layers"] / layers,
    }


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The causal LM checkpoint and the text, cut into blocks, that a generation benchmark reads."""
    parser.add_argument("--model", required=True, help="ADNet causal LM checkpoint folder")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    parser.add_argument("--data", required=True, help="plain text file")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--max_blocks", type=int, default=64, help="blocks for perplexity")


def load_text_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (in eval mode) and the token blocks of `--data`."""
    tokenizer = load_tokenizer_folder(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    return model, token_blocks(tokenizer, Path(args.data), args.block_size, args.max_blocks)


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "generation")
    add_text_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=8, help="perplexity batch size")
    parser.add_argument("--generation_batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
        help=f"{EXIT_RULES['halting'].config_field} values",
    )
    parser.add_argument(
        "--confidence",
        type=float,
        nargs="*",
        default=[],
        help=f"{EXIT_RULES['confidence'].config_field} values (CALM's softmax confidence: runs the LM head per step)",
    )
    args = parse_benchmark_args(parser, argv)
    model, blocks = load_text_inputs(args)
    settings = [("halting", value) for value in args.epsilons] + [("confidence", v) for v in args.confidence]
    batches = [{"input_ids": batch, "labels": batch} for batch in blocks.split(args.batch_size)]
    records = sweep_exits(model, batches, [(FULL_DEPTH, None)] + settings)
    rows = [quality_row(record, records[0]) for record in records]
    for row in rows[1:]:
        for size in args.generation_batch_sizes:
            prompts = blocks[:size, : args.prompt_length]
            speedup, tokens_per_second = generation_speed(
                model, prompts, args.new_tokens, row["policy"], row["setting"], args.repeats
            )
            row[f"tokens_per_s_b{size}"] = tokens_per_second
            row[f"speedup_b{size}"] = speedup
        print(row, flush=True)
    payload = {
        "benchmark": "generation",
        "model": args.model,
        "data": args.data,
        "blocks": len(blocks),
        "block_size": args.block_size,
        "new_tokens": args.new_tokens,
        "num_blocks": model.config.num_blocks,
    }
    return write_results(args.name, payload, rows, plot(rows, args.generation_batch_sizes), args.results_dir)


def plot(rows: list[dict], sizes: list[int]):
    def draw(axis, index: int) -> None:
        for policy in dict.fromkeys(r["policy"] for r in rows[1:]):
            for size in sizes:
                points = [(r[f"speedup_b{size}"], r["perplexity"]) for r in rows if r["policy"] == policy]
                axis.plot(*zip(*points), marker="o", label=f"{policy}, batch {size}")
        axis.axhline(rows[0]["perplexity"], color="gray", linestyle="--", label="full depth")
        axis.set_xlabel("measured generation speed-up (tokens/s vs full depth)")
        axis.set_ylabel("perplexity")

    return lambda path: save_figure(path, 1, draw)


if __name__ == "__main__":
    print(main())
