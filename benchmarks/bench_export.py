"""Exits deployed with ONNX Runtime: the exported-steps runner (`adnet_hf.export_adnet`) against eager ADNet with the
same exits and eager full depth, on the same weights in this process.

The model is exported step by step once (`export_steps`, into `--export_dir`), then at each batch size the arms are
timed in turns (`interleaved_seconds`: repeats, medians) over the same batches: eager at full depth (the
reference), eager with each exit setting, the runner with each exit setting, and the runner at full depth. Agreement
of the runner with eager (predictions, exit steps, largest logit difference) and accuracy are taken on every sample
at the largest batch size.

    python -m benchmarks.bench_export --model outputs/sst2-adnet --data data/glue/SST-2/dev.tsv \
        --name sst2_minilm_export --settings confidence=0.9 patience=1 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from adnet_hf.exits_adnet import EXIT_RULES, FULL_DEPTH
from adnet_hf.export_adnet import ADNetStepRunner, export_steps

from .bench_classification import add_input_arguments, input_data, load_inputs
from .common import (
    benchmark_parser,
    environment,
    interleaved_seconds,
    markdown_table,
    parse_benchmark_args,
    run_batches,
    write_results,
)

EAGER, RUNNER = "eager", "ONNX Runtime runner"


def exit_setting(text: str) -> tuple[str, float | int]:
    """`policy=threshold` (e.g. `confidence=0.9`, `patience=1`) as the policy and its setting."""
    policy, _, value = text.partition("=")
    if policy not in EXIT_RULES or not value:
        raise argparse.ArgumentTypeError(
            f"an exit setting is POLICY=VALUE with POLICY in {list(EXIT_RULES)}, got {text!r}"
        )
    number = float(value)
    return policy, int(number) if number.is_integer() and EXIT_RULES[policy].is_valid(int(number)) else number


def as_arrays(batches: list[dict]) -> list[dict[str, np.ndarray]]:
    return [{name: value.numpy() for name, value in batch.items()} for batch in batches]


def run_runner(runner: ADNetStepRunner, batches: list[dict[str, np.ndarray]], **setting) -> None:
    for batch in batches:
        runner(**batch, **setting)


@torch.inference_mode()
def agreement(
    model, runner: ADNetStepRunner, batches: list[dict], labels: torch.Tensor, policy: str, threshold
) -> dict:
    """The runner against eager on every sample: accuracy of each, equal predictions and exit steps, largest logit
    difference, mean executed layers."""
    eager = [model(**batch, exit_policy=policy, exit_threshold=threshold) for batch in batches]
    ours = [runner(**batch, exit_policy=policy, exit_threshold=threshold) for batch in as_arrays(batches)]
    eager_logits = torch.cat([out.logits for out in eager]).numpy()
    runner_logits = np.concatenate([out.logits for out in ours])
    eager_steps = torch.cat([out.exit_steps for out in eager]).numpy()
    runner_steps = np.concatenate([out.exit_steps for out in ours])
    truth = labels.numpy()
    return {
        "eager_accuracy": float((eager_logits.argmax(-1) == truth).mean()),
        "runner_accuracy": float((runner_logits.argmax(-1) == truth).mean()),
        "same_prediction": float((eager_logits.argmax(-1) == runner_logits.argmax(-1)).mean()),
        "same_exit_step": float((eager_steps == runner_steps).mean()),
        "max_logit_difference": float(np.abs(eager_logits - runner_logits).max()),
        "executed_layers": float(runner_steps.mean() * model.config.layers_per_step),
    }


def timing_rows(
    model, runner: ADNetStepRunner, batches: list[dict], settings: list[tuple], repeats: int, batch_size: int
) -> list[dict]:
    """Median seconds of every arm over `batches`, timed in turns, and its speed-up over eager full depth."""
    arrays = as_arrays(batches)
    arms = {(EAGER, FULL_DEPTH, None): lambda: run_batches(model, batches, exit_policy=FULL_DEPTH)}
    for policy, threshold in settings:
        setting = {"exit_policy": policy, "exit_threshold": threshold}
        arms[(EAGER, policy, threshold)] = lambda setting=setting: run_batches(model, batches, **setting)
        arms[(RUNNER, policy, threshold)] = lambda setting=setting: run_runner(runner, arrays, **setting)
    arms[(RUNNER, FULL_DEPTH, None)] = lambda: run_runner(runner, arrays, exit_policy=FULL_DEPTH)
    seconds = interleaved_seconds(arms, repeats)
    reference = seconds[(EAGER, FULL_DEPTH, None)]
    samples = sum(len(next(iter(batch.values()))) for batch in batches)
    return [
        {
            "batch_size": batch_size,
            "arm": arm,
            "policy": policy,
            "setting": threshold,
            "samples": samples,
            "seconds": seconds[(arm, policy, threshold)],
            "speedup_vs_eager_full_depth": reference / seconds[(arm, policy, threshold)],
        }
        for arm, policy, threshold in arms
    ]


def main(argv: list[str] | None = None) -> Path:
    import onnxruntime

    parser = benchmark_parser(__doc__, "export")
    add_input_arguments(parser)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--max_samples_batch1",
        type=int,
        default=200,
        help="samples timed at batch 1 (agreement always uses all samples)",
    )
    parser.add_argument(
        "--settings",
        type=exit_setting,
        nargs="+",
        default=[("confidence", 0.9)],
        help="exit settings as POLICY=VALUE, e.g. confidence=0.9 patience=1 halting=0.1",
    )
    parser.add_argument("--export_dir", type=Path, help="where the ONNX steps go (default: a temporary folder)")
    args = parse_benchmark_args(parser, argv)
    args.reference = None
    batches_by_size, labels, model, _ = load_inputs(parser, args)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    largest = batches_by_size[max(args.batch_sizes)]
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.export_dir or Path(scratch)
        export_steps(model, directory, largest[0])
        runner = ADNetStepRunner(directory, session_options=options)
        quality = [
            {"policy": policy, "setting": threshold, **agreement(model, runner, largest, labels, policy, threshold)}
            for policy, threshold in [(FULL_DEPTH, None), *args.settings]
        ]
        rows = [
            row
            for size in args.batch_sizes
            for row in timing_rows(model, runner, batches_by_size[size], args.settings, args.repeats, size)
        ]
    payload = {
        "model": args.model,
        "data": input_data(args),
        "repeats": args.repeats,
        "onnxruntime": onnxruntime.__version__,
        "agreement": quality,
    }
    path = write_results(args.name, payload, rows, results_dir=args.results_dir)
    table = path.with_suffix(".md")
    table.write_text(
        table.read_text()
        + f"\nAgreement with eager, every sample at batch {max(args.batch_sizes)}:\n\n"
        + markdown_table(quality, environment()["command"])
    )
    return path


if __name__ == "__main__":
    main()
