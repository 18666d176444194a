"""Pick the exit threshold (or patience) with the largest saving whose quality loss stays within a budget.

Every candidate is measured with real exits on the held-out data (a causal LM's exited tokens change what later
tokens see, so exits cannot be replayed from one full-depth pass), against the same model at full depth, by
`evaluation_adnet.sweep_exits`: the candidates are passed per call, and only the choice is written into the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .evaluation_adnet import evaluate_batches, sweep_exits
from .exits_adnet import is_number, require, task_exit_rule

# What an exit setting is judged by, for each kind of task, and whether lower is better: a causal LM's perplexity;
# a regressor's mean squared error (Pearson's r ignores the scale and offset of the predictions, so an exit that
# shrinks them keeps it, and is near 0 for a weak model, which would let every exit pass); a multi-label
# classifier's micro-F1 over every label (subset accuracy is near 0 with many labels); otherwise accuracy.
CALIBRATION_METRICS = {"perplexity": True, "mse": True, "micro_f1": False, "accuracy": False}


def calibration_metric(metrics: dict[str, float]) -> str:
    """The name of the metric in `metrics` that `calibrate_exit` judges exits by."""
    return next(name for name in CALIBRATION_METRICS if name in metrics)


@dataclass
class CalibrationResult:
    """What `calibrate_exit` measured. `quality` is the `metric` exits are judged by (`CALIBRATION_METRICS`):
    accuracy (single-label), micro-F1 (multi-label), mean squared error (regression) or perplexity (causal LMs);
    `executed_layers` is the mean per sample (per predicted token)."""

    policy: str
    value: float | int | None
    metric: str
    quality: float
    full_depth_quality: float
    executed_layers: float
    num_blocks: int
    candidates: list[dict] = field(default_factory=list)


def evaluate_exits(model, batches: Iterable[dict], policy: str, exit_threshold: float | int | None = None
                   ) -> tuple[float, float]:
    """(quality by `calibration_metric`, mean executed layers per sample or per predicted token) with `policy` at
    `exit_threshold` (default: the config's setting) on `batches`."""
    metrics = evaluate_batches(model, batches, policy, exit_threshold)
    return metrics[calibration_metric(metrics)], metrics["executed_layers"]


def _within_budget(quality: float, reference: float, budget: float, lower_is_better: bool) -> bool:
    if lower_is_better:
        return quality <= reference * (1 + budget)
    return quality >= reference - budget


def calibrate_exit(model, batches: Iterable[dict], policy: str = "halting", budget: float = 0.005,
                   candidates: list[float | int] | None = None) -> CalibrationResult:
    """Choose `policy`'s setting with the fewest executed layers whose quality loss is within `budget`.

    `batches`: model inputs with `labels` (a list, or any iterable that can be read several times).
    `budget`: the drop allowed in accuracy (single-label; 0.005 = 0.5 points) or micro-F1 (multi-label), the
    relative increase allowed in a regressor's mean squared error or a causal LM's perplexity (0.03 = 3%).
    `candidates` default to the rule's calibration grid (`ExitRule.candidates`); each is checked by the rule, and
    the policy against the task, before anything is measured. The choice is written into `model.config`
    (`exit_policy` and the policy's field), so `save_pretrained` stores it; without any admissible candidate the
    model is set to `exit_policy="none"`.
    """
    config = model.config
    rule = task_exit_rule(policy, config, owner="policy")
    require(is_number(budget) and budget >= 0, "budget", "a number >= 0", budget)
    field_name = rule.config_field
    values = rule.candidates(config.num_variable_steps) if candidates is None else list(candidates)
    require(len(values) > 0, "candidates", f"None (the rule's grid) or a non-empty list of {rule.allowed}", values)
    for value in values:
        rule.check(value, owner=f"calibrate_exit candidate for {field_name}")
    full_depth, *records = sweep_exits(model, batches, [("none", None)] + [(policy, value) for value in values])
    name = calibration_metric(full_depth)
    reference = full_depth[name]
    require(math.isfinite(reference), f"the full-depth {name}", "finite to calibrate against (are the labels "
            "constant, or the predictions?)", reference)
    result = CalibrationResult("none", None, name, reference, reference, full_depth["executed_layers"],
                               config.num_blocks)
    for record in records:
        value, quality, layers = record["exit_threshold"], record[name], record["executed_layers"]
        admissible = _within_budget(quality, reference, budget, lower_is_better=CALIBRATION_METRICS[name])
        result.candidates.append({field_name: value, "quality": quality, "executed_layers": layers,
                                  "within_budget": admissible})
        if admissible and layers < result.executed_layers:
            result.policy, result.value, result.quality, result.executed_layers = policy, value, quality, layers
    config.exit_policy = result.policy
    if result.value is not None:
        setattr(config, field_name, result.value)
    return result
