"""Speculative decoding on an ADNet causal LM against the backbone's own `generate()`: drafting from an exit
(`assistant_early_exit=k`), from the model's draft unit (`use_draft_unit=True`), and Transformers' own prompt lookup
(`prompt_lookup_num_tokens=n`, on the plain model).

Batch 1, greedy, a fixed number of new tokens per prompt (no end-of-sequence stop). The reference is the backbone's
own causal LM class (e.g. `GPT2LMHeadModel`, `LlamaForCausalLM`) holding the same weights, in the same process; for
each prompt every arm is timed in turns (`--repeats`, medians). Each row is one arm: its draft (exit depth, the
draft unit, or prompt lookup), draft length (`num_assistant_tokens`) and confidence threshold; it reports tokens/s
of both, the speed-up, the share of drafted tokens accepted, the mean accepted length per verification, and whether
every output equals the reference's.

    python -m benchmarks.bench_speculative --model outputs/ptb-gpt2-adnet --data data/ptb/ptb.test.txt \
        --name ptb_gpt2_speculative --depths 1 2 3 --draft_lengths 4 8
    python -m benchmarks.bench_speculative --model outputs/smollm2-draft-unit --prompts_file \
        benchmarks/data/instructions.json --name instructions_smollm2_draft_unit --draft_unit --prompt_lookup 3 10

`--draft_vocab_size N --draft_vocab_data TRAIN.txt` adds, for every exit setting, a row drafting over the N most
frequent tokens of the training text only (`draft_vocabulary`; verification reads the full LM head); a draft unit
drafts over its own vocabulary (`ADNetConfig.draft_vocabulary_size`). `--prompts_file` takes instructions (a JSON
list of strings, e.g. `benchmarks/data/instructions.json`) as user turns of the tokenizer's chat template instead of
cutting prompts from `--data`. `--dtype bfloat16` runs both models in bfloat16: a pass over k tokens then rounds
differently from k one-token steps, so a greedy output may part from the reference's at a near tie (the rows say
whether it did). `--profile` adds where one generation's time goes (first prompt, torch.profiler):
prefill, draft blocks or unit, draft head, verification blocks, verification head, and the rest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from adnet_examples.data import chat_prompts, load_tokenizer_folder, token_blocks
from adnet_hf import ADNetConfig, ADNetForCausalLM
from adnet_hf.backbones_adnet import matmul_weights
from adnet_hf.speculative_adnet import crop_cache, frequent_tokens

from .common import (
    benchmark_parser,
    interleaved_seconds,
    parse_benchmark_args,
    trained_by,
    write_results,
)


def plain_causal_lm(model: ADNetForCausalLM) -> PreTrainedModel:
    """The backbone's own causal LM class with `model`'s weights (the LM head shared, not copied)."""
    plain = AutoModelForCausalLM.from_config(model.config.backbone_config).to(model.dtype).eval()
    plain.base_model.load_state_dict(model.adnet.backbone.state_dict())
    plain.get_output_embeddings().weight = model.lm_head.weight
    return plain


def load_model(args: argparse.Namespace) -> ADNetForCausalLM:
    """An ADNet checkpoint (`--model`), a plain causal LM checkpoint wrapped unchanged (`--backbone`), or untrained
    weights of a backbone shape (`--backbone_config`, seeded); in `--dtype` where given."""
    dtype = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, **dtype).eval()
    if args.backbone_config:
        torch.manual_seed(0)
        config = ADNetConfig(backbone_config=json.loads(args.backbone_config), num_fixed_steps=1)
        return ADNetForCausalLM(config).to(**dtype).eval()
    kwargs = json.loads(args.backbone_kwargs) | dtype
    return ADNetForCausalLM.from_backbone(args.backbone, backbone_kwargs=kwargs).eval()


def load_tokenizer(args: argparse.Namespace):
    """`--tokenizer`, or the checkpoint's (a GGUF backbone's from its file); a bare `vocab.json` + `merges.txt`
    folder (`data/gpt2-tokenizer`) is GPT-2's."""
    gguf = json.loads(args.backbone_kwargs).get("gguf_file") if args.backbone and not args.tokenizer else None
    return load_tokenizer_folder(args.tokenizer or args.model or args.backbone, **({"gguf_file": gguf} if gguf else {}))


