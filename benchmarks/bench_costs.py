"""What ADNet costs besides its saving: training step time and inference peak memory, against plain models.

- Training: one optimiser step (forward, backward, AdamW) of ADNet built on a backbone checkpoint, under each
  `loss_type`, against the backbone's own `AutoModelForSequenceClassification` on the same batches, timed in turns
  in this process.
- Inference peak memory: the rise of the process's peak resident memory (Linux `VmHWM`, reset through
  `/proc/self/clear_refs` once the model and the batches are loaded) over a pass of the data, each setting in a
  fresh process so that no setting inherits another's allocator state: the ADNet checkpoint at full depth and with
  exits (its saved policy, or `--exit_policy` / `--exit_value`, passed per call), and the plain reference. Each is
  measured twice: with glibc's default allocator, which keeps freed heap pages (exits make many sub-batch shapes, so
  more of them stay resident over a run), and with `MALLOC_TRIM_THRESHOLD_=0`, which returns them: the memory the
  passes need.

    python -m benchmarks.bench_costs --backbone PATH --model outputs/sst2-adnet --reference outputs/sst2-plain \\
        --data data/glue/SST-2/dev.tsv --name sst2_minilm_costs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedConfig

from adnet_examples.data import detect_label, label_info, load_table, make_batches, model_label_ids, read_tsv
from adnet_hf import ADNetForSequenceClassification
from adnet_hf.exits_adnet import EXIT_RULES, FULL_DEPTH
from adnet_hf.losses_adnet import LOSSES

from .bench_classification import with_labels
from .common import benchmark_parser, interleaved_seconds, parse_benchmark_args, run_batches, save_figure, write_results

LOSS_TYPES = tuple(LOSSES)


def training_step(model, batch: dict, optimizer: torch.optim.Optimizer):
    """A closure running one optimiser step of `model` on `batch`."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def training_batches(tokenizer, data: str, count: int, batch_size: int, max_length: int) -> tuple[list[dict], dict]:
    """The first `count` batches of `data` with their labels, and the label settings (`LabelInfo.config_kwargs`) of a
    head trained afresh on it: a backbone has no `label2id` to follow, so the classes are found as
    `run_glue_style.py` finds them in its training file (`label_info`), and the labels mapped as a model trained on
    it would have them."""
    table = load_table("data", data)
    settings = label_info(table, detect_label(table.column_names), data).config_kwargs()
    texts, labels = read_tsv(Path(data), count * batch_size)
    batches = make_batches(tokenizer, texts, batch_size, max_length)
    return with_labels(batches, model_label_ids(labels, PreTrainedConfig(**settings), data)), settings


def training_rows(backbone: str, batches: list[dict], label_settings: dict, repeats: int) -> list[dict]:
    """Step time of ADNet under each loss type as a ratio of the plain model's, same batches, timed in turns; each
    model's head made for `label_settings` (`training_batches`)."""
    models = {"plain": AutoModelForSequenceClassification.from_pretrained(backbone, **label_settings)}
    for loss_type in LOSS_TYPES:
        models[loss_type] = ADNetForSequenceClassification.from_backbone(
            backbone, **label_settings, loss_type=loss_type
        )
    runs = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        steps = [training_step(model, batch, optimizer) for batch in batches]
        runs[name] = lambda steps=steps: [step() for step in steps]
    seconds = interleaved_seconds(runs, repeats)
    rows = [
        {
            "measure": "training step",
            "setting": "plain",
            "seconds_per_step": seconds["plain"] / len(batches),
            "ratio_to_plain": 1.0,
        }
    ]
    for loss_type in LOSS_TYPES:
        rows.append(
            {
                "measure": "training step",
                "setting": f"adnet {loss_type}",
                "seconds_per_step": seconds[loss_type] / len(batches),
                "ratio_to_plain": seconds[loss_type] / seconds["plain"],
            }
        )
    return rows


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (peak memory is measured on Linux only).")


