"""Causal LM: perplexity and generation tokens/s at full depth and with per-token exit.

Perplexity is teacher-forced on a text file (default: PTB test) with the exit policy applied per token (exited
tokens keep their exit state, as in generation). Generation speed is greedy decoding of a fixed number of new
tokens from prompts taken from the same text, at batch 1 and 8, timed against the same weights at full depth.

    python -m benchmarks.bench_generation --model outputs/ptb-adnet-smollm2 \
        --data ../shared/data/ptb/ptb.test.txt --name ptb_smollm2
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import adnet_hf  # noqa: F401  (registers the Auto classes)
from adnet_hf.calibration_adnet import POLICY_FIELDS
from adnet_hf.data_adnet import token_blocks

from .common import benchmark_parser, interleaved_seconds, parse_benchmark_args, save_figure, write_results


@torch.inference_mode()
def perplexity(model, blocks: torch.Tensor, batch_size: int, policy: str) -> tuple[float, float]:
    """(perplexity, executed layers per predicted token on average) with `policy`."""
    nll, tokens, layers = 0.0, 0, 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        out = model(input_ids=batch, exit_policy=policy)
        log_probs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        nll -= log_probs.gather(-1, batch[:, 1:].unsqueeze(-1)).sum().item()
        tokens += batch[:, 1:].numel()
        layers += (out.exit_steps[:, :-1] * model.config.layers_per_step).sum().item()
    return math.exp(nll / tokens), layers / tokens


def generation_speed(model, prompts: torch.Tensor, new_tokens: int, policy: str,
                     repeats: int) -> tuple[float, float]:
    """(speed-up against full depth, tokens/s) of `policy` generating `new_tokens` per prompt.

    With no end-of-sequence token every run makes exactly `new_tokens`; `min_new_tokens` would do it too, but through
    logits processors that scan the whole vocabulary at every token, a cost that is not the model's.
    """
    def generate(exit_policy: str):
        return lambda: model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                      eos_token_id=None, do_sample=False, exit_policy=exit_policy,
                                      pad_token_id=model.generation_config.eos_token_id)

    seconds = interleaved_seconds({"exit": generate(policy), "none": generate("none")}, repeats)
    return seconds["none"] / seconds["exit"], prompts.shape[0] * new_tokens / seconds["exit"]


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The causal LM checkpoint and the text, cut into blocks, that a generation benchmark reads."""
    parser.add_argument("--model", required=True, help="ADNet causal LM checkpoint folder")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    parser.add_argument("--data", required=True, help="plain text file")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--max_blocks", type=int, default=64, help="blocks for perplexity")


def load_text_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (in eval mode) and the token blocks of `--data`."""
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    return model, token_blocks(tokenizer, Path(args.data), args.block_size, args.max_blocks)


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "generation")
    add_text_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=8, help="perplexity batch size")
    parser.add_argument("--generation_batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
                        help="halting_epsilon values")
    parser.add_argument("--confidence", type=float, nargs="*", default=[],
                        help="confidence_threshold values (CALM's softmax confidence: runs the LM head per step)")
    args = parse_benchmark_args(parser, argv)
    model, blocks = load_text_inputs(args)
    full_ppl, full_layers = perplexity(model, blocks, args.batch_size, "none")
    rows = [{"policy": "none (full depth)", "setting": None, "perplexity": full_ppl,
             "ppl_increase_pct": 0.0, "executed_layers": full_layers, "ideal_speedup": 1.0}]
    settings = [("halting", value) for value in args.epsilons] + [("confidence", v) for v in args.confidence]
    for policy, value in settings:
        setattr(model.config, POLICY_FIELDS[policy], value)
        ppl, layers = perplexity(model, blocks, args.batch_size, policy)
        row = {"policy": policy, "setting": value, "perplexity": ppl,
               "ppl_increase_pct": 100 * (ppl / full_ppl - 1), "executed_layers": layers,
               "ideal_speedup": full_layers / layers}
        for size in args.generation_batch_sizes:
            prompts = blocks[:size, : args.prompt_length]
            speedup, tokens_per_second = generation_speed(model, prompts, args.new_tokens, policy, args.repeats)
            row[f"tokens_per_s_b{size}"] = tokens_per_second
            row[f"speedup_b{size}"] = speedup
        rows.append(row)
        print(row, flush=True)
    payload = {"benchmark": "generation", "model": args.model, "data": args.data, "blocks": len(blocks),
               "block_size": args.block_size, "new_tokens": args.new_tokens, "num_blocks": model.config.num_blocks}
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