def lm_head_share(model: ADNetForCausalLM) -> float:
    """The LM head's share of a token's matrix-product weights (blocks and head): where decoding time goes when
    it is large, since the draft runs the full head for every drafted token too."""
    head = matmul_weights(model.lm_head)
    return head / (head + sum(matmul_weights(block) for block in model.adnet.adapter.blocks(model.adnet.backbone)))


def draft_settings(args: argparse.Namespace) -> list[dict]:
    """The ADNet arms: each exit depth, then the draft unit, at each draft length and threshold."""
    drafts = [{"assistant_early_exit": depth} for depth in args.depths]
    drafts += [{"use_draft_unit": True}] if args.draft_unit else []
    if not drafts:
        raise ValueError("Pass --depths (exits to draft from), --draft_unit, or both.")
    return [
        draft | {"num_assistant_tokens": length, "assistant_confidence_threshold": threshold}
        for draft, length, threshold in itertools.product(drafts, args.draft_lengths, args.thresholds)
    ]


def with_vocabulary(settings: list[dict], vocabulary: torch.Tensor | None) -> list[dict]:
    """Each exit setting also with the draft vocabulary, when one is given (a draft unit has its own)."""
    if vocabulary is None:
        return settings
    return [
        extra
        for setting in settings
        for extra in (setting, *([] if "use_draft_unit" in setting else [{**setting, "draft_vocabulary": vocabulary}]))
    ]


def draft_vocabulary(args: argparse.Namespace, tokenizer, vocab_size: int) -> torch.Tensor | None:
    """`--draft_vocab_size` most frequent tokens of `--draft_vocab_data` (training text, not the prompts' file)."""
    if args.draft_vocab_size is None:
        return None
    if args.draft_vocab_data is None:
        raise ValueError("--draft_vocab_size ranks the tokens of --draft_vocab_data (a training text file): pass it.")
    return frequent_tokens(token_blocks(tokenizer, Path(args.draft_vocab_data), 1), args.draft_vocab_size, vocab_size)


def load_prompts(args: argparse.Namespace, tokenizer) -> list[torch.Tensor]:
    """`--prompts` blocks of `--prompt_length` tokens cut from `--data`, or the first `--prompts` instructions of
    `--prompts_file`, each a user turn of the tokenizer's chat template with the assistant's turn opened."""
    if args.data:
        return list(token_blocks(tokenizer, Path(args.data), args.prompt_length, args.prompts))
    return [torch.tensor(ids) for ids in chat_prompts(tokenizer, args.prompts_file, args.prompts)]