def peak_memory_child(spec: dict) -> None:
    """In a fresh process: load the model and the batches, reset the peak, run a pass; print the peak rise in MiB.

    The pass starts from a fresh allocator, so the rise counts every activation buffer the pass needs.
    """
    torch.set_num_threads(spec["threads"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    texts, _ = read_tsv(Path(spec["data"]), spec["max_samples"])
    batches = make_batches(tokenizer, texts, spec["batch_size"], spec["max_length"])
    gc.collect()
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    run_batches(model, batches, **spec["exit_setting"])
    print(json.dumps({"peak_rise_mib": (_proc_status_kib("VmHWM") - before) / 1024}))


# glibc allocator settings the memory runs are measured under (environment of the child process)
ALLOCATORS = {"glibc default": {}, "MALLOC_TRIM_THRESHOLD_=0": {"MALLOC_TRIM_THRESHOLD_": "0"}}


def peak_memory_mib(spec: dict, allocator_env: dict) -> float:
    """Run `peak_memory_child` in a fresh process, started as this one was (`-m` from the same directory)."""
    result = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **allocator_env},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rise_mib"]


def memory_rows(args: argparse.Namespace) -> list[dict]:
    """Peak inference memory of each setting, and its ratio to the ADNet checkpoint at full depth."""
    base = {
        "tokenizer": args.tokenizer or args.model,
        "data": args.data,
        "max_samples": args.max_samples,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": args.threads,
    }
    exits, exit_setting = "adnet exits (saved policy)", {}
    if args.exit_policy is not None:
        exits = f"adnet exits ({args.exit_policy}={args.exit_value})"
        exit_setting = {"exit_policy": args.exit_policy, "exit_threshold": args.exit_value}
    settings = {"adnet none (full depth)": (args.model, {"exit_policy": FULL_DEPTH}), exits: (args.model, exit_setting)}
    if args.reference:
        settings["plain reference"] = (args.reference, {})
    rows = []
    for allocator, env in ALLOCATORS.items():
        peaks = {
            name: peak_memory_mib({**base, "model": model, "exit_setting": setting}, env)
            for name, (model, setting) in settings.items()
        }
        full = peaks["adnet none (full depth)"]
        rows += [
            {
                "measure": f"inference peak memory, batch {args.batch_size}",
                "setting": name,
                "allocator": allocator,
                "peak_rise_mib": peak,
                "ratio_to_full_depth": peak / full,
            }
            for name, peak in peaks.items()
        ]
    return rows


def number(text: str) -> int | float:
    """An `--exit_value`: an integer as written (a patience), else a float (a threshold)."""
    return int(text) if text.isdigit() else float(text)


def plot(rows: list[dict]):
    training = [row for row in rows if row["measure"] == "training step"]
    memory = [row for row in rows if "memory" in row["measure"]]

    def draw(axis, index: int) -> None:
        chosen, key = (training, "ratio_to_plain") if index == 0 else (memory, "ratio_to_full_depth")
        labels = [row["setting"] + (f"\n{row['allocator']}" if "allocator" in row else "") for row in chosen]
        axis.bar(labels, [row[key] for row in chosen], label=key)
        axis.axhline(1.2 if index == 0 else 1.1, color="red", linestyle="--", label="target bound")
        axis.tick_params(axis="x", rotation=30)
        axis.set_ylabel(key)

    return lambda path: save_figure(path, 2, draw)


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "costs")
    parser.add_argument("--backbone", required=True, help="backbone checkpoint that ADNet and the plain model wrap")
    parser.add_argument("--model", required=True, help="fine-tuned ADNet checkpoint (memory is measured on it)")
    parser.add_argument("--reference", help="plain fine-tuned checkpoint of the same backbone (optional)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    parser.add_argument("--data", required=True, help="GLUE-style TSV: sentences (or pairs) and labels")
    parser.add_argument("--train_batches", type=int, default=4, help="batches timed per training repeat")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument(
        "--exit_policy",
        choices=list(EXIT_RULES),
        help="policy for the memory run with exits (default: the checkpoint's saved policy and setting)",
    )
    parser.add_argument(
        "--exit_value",
        type=number,
        help="its setting, passed per call (the policy's "
        f"{', '.join(rule.config_field for rule in EXIT_RULES.values())})",
    )
    args = parse_benchmark_args(parser, argv)
    if (args.exit_policy is None) != (args.exit_value is None):
        parser.error("--exit_policy and --exit_value go together")
    if args.exit_policy is not None and not EXIT_RULES[args.exit_policy].is_valid(args.exit_value):
        parser.error(f"--exit_value of {args.exit_policy} must be {EXIT_RULES[args.exit_policy].allowed}")

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    batches, label_settings = training_batches(
        tokenizer, args.data, args.train_batches, args.batch_size, args.max_length
    )
    rows = training_rows(args.backbone, batches, label_settings, args.repeats)
    rows += memory_rows(args)
    for row in rows:
        print(row, flush=True)
    payload = {
        "benchmark": "costs",
        "backbone": args.backbone,
        "model": args.model,
        "reference": args.reference,
        "data": args.data,
        "train_batch_size": args.batch_size,
    }
    return write_results(args.name, payload, rows, plot(rows), args.results_dir)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        peak_memory_child(json.loads(sys.argv[2]))
    else:
        print(main())
