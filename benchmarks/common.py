"""What every benchmark shares: timing against full depth in the same process, and writing results.

Each benchmark writes `<name>.json` (numbers, machine, versions, command), `<name>.md` (a table) and `<name>.png`
(quality against measured speed-up) under `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adnet_examples.arguments import command_line
from adnet_hf.exits_adnet import FULL_DEPTH

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_DEPTH_ROW = "none (full depth)"  # the `policy` of a results table's full-depth row


def row_policy(policy: str) -> str:
    """A row's `policy`: the exit policy of a `sweep_exits` record, `FULL_DEPTH_ROW` for the full-depth pass."""
    return FULL_DEPTH_ROW if policy == FULL_DEPTH else policy


def benchmark_parser(description: str, name: str) -> argparse.ArgumentParser:
    """A parser with what every benchmark takes: `--name` of its results, `--repeats`, `--threads`, `--results_dir`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=name, help="results file name under --results_dir")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each setting (median taken)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def environment() -> dict:
    """Machine and versions, so a result says where it was measured."""
    import transformers

    return {
        "command": command_line(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def trained_by(folder: str) -> str | None:
    """The command that trained the checkpoint in `folder`, as the example scripts record it in `all_results.json`."""
    results = Path(folder) / "all_results.json"
    return json.loads(results.read_text()).get("command") if results.exists() else None


def variable_step_layers(config) -> list[int]:
    """The backbone layers run when each variable step (each exit point) of an ADNet model is reached."""
    return [(config.num_fixed_steps + n + 1) * config.layers_per_step for n in range(config.num_variable_steps)]


@torch.inference_mode()
def run_batches(model, batches: list[dict], **exit_setting) -> None:
    """A pass of `model` over `batches`: what is timed, or measured for memory. `exit_setting` (`exit_policy`,
    `exit_threshold`) is passed to every call; a plain model takes none."""
    for batch in batches:
        model(**batch, **exit_setting)


def interleaved_seconds(runs: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds of each callable, timed in turns so that drifts in machine load hit all alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def write_results(
    name: str,
    payload: dict,
    table: list[dict],
    plot: Callable[[Path], None] | None = None,
    results_dir: Path = RESULTS_DIR,
    preamble: str = "",
) -> Path:
    """Write `<name>.json`, `<name>.md` (`preamble`, then the table) and, with `plot`, `<name>.png`; return the JSON
    path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload, "rows": table}
    json_path = results_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (results_dir / f"{name}.md").write_text(preamble + markdown_table(table, payload["environment"]["command"]))
    if plot is not None:
        plot(results_dir / f"{name}.png")
    return json_path


def save_figure(path: Path, panels: int, draw: Callable[[object, int], None]) -> None:
    """A figure of `panels` side-by-side axes, `draw(axis, index)` filling each, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    for index, axis in enumerate(axes[0]):
        draw(axis, index)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_table(rows: list[dict], command: str | None = None) -> str:
    """`rows` as a markdown table, followed by the `command` that measured them when given."""
    footer = "" if command is None else f"\nCommand: `{command}`\n"
    if not rows:
        return f"No rows.\n{footer}"
    columns = list(dict.fromkeys(column for row in rows for column in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n" + footer


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
