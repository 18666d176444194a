"""Does risk-controlled calibration keep its guarantee? Random calibration / test splits of a labelled dev set.

Every candidate setting of one exit policy runs once with real exits over the whole dev set
(`sweep_exits(..., return_items=True)`), which gives each sample's outcome under each setting: exits are per sample,
so a subset's outcomes are those samples' outcomes. Then, for each of `--splits` random splits (fixed `--seed`), the
calibration part chooses a setting, as `calibrate_exit` would on it, two ways:

- risk-controlled (`calibrate_exit(..., delta=...)`, `calibration_adnet.certify`): with probability >= 1 - delta over
  the calibration sample, the accuracy drop on new data is at most the budget;
- empirical (`delta=None`): the cheapest setting whose drop on the calibration part is within the budget.

and the test part (the rest of the dev set) measures the chosen setting's accuracy drop against full depth. A split
violates the budget when that drop exceeds it; the risk-controlled violation share should be at most delta. The test
part is finite, so its drop is itself an estimate of the drop on new data (it is noisier, the smaller it is).

    python -m benchmarks.bench_risk_control --model outputs/sst2-adnet \
        --data data/glue/SST-2/dev.tsv --name sst2_minilm_risk_control
"""

from __future__ import annotations

import numpy as np
import torch

from adnet_hf.calibration_adnet import certify, cheapest, within_budget
from adnet_hf.evaluation_adnet import sample_errors, sweep_exits
from adnet_hf.exits_adnet import EXIT_RULES, FULL_DEPTH

from .bench_classification import add_input_arguments, input_data, load_inputs, with_labels
from .common import benchmark_parser, parse_benchmark_args, write_results


def sample_outcomes(model, batches: list[dict], policy: str, candidates: list) -> dict[str, np.ndarray]:
    """`setting_outcomes` of every candidate of one policy."""
    return setting_outcomes(model, batches, [(policy, value) for value in candidates])


def setting_outcomes(model, batches: list[dict], settings: list[tuple[str, float | int]]) -> dict[str, np.ndarray]:
    """Per-sample errors at full depth (`full_errors`: samples) and under each `(exit_policy, exit_threshold)` setting
    (`exit_errors`: settings x samples), and each setting's executed layers per sample (`layers`), from one real pass
    per setting."""
    full, *records = sweep_exits(model, batches, [(FULL_DEPTH, None)] + list(settings), return_items=True)
    return {
        "full_errors": sample_errors(full["items"]).numpy(),
        "exit_errors": np.stack([sample_errors(record["items"]).numpy() for record in records]),
        "layers": np.stack([record["items"]["executed_layers"].double().numpy() for record in records]),
    }


def choose(
    outcomes: dict[str, np.ndarray], part: np.ndarray, budget: float, delta: float | None, num_blocks: int
) -> int | None:
    """The candidate `calibrate_exit` picks on the samples `part` (None: full depth), risk-controlled with `delta`,
    else empirically."""
    exit_errors, full_errors = outcomes["exit_errors"][:, part], outcomes["full_errors"][part]
    if delta is None:
        admissible = [
            within_budget(1 - errors.mean(), 1 - full_errors.mean(), budget, lower_is_better=False)
            for errors in exit_errors
        ]
    else:
        admissible = certify(exit_errors, full_errors, budget, delta)[1]
    return cheapest(outcomes["layers"][:, part].mean(-1), admissible, num_blocks)


def test_drop_and_layers(
    outcomes: dict[str, np.ndarray], choice: int | None, part: np.ndarray, num_blocks: int
) -> tuple[float, float]:
    """The chosen setting's accuracy drop against full depth and its mean executed layers on the samples `part`."""
    if choice is None:
        return 0.0, float(num_blocks)
    drop = outcomes["exit_errors"][choice, part].mean() - outcomes["full_errors"][part].mean()
    return float(drop), float(outcomes["layers"][choice, part].mean())


