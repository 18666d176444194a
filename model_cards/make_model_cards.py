"""Render each model card in `model_cards/` from its `card.yaml` and the results JSON that file names.

A `card.yaml` says what its card is about, in words: the title, task, dataset and base model; the benchmark whose
rows it shows (`rows`: the policies, in order); optionally the training runs to set against the plain model, the
benchmark of each exit point, the calibration that chose the saved exit setting (`calibration`: its guarantee), a
risk-control benchmark (`risk_control`) and a self-speculative generation benchmark (`speculative`); its limits; and
the results files whose commands made the model. Every number and command in the card is read from those results
(`benchmarks/results/`, `examples/results/`); `template.md` lays it out, and `huggingface_hub.ModelCard` writes the
metadata (a `model-index` with the measured results).

    python -m model_cards.make_model_cards                         # every card
    python -m model_cards.make_model_cards adnet-minilm-l6-sst2    # the cards named
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from adnet_examples.arguments import TASK_MODELS
from benchmarks.common import save_figure

CARDS_DIR = Path(__file__).resolve().parent
ROOT = CARDS_DIR.parent  # results paths in a card.yaml are relative to the repository root


@dataclass(frozen=True)
class Measure:
    """How a benchmark kind states quality: its row keys, the loss a cheaper setting may have, and the format."""

    metric: str  # row key, model-index metric type, and `eval_{metric}` in a training run's results
    loss_key: str  # quality lost against full depth
    budget: float
    budget_unit: str
    batch_sizes: tuple[int, int]
    percent: bool
    decimals: int = 1  # of a value that is not a percentage

    def show(self, value: float) -> str:
        return f"{100 * value:.2f}%" if self.percent else f"{value:.{self.decimals}f}"

    def difference(self, value: float, reference: float) -> str:
        """`value - reference` as the two are shown, so that the three numbers of a table row agree."""
        if self.percent:
            return f"{round(100 * value, 2) - round(100 * reference, 2):+.2f} points"
        return f"{round(value, self.decimals) - round(reference, self.decimals):+.{self.decimals}f}"


MEASURES = {
    "classification": Measure("accuracy", "accuracy_drop_pts", 0.5, " points", (1, 32), True),
    "regression": Measure("pearson", "pearson_drop_pts", 0.5, " points (0.005 of Pearson's r)", (1, 32), False, 4),
    "generation": Measure("perplexity", "ppl_increase_pct", 3.0, "%", (1, 8), False),
}


@dataclass
class CardSpec:
    """A `card.yaml`: what one card says, and which results it reads (paths relative to the repository root)."""

    title: str
    pipeline_tag: str
    dataset: dict  # EvalResult's dataset_type / dataset_name / dataset_config / dataset_split
    benchmark: str
    rows: list[str]  # the benchmark rows to show, by policy, in this order
    commands: list[str]  # results files whose commands made the model, in the order they ran
    base_model: str | None = None
    limits: list[str] = field(default_factory=list)
    # Full-depth quality of this model's training run beside the plain run's: `run` (a label), `adnet`, `plain`.
    plain_comparison: list[dict] = field(default_factory=list)
    steps: str | None = None  # a step_perplexity benchmark of the model
    calibration: str | None = None  # the `calibration_results.json` of the run that chose the saved exit setting
    risk_control: str | None = None  # a bench_risk_control benchmark of the model
    speculative: str | None = None  # a bench_speculative benchmark of the model (self-speculative generation)

    @classmethod
    def from_yaml(cls, path: Path) -> CardSpec:
        return cls(**yaml.safe_load(path.read_text(encoding="utf-8")))


def read(root: Path, path: str) -> dict:
    """A results file, `path` relative to `root`."""
    return json.loads((root / path).read_text())


def command(results: dict) -> str:
    """The command recorded in a results file: a training run's own, or a benchmark's environment's."""
    return results["command"] if "command" in results else results["environment"]["command"]


