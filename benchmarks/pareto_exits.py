"""Which exit policy needs the fewest layers at a given accuracy? A dense grid of every policy's settings on one
classifier, its accuracy against mean executed layers, and the cheapest setting of each policy within each budget.

Every setting runs once with real exits over the whole labelled set (`sweep_exits(..., return_items=True)`: exits
are per sample, so the batch size does not change them). The budget table chooses, per budget (accuracy points
below full depth on the same data) and policy, the setting with the fewest mean executed layers within the budget,
full depth when none is (`calibration_adnet.cheapest`, as `calibrate_exit` chooses). Choosing on the data that
scores the choice flatters every policy, so the held-out table chooses on a random half and scores on the other,
over `--splits` random splits (fixed `--seed`), from the same per-sample outcomes (no model rerun).

Two references answer what a reader asks of any exit rule. The static models (`--static_models`: the backbone cut to
its first k blocks by `examples/truncate_backbone.py` and fine-tuned with `--plain_baseline`, or any plain classifier)
are scored on the same data: what a smaller model gives without exits. The oracles bound every rule from below, from
each sample's predictions at every step at full depth: exiting at the first step from which the prediction never
changes again loses nothing against full depth (the floor at zero loss), exiting at the first step whose prediction
is right (the first step, if none is) is the floor at any loss.

    python -m benchmarks.pareto_exits --model outputs/mrpc-default-adnet \
        --data data/glue/MRPC/dev.tsv --name mrpc_minilm_pareto \
        --static_models outputs/mrpc-default-plain-{1,2,3,4,5}-blocks outputs/mrpc-default-plain
    python -m benchmarks.pareto_exits --model outputs/mnist-adnet --name mnist_resnet_pareto \
        --images data/mnist/t10k-images-idx3-ubyte.gz --image_labels data/mnist/t10k-labels-idx1-ubyte.gz
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from adnet_examples.arguments import num_blocks
from adnet_hf.calibration_adnet import cheapest, within_budget
from adnet_hf.exits_adnet import EXIT_RULES, FULL_DEPTH
from adnet_hf.losses_adnet import settled_steps

from .bench_classification import (
    add_input_arguments,
    input_data,
    is_regression,
    labelled_inputs,
    load_inputs,
    task_auto_class,
    with_labels,
)
from .bench_risk_control import setting_outcomes
from .common import (
    FULL_DEPTH_ROW,
    benchmark_parser,
    markdown_table,
    parse_benchmark_args,
    save_figure,
    trained_by,
    variable_step_layers,
    write_results,
)

POLICIES = ("halting", "confidence", "patience")
# Layers compared as equal when they differ by less (means over the same samples, in float64).
LAYER_TOLERANCE = 1e-9


def dense_grid(policy: str, num_variable_steps: int, size: int, num_labels: int = 2) -> list[float | int]:
    """`size` settings of `policy` spread over its range (every patience from 1 to `num_variable_steps` - 1):
    halting epsilon log-spaced from 1e-4 to 0.99 (a trained model's useful epsilons are small: most samples halt at
    the first variable step from about 0.2 on), confidence thresholds from 1 / `num_labels` (every prediction is at
    least that confident: 0.5 for two classes, 0.1 for ten) to 0.9999, denser towards 1 (1 - a log-spaced gap)."""
    if policy == "patience":
        return list(range(1, num_variable_steps))
    if policy == "halting":
        values = np.geomspace(1e-4, 0.99, size)
    elif policy == "confidence":
        values = 1 - np.geomspace(1 - 1 / num_labels, 1e-4, size)
    else:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
    return [float(f"{value:.6g}") for value in values]


def setting_points(
    settings: Sequence[tuple[str, float | int]],
    outcomes: dict[str, np.ndarray],
    num_blocks: int,
    part: np.ndarray | slice = slice(None),
) -> list[dict]:
    """Accuracy and mean executed layers on the samples `part`: full depth first, then every setting."""
    full = {
        "policy": FULL_DEPTH_ROW,
        "setting": None,
        "accuracy": float(1 - outcomes["full_errors"][part].mean()),
        "executed_layers": float(num_blocks),
    }
    return [full] + [
        {
            "policy": policy,
            "setting": value,
            "accuracy": float(1 - errors[part].mean()),
            "executed_layers": float(layers[part].mean()),
        }
        for (policy, value), errors, layers in zip(settings, outcomes["exit_errors"], outcomes["layers"])
    ]


def fewest_layers(points: list[dict], budgets: Sequence[float], num_blocks: int) -> dict[tuple[float, str], int]:
    """Per (budget, policy): the index in `points` (0, full depth, when none is cheaper and within budget) of the
    policy's setting with the fewest mean executed layers whose accuracy is at most `budget` below full depth's."""
    full = points[0]["accuracy"]
    policies = list(dict.fromkeys(point["policy"] for point in points[1:]))
    choices = {}
    for budget in budgets:
        for policy in policies:
            indices = [index for index, point in enumerate(points) if point["policy"] == policy]
            admissible = [
                within_budget(points[index]["accuracy"], full, budget, lower_is_better=False) for index in indices
            ]
            best = cheapest([points[index]["executed_layers"] for index in indices], admissible, num_blocks)
            choices[budget, policy] = 0 if best is None else indices[best]
    return choices


def mark_halting(rows: list[dict], layers: str) -> list[dict]:
    """Add to each budget's `halting` row whether its `layers` are no more than every other policy's at that budget
    (the issue's criterion)."""
    for row in rows:
        if row["policy"] == "halting":
            others = [
                other[layers]
                for other in rows
                if other["budget_pts"] == row["budget_pts"] and other["policy"] != "halting"
            ]
            if others:
                row["halting_no_more_layers"] = row[layers] <= min(others) + LAYER_TOLERANCE
    return rows


def budget_table(points: list[dict], budgets: Sequence[float], num_blocks: int) -> list[dict]:
    """One row per budget and policy: its cheapest setting within the budget (`fewest_layers`), with that setting's
    executed layers, accuracy and drop from full depth on the same data."""
    full = points[0]["accuracy"]
    rows = []
    for (budget, policy), index in fewest_layers(points, budgets, num_blocks).items():
        point = points[index]
        rows.append(
            {
                "budget_pts": 100 * budget,
                "policy": policy,
                "setting": FULL_DEPTH_ROW if index == 0 else point["setting"],
                "executed_layers": point["executed_layers"],
                "accuracy": point["accuracy"],
                "accuracy_drop_pts": 100 * (full - point["accuracy"]),
            }
        )
    return mark_halting(rows, "executed_layers")


def held_out_table(
    settings: Sequence[tuple[str, float | int]],
    outcomes: dict[str, np.ndarray],
    budgets: Sequence[float],
    num_blocks: int,
    splits: int,
    seed: int,
) -> list[dict]:
    """Per budget and policy, over `splits` random halves: the setting chosen on one half (`fewest_layers`) scored
    on the other, its mean executed layers, mean accuracy drop from full depth there, and how often the drop exceeds
    the budget."""
    rng = np.random.default_rng(seed)
    samples = len(outcomes["full_errors"])
    scores: dict[tuple[float, str], list[tuple[float, float]]] = {}
    for _ in range(splits):
        choosing, scoring = np.split(rng.permutation(samples), [samples // 2])
        choices = fewest_layers(setting_points(settings, outcomes, num_blocks, choosing), budgets, num_blocks)
        test = setting_points(settings, outcomes, num_blocks, scoring)
        for key, index in choices.items():
            scores.setdefault(key, []).append(
                (test[0]["accuracy"] - test[index]["accuracy"], test[index]["executed_layers"])
            )
    rows = []
    for (budget, policy), values in scores.items():
        drops, layers = np.array(values).T
        rows.append(
            {
                "budget_pts": 100 * budget,
                "policy": policy,
                "splits": splits,
                "mean_layers": float(layers.mean()),
                "mean_drop_pts": float(100 * drops.mean()),
                "violation_share": float((drops > budget + 1e-12).mean()),
            }
        )
    return mark_halting(rows, "mean_layers")


ORACLE_SETTLED, ORACLE_FIRST_CORRECT = "oracle: settled", "oracle: first correct"


@torch.inference_mode()
def oracle_points(model, batches: list[dict]) -> list[dict]:
    """The two oracle floors (`ORACLE_SETTLED`, `ORACLE_FIRST_CORRECT`) from every variable step's prediction at full
    depth: their accuracy and mean executed layers."""
    step_logits, labels = [], []
    for batch in batches:
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        step_logits.append(model(**inputs, exit_policy=FULL_DEPTH, output_step_logits=True).step_logits)
        labels.append(batch["labels"])
    step_logits, labels = torch.cat(step_logits, dim=1), torch.cat(labels)
    layers = torch.tensor(variable_step_layers(model.config), dtype=torch.float64)
    correct = step_logits.argmax(-1) == labels  # steps x samples
    settled = settled_steps(step_logits, "single_label_classification").double().argmax(-1)  # its first step
    first_correct = correct.double().argmax(0)  # 0 (the first step) where no step is right
    return [
        oracle_point(ORACLE_SETTLED, correct[-1], layers[settled]),
        oracle_point(ORACLE_FIRST_CORRECT, correct.any(0), layers[first_correct]),
    ]


def oracle_point(policy: str, correct: torch.Tensor, layers: torch.Tensor) -> dict:
    return {
        "policy": policy,
        "setting": None,
        "accuracy": float(correct.double().mean()),
        "executed_layers": float(layers.mean()),
    }


@torch.inference_mode()
def static_points(args, paths: Sequence[str]) -> list[dict]:
    """Each plain (static) classifier in `paths` scored on the benchmark's data: accuracy at its own depth."""
    points = []
    for path in paths:
        model = task_auto_class(args).from_pretrained(path).eval()
        batches_by_size, labels = labelled_inputs(args, model)
        logits = torch.cat([model(**batch).logits for batch in batches_by_size[args.batch_size]])
        points.append(
            {
                "policy": "static",
                "setting": path,
                "accuracy": float((logits.argmax(-1) == labels).double().mean()),
                "executed_layers": float(num_blocks(model)),
                "trained_by": trained_by(path),
            }
        )
    return sorted(points, key=lambda point: point["executed_layers"])


def static_blocks_for(accuracy: float, static: list[dict]) -> float | None:
    """The fewest blocks of a static model at least as accurate as `accuracy` (None: no static model is)."""
    return next((point["executed_layers"] for point in static if point["accuracy"] >= accuracy - 1e-12), None)


def with_references(rows: list[dict], full_accuracy: float, static: list[dict], oracle: list[dict]) -> list[dict]:
    """Each budget row with the static depth that matches its accuracy (`static_blocks`) and the zero-loss oracle's
    layers (`oracle_layers`: how far any rule could still go)."""
    settled = next(point for point in oracle if point["policy"] == ORACLE_SETTLED)
    for row in rows:
        accuracy = row.get("accuracy", full_accuracy - row.get("mean_drop_pts", 0.0) / 100)
        if static:
            row["static_blocks"] = static_blocks_for(accuracy, static)
        row["oracle_layers"] = settled["executed_layers"]
    return rows


def pareto_front(points: list[dict]) -> list[dict]:
    """The points that no other beats (as accurate with fewer layers, or more accurate with as few), by layers."""
    front, best = [], -math.inf
    for point in sorted(points, key=lambda point: (point["executed_layers"], -point["accuracy"])):
        if point["accuracy"] > best:
            front.append(point)
            best = point["accuracy"]
    return front


def plot(points: list[dict], budgets: Sequence[float], static: Sequence[dict] = (), oracle: Sequence[dict] = ()):
    """Two panels of accuracy (%) against mean executed layers, all and close to full depth: every setting a dot,
    each policy's Pareto front (full depth included) a line, the static models a black line, the oracles triangles,
    the budgets horizontal lines."""
    full = points[0]
    policies = list(dict.fromkeys(point["policy"] for point in points[1:]))

    def draw(axis, index: int) -> None:
        for number, policy in enumerate(policies):
            own = [point for point in points if point["policy"] == policy]
            color = f"C{number}"
            axis.scatter(
                [p["executed_layers"] for p in own], [100 * p["accuracy"] for p in own], s=10, color=color, alpha=0.5
            )
            front = pareto_front(own + [full])
            axis.plot(
                [p["executed_layers"] for p in front], [100 * p["accuracy"] for p in front], color=color, label=policy
            )
        axis.scatter(
            [full["executed_layers"]],
            [100 * full["accuracy"]],
            marker="*",
            s=120,
            color="black",
            label="full depth",
            zorder=3,
        )
        if static:
            axis.plot(
                [p["executed_layers"] for p in static],
                [100 * p["accuracy"] for p in static],
                color="black",
                marker="s",
                label="static (first k blocks)",
            )
        for point, marker in zip(oracle, ("^", "v")):
            axis.scatter(
                [point["executed_layers"]],
                [100 * point["accuracy"]],
                marker=marker,
                s=70,
                color="gray",
                label=point["policy"],
            )
        for budget in budgets:
            axis.axhline(100 * (full["accuracy"] - budget), color="gray", linestyle=":", linewidth=0.8)
        if index == 1:
            top = max([full["accuracy"] + max(budgets)] + [point["accuracy"] for point in oracle])
            axis.set_ylim(100 * (full["accuracy"] - 3 * max(budgets)), 100 * top + 0.5)
            axis.set_title(f"close to full depth (dotted: -{', -'.join(f'{100 * b:g}' for b in budgets)} points)")
        axis.set_xlabel("mean executed layers")
        axis.set_ylabel("accuracy (%)")

    return lambda path: save_figure(path, 2, draw)


def preamble(payload: dict, held_out: list[dict]) -> str:
    """The verdict per budget, and the held-out table; the budget table on the whole data follows."""
    verdicts = {
        row["budget_pts"]: row.get("halting_no_more_layers")
        for row in payload["budget_rows_held_out"]
        if row["policy"] == "halting"
    }
    references = [
        {
            "reference": point["policy"],
            "model": point["setting"],
            "accuracy": point["accuracy"],
            "executed_layers": point["executed_layers"],
        }
        for point in payload["oracle"] + payload["static"]
    ]
    lines = [
        f"{len(payload['points']) - 1} exit settings on {payload['model']}, {payload['samples']} samples of "
        f"{payload['data']} (full depth: {100 * payload['full_depth_accuracy']:.2f}% on {payload['num_blocks']} "
        f"layers).",
        "",
        "References: the oracle floors (`settled`: the first step from which the prediction never changes, no loss; "
        "`first correct`: the first step whose prediction is right) and the static models:",
        "",
        markdown_table(references),
        "`static_blocks`: the fewest blocks of a static model as accurate as the row's setting; `oracle_layers`: the "
        "settled oracle's mean layers.",
        "",
        f"Chosen on a random half, scored on the other ({payload['splits']} splits, seed "
        f"{payload['seed']}); `halting_no_more_layers` compares mean layers:",
        "",
        markdown_table(held_out),
        "Held-out verdict (halting needs no more mean layers): "
        + ", ".join(f"{points:g} points: {verdict}" for points, verdict in verdicts.items()),
        "",
        "Chosen and scored on the whole data:",
        "",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    parser = benchmark_parser(__doc__, "pareto_exits")
    add_input_arguments(parser)
    parser.set_defaults(reference=None, max_samples_batch1=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--grid_size", type=int, default=40, help="settings of halting and of confidence")
    for policy in POLICIES:
        parser.add_argument(
            f"--{policy}",
            type=int if policy == "patience" else float,
            nargs="+",
            help=f"{EXIT_RULES[policy].config_field} values (default: `dense_grid`)",
        )
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.0025, 0.005, 0.01],
        help="accuracy drops allowed (0.005 = 0.5 points)",
    )
    parser.add_argument(
        "--static_models",
        nargs="+",
        default=[],
        help="plain classifiers of the same task to score beside the exits (e.g. the backbone's first k blocks)",
    )
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_benchmark_args(parser, argv)
    args.batch_sizes = [args.batch_size]
    batches_by_size, labels, model, _ = load_inputs(parser, args)
    if is_regression(model):
        parser.error("a regression model has no accuracy to trade, and only `halting` exits it")
    config = model.config
    settings = [
        (policy, value)
        for policy in POLICIES
        for value in getattr(args, policy)
        or dense_grid(policy, config.num_variable_steps, args.grid_size, config.num_labels)
    ]
    batches = with_labels(batches_by_size[args.batch_size], labels)
    with torch.inference_mode():
        outcomes = setting_outcomes(model, batches, settings)
        oracle = oracle_points(model, batches)
    static = static_points(args, args.static_models)
    points = setting_points(settings, outcomes, config.num_blocks)
    full = points[0]["accuracy"]
    rows = with_references(budget_table(points, args.budgets, config.num_blocks), full, static, oracle)
    held_out = held_out_table(settings, outcomes, args.budgets, config.num_blocks, args.splits, args.seed)
    held_out = with_references(held_out, full, static, oracle)
    print(*rows, *held_out, sep="\n", flush=True)
    payload = {
        "benchmark": "pareto_exits",
        "model": args.model,
        "trained_by": trained_by(args.model),
        "data": input_data(args),
        "samples": len(labels),
        "num_blocks": config.num_blocks,
        "full_depth_accuracy": points[0]["accuracy"],
        "budgets_pts": [100 * budget for budget in args.budgets],
        "splits": args.splits,
        "seed": args.seed,
        "budget_rows_held_out": held_out,
        "oracle": oracle,
        "static": static,
        "points": points,
    }
    figure = plot(points, args.budgets, static, oracle)
    return write_results(args.name, payload, rows, figure, args.results_dir, preamble(payload, held_out))


if __name__ == "__main__":
    print(main())
