"""Training step time of ADNet with LoRA (PEFT) against full fine-tuning, on the same batches in one process.

Both arms are ADNet built on the same backbone checkpoint; the LoRA arm wraps it with
`get_peft_model(model, adnet_lora_config(model, ...))` (adapters on the blocks' linear layers, units and output
layers trained fully). One optimiser step (forward, backward, AdamW over the trainable parameters) is timed in turns
with the full fine-tuning arm; the table gives seconds per step, its ratio to full fine-tuning and the trainable
parameters of each.

    python -m benchmarks.bench_lora --backbone PATH --data data/glue/SST-2/dev.tsv --lora_r 8 \\
        --max_length 64 --name sst2_minilm_lora_step
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoTokenizer

from adnet_hf import ADNetForSequenceClassification
from adnet_hf.peft_adnet import adnet_lora_config

from .bench_costs import training_batches, training_step
from .common import benchmark_parser, interleaved_seconds, parse_benchmark_args, write_results


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def step_rows(models: dict[str, torch.nn.Module], batches: list[dict], repeats: int) -> list[dict]:
    """Seconds per optimiser step of each model as a ratio of the first's, same batches, timed in turns."""
    runs = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        steps = [training_step(model, batch, optimizer) for batch in batches]
        runs[name] = lambda steps=steps: [step() for step in steps]
    seconds = interleaved_seconds(runs, repeats)
    reference = next(iter(seconds.values()))
    return [
        {
            "setting": name,
            "trainable_parameters": trainable_parameters(model),
            "seconds_per_step": seconds[name] / len(batches),
            "ratio_to_full_fine_tuning": seconds[name] / reference,
        }
        for name, model in models.items()
    ]


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "lora_step")
    parser.add_argument("--backbone", required=True, help="backbone checkpoint (with its tokenizer) ADNet wraps")
    parser.add_argument("--data", required=True, help="GLUE-style TSV: sentences (or pairs) and labels")
    parser.add_argument("--train_batches", type=int, default=4, help="batches timed per repeat")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16.0)
    parser.add_argument("--lora_target_modules", nargs="+", help="block layers to adapt (default: every linear one)")
    args = parse_benchmark_args(parser, argv)

    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    batches, label_settings = training_batches(
        tokenizer, args.data, args.train_batches, args.batch_size, args.max_length
    )
    full = ADNetForSequenceClassification.from_backbone(args.backbone, **label_settings)
    lora = ADNetForSequenceClassification.from_backbone(args.backbone, **label_settings)
    config = adnet_lora_config(lora, args.lora_target_modules, r=args.lora_r, lora_alpha=args.lora_alpha)
    models = {"full fine-tuning": full, f"LoRA r={args.lora_r}": get_peft_model(lora, config)}
    rows = step_rows(models, batches, args.repeats)
    for row in rows:
        print(row, flush=True)
    payload = {
        "benchmark": "lora_step",
        "backbone": args.backbone,
        "data": args.data,
        "train_batch_size": args.batch_size,
        "lora_alpha": args.lora_alpha,
        "lora_target_modules": args.lora_target_modules or "every linear layer of the blocks",
    }
    return write_results(args.name, payload, rows, results_dir=args.results_dir)


if __name__ == "__main__":
    print(main())