def results_table(rows: list[dict], measure: Measure) -> str:
    sizes = measure.batch_sizes
    lines = [
        f"| policy | setting | {measure.metric} | mean layers | ideal speed-up | measured speed-up, batch "
        f"{sizes[0]} | measured speed-up, batch {sizes[1]} |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speed = [f"{row[f'speedup_b{size}']:.2f}x" if row.get(f"speedup_b{size}") is not None else "" for size in sizes]
        setting = "" if row.get("setting") is None else row["setting"]
        lines.append(
            f"| {row['policy']} | {setting} | {measure.show(row[measure.metric])} | "
            f"{row['executed_layers']:.2f} | {row['ideal_speedup']:.2f}x | {speed[0]} | {speed[1]} |"
        )
    return "\n".join(lines)


def plain_table(comparison: list[dict], measure: Measure, root: Path) -> str:
    """This model's training runs against the plain ones, at full depth, with the files the numbers come from."""
    key = f"eval_{measure.metric}"
    lines = ["| run | ADNet | plain | difference | from |", "|---|---|---|---|---|"]
    for pair in comparison:
        adnet, plain = (read(root, pair[side])[key] for side in ("adnet", "plain"))
        lines.append(
            f"| {pair['run']} | {measure.show(adnet)} | {measure.show(plain)} | "
            f"{measure.difference(adnet, plain)} | `{pair['adnet']}`, `{pair['plain']}` |"
        )
    return "\n".join(lines)


def steps_table(steps: dict) -> str:
    lines = ["| exit after layers | perplexity | ratio to the last exit |", "|---|---|---|"]
    lines += [
        f"| {row['executed_layers']} | {row['perplexity']:.4g} | {row['ratio_to_last_step']:.4g} |"
        for row in steps["rows"]
    ]
    return "\n".join(lines)


def guarantee_text(calibration: dict) -> str:
    """What the saved exit setting promises: its risk-control guarantee, or that it was chosen empirically."""
    guarantee, samples = calibration["guarantee"], calibration["calibration_samples"]
    chosen = f"`{calibration['policy']}={calibration['value']}`"
    if guarantee is None:
        return (
            f"The saved exit setting, {chosen}, was chosen empirically on {samples} samples held out of "
            f"training: the cheapest setting within the budget there, with no guarantee on new data."
        )
    points, confidence = 100 * guarantee["budget"], f"{100 * (1 - guarantee['delta']):g}%"
    budget = f"{points:g} point{'' if points == 1 else 's'}"
    if guarantee["policy"] == "none":
        return (
            f"No setting could be certified to lose at most {budget} of {guarantee['metric']} with probability "
            f"{confidence} on the {samples} calibration samples held out of training, so the model is saved to "
            "run at full depth."
        )
    return (
        f"The saved exit setting, {chosen}, is risk-controlled: with probability at least {confidence} over the "
        f"{samples} calibration samples it was chosen on (held out of training), its {guarantee['metric']} on "
        f"new data from the same distribution is at most {budget} below full depth. Method: "
        f"{guarantee['method']}. It is stored in the config as `exit_guarantee`, and holds for that setting only."
    )


def risk_control_table(bench: dict) -> str:
    """Per budget and delta, how often the risk-controlled choice broke its budget on the test part, and at what
    cost in layers, beside the empirical choice's."""
    lines = [
        "| budget | delta | violation share | mean layers | empirical choice: violation share | mean layers |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['budget_pts']:g} points | {row['delta']:g} | {row['violation_share']:.1%} | "
        f"{row['mean_layers']:.2f} | {row['empirical_violation_share']:.1%} | "
        f"{row['empirical_mean_layers']:.2f} |"
        for row in bench["rows"]
    ]
    return "\n".join(lines)


def speculative_table(bench: dict) -> str:
    """Each draft setting of self-speculative greedy decoding against the backbone's own `generate()`."""
    lines = [
        "| draft depth | draft length | confidence threshold | draft vocabulary | accepted | tokens per "
        "verification | tokens/s | backbone tokens/s | speed-up | output identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['assistant_early_exit']} | {row['num_assistant_tokens']} | "
        f"{row['assistant_confidence_threshold']:g} | {row['draft_vocab_size'] or 'full'} | "
        f"{row['acceptance_rate']:.1%} | {row['tokens_per_verification']:.2f} | {row['tokens_per_s']:.1f} | "
        f"{row['backbone_tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
        f"{'yes' if row['identical_outputs'] else 'no'} |"
        for row in bench["rows"]
    ]
    return "\n".join(lines)


def cheapest_within(rows: list[dict], measure: Measure) -> dict | None:
    """The benchmarked setting with the fewest executed layers that loses at most the budget to full depth."""
    admissible = [
        row
        for row in rows
        if row.get(measure.loss_key) is not None
        and row.get("setting") is not None
        and row[measure.loss_key] <= measure.budget
    ]
    return min(admissible, key=lambda row: row["executed_layers"], default=None)


def headline(spec: CardSpec, bench: dict, full: dict, best: dict | None, measure: Measure) -> str:
    """Full-depth quality and, where a setting stays within the budget, the cheapest such one and its speed-up."""
    metric = measure.metric
    text = (
        f"At full depth it reaches **{measure.show(full[metric])}** {metric} on the "
        f"{spec.dataset['dataset_name']} {spec.dataset['dataset_split']} split."
    )
    if best is None:
        return text
    speed = ", ".join(
        f"{best[f'speedup_b{size}']:.2f}x at batch {size}"
        for size in measure.batch_sizes
        if best.get(f"speedup_b{size}") is not None
    )
    unit = "token" if metric == "perplexity" else "input"
    return (
        f"{text} The cheapest measured setting within {measure.budget:g}{measure.budget_unit} of it, "
        f"`{setting_name(best)}`, reaches **{measure.show(best[metric])}** running "
        f"**{best['executed_layers']:.2f}** of {bench['num_blocks']} layers per {unit} on average; measured "
        f"speed-up over full depth: {speed}."
    )


def setting_name(row: dict) -> str:
    return f"{row['policy']}={row['setting']}"


def eval_results(spec: CardSpec, full: dict, best: dict | None, measure: Measure) -> list[EvalResult]:
    """The model-index: quality at full depth, and at the cheapest setting within budget with its executed layers."""
    task, metric = {"task_type": spec.pipeline_tag, **spec.dataset}, measure.metric
    results = [
        EvalResult(
            **task, metric_type=metric, metric_name=f"{metric} at full depth", metric_value=round(full[metric], 4)
        )
    ]
    if best is not None:
        name = setting_name(best)
        results += [
            EvalResult(
                **task,
                metric_type=metric,
                metric_name=f"{metric} with exits ({name})",
                metric_value=round(best[metric], 4),
            ),
            EvalResult(
                **task,
                metric_type="executed_layers",
                metric_name=f"mean executed layers ({name})",
                metric_value=round(best["executed_layers"], 3),
            ),
        ]
    return results


def render(spec: CardSpec, name: str, root: Path = ROOT) -> tuple[ModelCard, list[dict], Measure]:
    """The card `name` of `spec`; the benchmark rows it shows and how they measure quality."""
    bench = read(root, spec.benchmark)
    steps = spec.steps and read(root, spec.steps)
    risk_control = spec.risk_control and read(root, spec.risk_control)
    speculative = spec.speculative and read(root, spec.speculative)
    measure = MEASURES[bench["benchmark"]]
    rows = [row for policy in spec.rows for row in bench["rows"] if row["policy"] == policy]
    full = next(row for row in rows if row["policy"] == "none (full depth)")
    best = cheapest_within(rows, measure)
    data = ModelCardData(
        language="en" if spec.pipeline_tag.startswith("text") else None,
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag=spec.pipeline_tag,
        base_model=spec.base_model,
        model_name=name,
        tags=["adnet", "early-exit", "adaptive-computation"],
        eval_results=eval_results(spec, full, best, measure),
    )
    card = ModelCard.from_template(
        data,
        template_path=CARDS_DIR / "template.md",
        title=spec.title,
        environment=bench["environment"],
        headline=headline(spec, bench, full, best, measure),
        results_table=results_table(rows, measure),
        metric=measure.metric,
        auto_class=TASK_MODELS[spec.pipeline_tag][1].__name__,
        limits=spec.limits,
        plain_table=spec.plain_comparison and plain_table(spec.plain_comparison, measure, root),
        steps=steps,
        steps_table=steps and steps_table(steps),
        blocks=bench.get("blocks"),
        block_size=bench.get("block_size"),
        dataset_split=spec.dataset["dataset_split"],
        guarantee=spec.calibration and guarantee_text(read(root, spec.calibration)),
        risk_control=risk_control,
        risk_control_table=risk_control and risk_control_table(risk_control),
        speculative=speculative,
        speculative_table=speculative and speculative_table(speculative),
        commands=[command(read(root, path)) for path in spec.commands],
    )
    return card, rows, measure


def plot(rows: list[dict], measure: Measure, path: Path) -> None:
    scale = 100 if measure.percent else 1

    def draw(axis, index: int) -> None:
        for policy in dict.fromkeys(r["policy"] for r in rows if r.get("setting") is not None):
            points = sorted((r["executed_layers"], scale * r[measure.metric]) for r in rows if r["policy"] == policy)
            axis.plot(*zip(*points), marker="o", label=policy)
        for row in rows:
            if row.get("setting") is None:
                axis.scatter(
                    [row["executed_layers"]], [scale * row[measure.metric]], marker="*", s=120, label=row["policy"]
                )
        axis.set_xlabel("mean executed layers")
        axis.set_ylabel(f"{measure.metric} (%)" if measure.percent else measure.metric)

    save_figure(path, 1, draw)


def main(names: list[str], cards_dir: Path = CARDS_DIR, root: Path = ROOT) -> None:
    """Write `README.md` and the plot of each card named (default: every folder with a `card.yaml`)."""
    for name in names or sorted(path.parent.name for path in cards_dir.glob("*/card.yaml")):
        folder = cards_dir / name
        card, rows, measure = render(CardSpec.from_yaml(folder / "card.yaml"), name, root)
        card.save(folder / "README.md")
        plot(rows, measure, folder / f"{measure.metric}_vs_layers.png")
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