def generation_kwargs(model: ADNetForCausalLM, ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy, exactly `new_tokens` new tokens (no end-of-sequence stop), for every arm. The mask is given: inferred,
    it would hide every pad token (here the end-of-sequence token, e.g. a chat template's end of turn) in the prompt."""
    return {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": model.config.backbone_config.eos_token_id or 0,
        "attention_mask": torch.ones_like(ids),
    }


PHASES = ("prefill", "draft_blocks", "draft_unit", "draft_head", "verify_blocks", "verify_head")


def phase_seconds(model: ADNetForCausalLM, ids: torch.Tensor, new_tokens: int, setting: dict) -> dict[str, float]:
    """Where one generation's time goes, under torch.profiler: seconds in each of the decoder's phases (its
    `record_function` labels) and the rest (acceptance, logits processors, cache cropping, Python) as `other`."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model.generate(ids.unsqueeze(0), **generation_kwargs(model, ids.unsqueeze(0), new_tokens), **setting)
        total = time.perf_counter() - start
    labels = {event.key: event.cpu_time_total / 1e6 for event in prof.key_averages()}
    phases = {f"{phase}_s": labels.get(f"speculative::{phase}", 0.0) for phase in PHASES}
    return phases | {"other_s": total - sum(phases.values()), "profiled_total_s": total}


def verification_costs(plain, ids: torch.Tensor, lengths: list[int], repeats: int) -> dict[int, float]:
    """Seconds of one pass of the plain model over k tokens after `ids` (a verification of k - 1 drafted tokens),
    relative to k = 1 (a plain decoding step), timed in turns from the same cache of the prompt (medians). A round
    of n drafts pays the cost at n + 1 plus n drafted tokens, so it gains only where it keeps more tokens than that."""
    if not lengths:
        return {}
    with torch.inference_mode():
        cache = plain(ids.unsqueeze(0), use_cache=True).past_key_values
        past, tokens = ids.shape[0], ids[-1:].repeat(max(lengths)).unsqueeze(0)

        def verify(k: int) -> None:
            plain(tokens[:, :k], past_key_values=cache, use_cache=True)
            crop_cache(cache, past)

        seconds = interleaved_seconds({k: lambda k=k: verify(k) for k in sorted({1, *lengths})}, repeats)
    return {k: seconds[k] / seconds[1] for k in lengths}


def measure(
    model, plain, prompts: list[torch.Tensor], new_tokens: int, settings: list[dict], repeats: int
) -> list[dict]:
    """One row per setting, summed over the prompts; every arm timed in turns on each prompt. A setting with
    `prompt_lookup_num_tokens` runs on `plain` (Transformers' own generate), the others on `model`. Every timed run is
    also checked against the reference's first output (medians absorb a cold first run, so no warm-up runs)."""
    totals = [
        dict.fromkeys(("backbone_s", "speculative_s", "verifications", "drafted", "accepted"), 0.0)
        | {"identical_prompts": 0}
        for _ in settings
    ]
    for ids in prompts:
        ids = ids.unsqueeze(0)
        common = generation_kwargs(model, ids, new_tokens)
        outputs: dict = {"backbone": [], **{index: [] for index in range(len(settings))}}
        runs = {"backbone": lambda: outputs["backbone"].append(plain.generate(ids, **common))}
        for index, setting in enumerate(settings):
            runs[index] = lambda index=index, setting=setting: outputs[index].append(
                plain.generate(ids, **common, **setting)
                if "prompt_lookup_num_tokens" in setting
                else model.generate(ids, return_dict_in_generate=True, **common, **setting)
            )
        with torch.inference_mode():
            seconds = interleaved_seconds(runs, repeats, warmup=0)
        reference = outputs["backbone"][0]
        if not all(torch.equal(out, reference) for out in outputs["backbone"]):
            raise RuntimeError("the reference's greedy output changed between runs: nothing can be compared to it.")
        for index, total in enumerate(totals):
            sequences = [getattr(out, "sequences", out) for out in outputs[index]]
            total["identical_prompts"] += all(torch.equal(out, reference) for out in sequences)
            total["backbone_s"] += seconds["backbone"]
            total["speculative_s"] += seconds[index]
            first = outputs[index][0]  # greedy: every run drafts and accepts alike
            if hasattr(first, "verifications"):
                total["verifications"] += first.verifications
                total["drafted"] += first.drafted_tokens
                total["accepted"] += first.accepted_tokens
    return [
        setting | timing_row(total, len(prompts) * new_tokens, len(prompts)) for setting, total in zip(settings, totals)
    ]


def timing_row(total: dict, tokens: int, prompts: int) -> dict:
    """Speed and draft statistics of one arm over every prompt (no draft statistics for prompt lookup), and on how
    many prompts every output equalled the reference's."""
    row = {
        "backbone_tokens_per_s": tokens / total["backbone_s"],
        "tokens_per_s": tokens / total["speculative_s"],
        "speedup": total["backbone_s"] / total["speculative_s"],
        "identical_outputs": total["identical_prompts"] == prompts,
        "identical_prompts": total["identical_prompts"],
    }
    if not total["verifications"]:
        return row
    return row | {
        "acceptance_rate": total["accepted"] / max(total["drafted"], 1),
        "mean_accepted_length": total["accepted"] / total["verifications"],
        "tokens_per_verification": (total["accepted"] + total["verifications"]) / total["verifications"],
    }


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "speculative")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="ADNet causal LM checkpoint folder")
    source.add_argument("--backbone", help="plain causal LM checkpoint folder, wrapped with its weights unchanged")
    source.add_argument(
        "--backbone_config",
        help="JSON backbone config for UNTRAINED weights: measures the decoding "
        "machinery and where the time goes, not a trained model's acceptance (needs --tokenizer)",
    )
    parser.add_argument("--backbone_kwargs", default="{}", help='JSON for from_pretrained, e.g. {"gguf_file": "x"}')
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model or --backbone)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="load the model (and the plain reference) in this dtype (default: the checkpoint's)",
    )
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--data", help="plain text file the prompts are cut from")
    prompts.add_argument("--prompts_file", help="JSON list of instructions, given as chat-template user turns")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--depths", type=int, nargs="+", default=[], help="exit depths (blocks) to draft from")
    parser.add_argument("--draft_unit", action="store_true", help="also draft with the model's draft unit")
    parser.add_argument(
        "--prompt_lookup",
        type=int,
        nargs="+",
        default=[],
        help="also Transformers' prompt lookup on the plain model, with these prompt_lookup_num_tokens",
    )
    parser.add_argument("--draft_lengths", type=int, nargs="+", default=[4], help="num_assistant_tokens values")
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.0],
        help="assistant_confidence_threshold values (0: fixed draft length)",
    )
    parser.add_argument("--draft_vocab_size", type=int, help="also draft over this many most frequent tokens only")
    parser.add_argument("--draft_vocab_data", help="training text the draft vocabulary's frequencies come from")
    parser.add_argument("--profile", action="store_true", help="also profile one generation per setting")
    parser.add_argument(
        "--verify_lengths",
        type=int,
        nargs="+",
        default=[],
        help="also time one pass over k tokens after the first prompt, relative to a plain step, for these k",
    )
    parser.add_argument("--note", default="", help="what the model is, stored with the results")
    args = parse_benchmark_args(parser, argv)
    model = load_model(args)
    tokenizer = load_tokenizer(args)
    prompts = load_prompts(args, tokenizer)
    settings = with_vocabulary(draft_settings(args), draft_vocabulary(args, tokenizer, model.config.vocab_size))
    settings += [{"prompt_lookup_num_tokens": tokens} for tokens in args.prompt_lookup]
    plain = plain_causal_lm(model)
    rows = measure(model, plain, prompts, args.new_tokens, settings, args.repeats)
    if args.profile:
        for row, setting in zip(rows, settings):
            if "prompt_lookup_num_tokens" not in setting:
                row.update(phase_seconds(model, prompts[0], args.new_tokens, setting))
    for row in rows:
        vocabulary = row.pop("draft_vocabulary", None)
        if row.get("use_draft_unit"):
            vocabulary = model.draft_unit.vocabulary
        row["draft_vocab_size"] = None if vocabulary is None else len(vocabulary)
    for row in rows:
        print(row, flush=True)
    source = args.model or args.backbone or f"untrained {args.backbone_config}"
    payload = {
        "benchmark": "speculative",
        "model": source,
        "trained_by": trained_by(args.model) if args.model else None,
        "data": args.data or args.prompts_file,
        "prompts": len(prompts),
        "prompt_lengths": [len(ids) for ids in prompts],
        "new_tokens": args.new_tokens,
        "num_blocks": model.config.num_blocks,
        "dtype": str(model.dtype).removeprefix("torch."),
        "lm_head_weight_share": lm_head_share(model),
        "verification_costs": verification_costs(plain, prompts[0], args.verify_lengths, 5 * args.repeats),
        "note": args.note,
    }
    return write_results(args.name, payload, rows, None, args.results_dir)


if __name__ == "__main__":
    print(main())