def resample(
    outcomes: dict[str, np.ndarray],
    budgets: list[float],
    deltas: list[float],
    splits: int,
    calibration_size: int,
    seed: int,
    num_blocks: int,
) -> list[dict]:
    """One row per (budget, delta): over `splits` random splits, the risk-controlled choice's violation share, test
    drop and layers, beside the empirical choice's on the same splits."""
    rng = np.random.default_rng(seed)
    samples = len(outcomes["full_errors"])
    parts = [np.split(rng.permutation(samples), [calibration_size]) for _ in range(splits)]
    rows = []
    for budget in budgets:
        empirical = np.array(
            [
                test_drop_and_layers(
                    outcomes, choose(outcomes, calibration, budget, None, num_blocks), test, num_blocks
                )
                for calibration, test in parts
            ]
        )
        for delta in deltas:
            choices = [choose(outcomes, calibration, budget, delta, num_blocks) for calibration, _ in parts]
            controlled = np.array(
                [test_drop_and_layers(outcomes, choice, test, num_blocks) for choice, (_, test) in zip(choices, parts)]
            )
            violation_share = float((controlled[:, 0] > budget).mean())
            rows.append(
                {
                    "budget_pts": 100 * budget,
                    "delta": delta,
                    "splits": splits,
                    "violation_share": violation_share,
                    "within_delta": violation_share <= delta,
                    "certified_share": float(np.mean([choice is not None for choice in choices])),
                    "mean_layers": float(controlled[:, 1].mean()),
                    "mean_test_drop_pts": float(100 * controlled[:, 0].mean()),
                    "empirical_violation_share": float((empirical[:, 0] > budget).mean()),
                    "empirical_mean_layers": float(empirical[:, 1].mean()),
                    "empirical_mean_test_drop_pts": float(100 * empirical[:, 0].mean()),
                }
            )
            print(rows[-1], flush=True)
    return rows


def smallest_certifiable_budget(calibration_size: int, delta: float) -> float:
    """The smallest budget any setting can be certified at on `calibration_size` samples, even one that loses
    nothing there: `certify`'s p-value is then `(1 - budget) ** calibration_size`, which must be <= delta."""
    return 1 - delta ** (1 / calibration_size)


def candidate_table(outcomes: dict[str, np.ndarray], candidates: list) -> list[dict]:
    """Each candidate on the whole dev set: accuracy drop, the risk-control loss rate and mean executed layers."""
    full_errors = outcomes["full_errors"]
    return [
        {
            "setting": value,
            "accuracy_drop_pts": float(100 * (errors.mean() - full_errors.mean())),
            "loss_rate": float((errors & ~full_errors).mean()),
            "executed_layers": float(layers.mean()),
        }
        for value, errors, layers in zip(candidates, outcomes["exit_errors"], outcomes["layers"])
    ]


def main(argv: list[str] | None = None):
    parser = benchmark_parser(__doc__, "risk_control")
    add_input_arguments(parser)
    parser.set_defaults(reference=None, max_samples_batch1=None)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--policy", default="halting", choices=list(EXIT_RULES))
    parser.add_argument(
        "--candidates",
        type=float,
        nargs="+",
        help="settings of --policy, most cautious first (default: the rule's calibration grid)",
    )
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.0025, 0.005, 0.01],
        help="accuracy drops allowed (0.005 = 0.5 points)",
    )
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--calibration_fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_benchmark_args(parser, argv)
    args.batch_sizes = [args.batch_size]
    batches_by_size, labels, model, _ = load_inputs(parser, args)
    rule, config = EXIT_RULES[args.policy], model.config
    candidates = (
        rule.candidates(config.num_variable_steps)
        if args.candidates is None
        else [int(value) if args.policy == "patience" else value for value in args.candidates]
    )
    with torch.inference_mode():
        outcomes = sample_outcomes(
            model, with_labels(batches_by_size[args.batch_size], labels), args.policy, candidates
        )
    samples = len(outcomes["full_errors"])
    calibration_size = round(args.calibration_fraction * samples)
    rows = resample(outcomes, args.budgets, args.deltas, args.splits, calibration_size, args.seed, config.num_blocks)
    payload = {
        "benchmark": "risk_control",
        "model": args.model,
        "data": input_data(args),
        "samples": samples,
        "splits": args.splits,
        "calibration_size": calibration_size,
        "test_size": samples - calibration_size,
        "policy": args.policy,
        "num_blocks": config.num_blocks,
        "full_depth_accuracy": float(1 - outcomes["full_errors"].mean()),
        "smallest_certifiable_budget_pts": {
            str(delta): 100 * smallest_certifiable_budget(calibration_size, delta) for delta in args.deltas
        },
        "candidates": candidate_table(outcomes, candidates),
    }
    return write_results(args.name, payload, rows, results_dir=args.results_dir, preamble=preamble(payload))


def preamble(payload: dict) -> str:
    """What the table's rows were measured on, and the smallest budget the calibration size can certify."""
    smallest = ", ".join(
        f"{float(points):.2f} points at delta {delta}"
        for delta, points in payload["smallest_certifiable_budget_pts"].items()
    )
    return (
        f"`{payload['policy']}` on {payload['model']}, {payload['samples']} samples of {payload['data']} (full "
        f"depth: {100 * payload['full_depth_accuracy']:.2f}%), split {payload['splits']} times into "
        f"{payload['calibration_size']} to calibrate on and {payload['test_size']} to test. On "
        f"{payload['calibration_size']} samples no setting can be certified below {smallest}.\n\n"
    )


if __name__ == "__main__":
    print(main())
