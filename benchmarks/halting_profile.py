"""What the learned halting units do: how much their halting distribution varies across inputs, and who exits where.

For each variable step: the mean and the standard deviation across inputs of its halting probability `p_n` (at
full depth), and for each `--halting` epsilon (passed per call) the share of inputs that exit after it and their
accuracy (Pearson's correlation for regression), from `adnet_hf.evaluation_adnet`: units that tell inputs apart
send the hard ones deeper. No timing, so it runs beside anything.

    python -m benchmarks.halting_profile --model outputs/mnist-adnet --name mnist_resnet_halting \
        --images data/mnist/t10k-images-idx3-ubyte.gz \
        --image_labels data/mnist/t10k-labels-idx1-ubyte.gz
"""

from __future__ import annotations

from pathlib import Path

import torch

from adnet_hf.evaluation_adnet import evaluation_metrics, pooled_items, quality_metric
from adnet_hf.exits_adnet import EXIT_RULES, FULL_DEPTH

from .bench_classification import add_input_arguments, input_data, load_inputs, with_labels
from .common import benchmark_parser, parse_benchmark_args, save_figure, variable_step_layers, write_results


@torch.inference_mode()
def halting_probs(model, batches: list[dict]) -> torch.Tensor:
    """Inputs x variable steps: the halting distribution of every input at full depth."""
    return torch.cat(
        [model(**batch, exit_policy=FULL_DEPTH, output_step_logits=True).halting_probs for batch in batches]
    )


def subset_quality(items: dict[str, torch.Tensor], keep: torch.Tensor, metric: str) -> float | None:
    """`metric` of the items where `keep` is true; None for too few to score (a correlation needs two)."""
    if keep.sum() < (2 if metric == "pearson" else 1):
        return None
    return evaluation_metrics({name: values[keep] for name, values in items.items()})[metric]


def profile(model, batches: list[dict], labels: torch.Tensor, epsilons: list[float]) -> list[dict]:
    """One row per variable step: its halting probability across inputs, and who exits there under each epsilon."""
    probs = halting_probs(model, batches)
    rows = [
        {
            "executed_layers": layers,
            "halting_prob_mean": probs[:, n].mean().item(),
            "halting_prob_std": probs[:, n].std().item(),
        }
        for n, layers in enumerate(variable_step_layers(model.config))
    ]
    for epsilon in epsilons:
        items = pooled_items(model, with_labels(batches, labels), "halting", epsilon)
        metric = quality_metric(evaluation_metrics(items))
        for row in rows:
            exits = items["executed_layers"] == row["executed_layers"]
            row[f"exit_share_eps{epsilon:g}"] = exits.float().mean().item()
            row[f"exit_{metric}_eps{epsilon:g}"] = subset_quality(items, exits, metric)
    return rows


def plot(rows: list[dict]):
    def draw(axis, index: int) -> None:
        layers = [row["executed_layers"] for row in rows]
        axis.bar(
            layers,
            [row["halting_prob_mean"] for row in rows],
            yerr=[row["halting_prob_std"] for row in rows],
            capsize=4,
            label="halting probability: mean, std across inputs",
        )
        axis.set_xlabel("layers executed at the step")
        axis.set_ylabel("p_n")

    return lambda path: save_figure(path, 1, draw)


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "halting_profile")
    add_input_arguments(parser)
    parser.add_argument(
        "--halting", type=float, nargs="+", default=[0.3, 0.5, 0.7], help=f"{EXIT_RULES['halting'].config_field} values"
    )
    args = parse_benchmark_args(parser, argv)
    args.batch_sizes, args.max_samples_batch1, args.reference = [32], None, None  # one batch size, no reference
    batches_by_size, labels, model, _ = load_inputs(parser, args)
    rows = profile(model, batches_by_size[32], labels, args.halting)
    payload = {
        "benchmark": "halting_profile",
        "model": args.model,
        "data": input_data(args),
        "samples": len(labels),
        "num_blocks": model.config.num_blocks,
    }
    return write_results(args.name, payload, rows, plot(rows), args.results_dir)


if __name__ == "__main__":
    print(main())
