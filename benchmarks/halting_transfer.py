"""Do halting units fitted on held-out training data carry over to the evaluation data?

Takes the training rows that `--fit_split` held out of a model's training (drawn with `--split_seed` after
`--calibration_split`'s rows, as `run_glue_style.py --fit_halting_split` draws them), splits them into two random
halves, fits the halting units (`fit_halting`) on one half and sweeps `halting` and `confidence` with real exits on
the other half (the fit's own distribution) and on `--data`; then the same with the halves swapped. Per fold, data and
budget it gives each policy's fewest mean layers within the budget (`pareto_exits.budget_table`, chosen and scored on
the same data). Where `halting` needs fewer layers than `confidence` on the other half but not on `--data`, what the
units learned does not carry over from the training data to the evaluation data.

    python -m benchmarks.halting_transfer --model outputs/sst2-f0-evidence \
        --fit_data data/glue/SST-2/train.tsv --fit_split 0.05 \
        --data data/glue/SST-2/dev.tsv --max_length 64 --grid_size 64 --name sst2_minilm_first_layer_transfer
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adnet_examples.arguments import CalibrationArguments, HaltingFitArguments
from adnet_examples.data import make_batches, model_label_ids, read_tsv
from adnet_hf.halting_adnet import fit_halting

from .bench_classification import with_labels
from .bench_risk_control import setting_outcomes
from .common import benchmark_parser, parse_benchmark_args, write_results
from .pareto_exits import budget_table, dense_grid, setting_points

POLICIES = ("halting", "confidence")


def held_out_halves(
    count: int, fraction: float, split_seed: int, seed: int, calibration_fraction: float | None = None
) -> list[np.ndarray]:
    """The indices of the `fraction` of `count` training rows that training held out to fit the halting units on,
    in two random halves drawn with `seed`: split as `run_glue_style.py` splits them, calibration rows first."""
    rows = datasets.Dataset.from_dict({"row": range(count)})
    rows = CalibrationArguments(calibration_split=calibration_fraction).split(rows, split_seed)[0]
    rows = HaltingFitArguments(fit_halting_split=fraction).split(rows, split_seed)[1]["row"]
    return np.split(np.random.default_rng(seed).permutation(rows), [len(rows) // 2])


def labelled_batches(
    tokenizer, texts, labels: torch.Tensor, rows: np.ndarray | None, batch_size: int, max_length: int
) -> list[dict]:
    """Tokenised batches, with labels, of the `rows` of a TSV's `texts` and `labels` (all of them for None)."""
    if rows is not None:
        texts = tuple(None if column is None else [column[row] for row in rows] for column in texts)
        labels = labels[rows]
    return with_labels(make_batches(tokenizer, texts, batch_size, max_length), labels)


def read_labelled(path: str, config) -> tuple[tuple, torch.Tensor]:
    """A labelled classification TSV's texts, and its labels as the ids of the model with `config`."""
    texts, labels = read_tsv(Path(path))
    return texts, model_label_ids(labels, config, path)


def joined(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outcomes of two setting lists on the same samples, as those of the first list followed by the second."""
    return {
        "full_errors": first["full_errors"],
        **{key: np.concatenate([first[key], second[key]]) for key in ("exit_errors", "layers")},
    }


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "halting_transfer")
    parser.add_argument("--model", required=True, help="ADNet classifier trained with --fit_halting_split")
    parser.add_argument("--fit_data", required=True, help="the GLUE-style TSV the model was trained on")
    parser.add_argument("--fit_split", type=float, required=True, help="the --fit_halting_split it was trained with")
    parser.add_argument("--calibration_split", type=float, help="the --calibration_split it was trained with")
    parser.add_argument("--split_seed", type=int, default=42, help="the --seed it was trained with")
    parser.add_argument("--data", required=True, help="the labelled evaluation TSV")
    parser.add_argument("--seed", type=int, default=0, help="draws the two halves")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--grid_size", type=int, default=40, help="settings of halting and of confidence")
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.0025, 0.005, 0.01],
        help="accuracy drops allowed (0.005 = 0.5 points)",
    )
    args = parse_benchmark_args(parser, argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    config = model.config
    settings = {
        policy: [
            (policy, value)
            for value in dense_grid(policy, config.num_variable_steps, args.grid_size, config.num_labels)
        ]
        for policy in POLICIES
    }
    texts, labels = read_labelled(args.fit_data, config)
    halves = held_out_halves(len(labels), args.fit_split, args.split_seed, args.seed, args.calibration_split)
    parts = {
        f"half {index}": labelled_batches(tokenizer, texts, labels, half, args.batch_size, args.max_length)
        for index, half in enumerate(halves)
    }
    evaluation = read_labelled(args.data, config)
    parts["evaluation"] = labelled_batches(tokenizer, *evaluation, None, args.batch_size, args.max_length)
    every = settings["halting"] + settings["confidence"]
    confidence = {data: setting_outcomes(model, part, settings["confidence"]) for data, part in parts.items()}
    rows = []
    for fitting, scoring in (("half 0", "half 1"), ("half 1", "half 0")):
        fit_halting(model, parts[fitting])  # in place; the step predictions it reads do not change
        for data in (scoring, "evaluation"):
            outcomes = joined(setting_outcomes(model, parts[data], settings["halting"]), confidence[data])
            points = setting_points(every, outcomes, config.num_blocks)
            fold_rows = [
                {"fitted_on": fitting, "scored_on": data, **row}
                for row in budget_table(points, args.budgets, config.num_blocks)
            ]
            print(*fold_rows, sep="\n", flush=True)
            rows += fold_rows
    payload = {
        "benchmark": "halting_transfer",
        "model": args.model,
        "fit_data": args.fit_data,
        "data": args.data,
        "halves": [len(half) for half in halves],
        "num_blocks": config.num_blocks,
        "rows": rows,
    }
    return write_results(args.name, payload, rows, results_dir=args.results_dir)


if __name__ == "__main__":
    print(main())
