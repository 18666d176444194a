"""Pick the exit threshold (or patience) with the largest saving whose quality loss stays within a budget.

Every candidate is measured with real exits on the held-out data (a causal LM's exited tokens change what later
tokens see, so exits cannot be replayed from one full-depth pass), against the same model at full depth, by
`evaluation_adnet.sweep_exits`: the candidates are passed per call, and only the choice is written into the config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .evaluation_adnet import evaluate_batches, quality_metric, sweep_exits
from .exits_adnet import EXIT_RULES


@dataclass
class CalibrationResult:
    """What `calibrate_exit` measured. `quality` is accuracy (classifiers), Pearson's r (regression) or perplexity
    (causal LMs); `executed_layers` is the mean per sample (per predicted token)."""

    policy: str
    value: float | int | None
    quality: float
    full_depth_quality: float
    executed_layers: float
    num_blocks: int
    candidates: list[dict] = field(default_factory=list)


def evaluate_exits(model, batches: Iterable[dict], policy: str, exit_threshold: float | int | None = None
                   ) -> tuple[float, float]:
    """(quality, mean executed layers per sample or per predicted token) with `policy` at `exit_threshold` (default:
    the config's setting) on `batches`."""
    metrics = evaluate_batches(model, batches, policy, exit_threshold)
    return metrics[quality_metric(metrics)], metrics["executed_layers"]


def _within_budget(quality: float, reference: float, budget: float, lower_is_better: bool) -> bool:
    if lower_is_better:
        return quality <= reference * (1 + budget)
    return quality >= reference - budget


def calibrate_exit(model, batches: Iterable[dict], policy: str = "halting", budget: float = 0.005,
                   candidates: list[float | int] | None = None) -> CalibrationResult:
    """Choose `policy`'s setting with the fewest executed layers whose quality loss is within `budget`.

    `batches`: model inputs with `labels` (a list, or any iterable that can be read several times).
    `budget`: the drop in accuracy allowed to a classifier (0.005 = 0.5 points) or in Pearson's r to a regressor,
    the relative perplexity increase allowed to a causal LM (0.03 = 3%). `candidates` default to the rule's
    calibration grid (`ExitRule.candidates`). The choice is written into `model.config` (`exit_policy` and the
    policy's field), so `save_pretrained` stores it; without any admissible candidate the model is set to
    `exit_policy="none"`.
    """
    if policy not in EXIT_RULES:
        raise ValueError(f"policy must be one of {tuple(EXIT_RULES)}, got {policy!r}")
    config, rule = model.config, EXIT_RULES[policy]
    field_name = rule.config_field
    values = candidates or rule.candidates(config.num_variable_steps)
    for value in values:
        rule.check(value, owner=f"calibrate_exit candidate for {field_name}")
    full_depth, *records = sweep_exits(model, batches, [("none", None)] + [(policy, value) for value in values])
    name = quality_metric(full_depth)
    reference = full_depth[name]
    result = CalibrationResult("none", None, reference, reference, full_depth["executed_layers"], config.num_blocks)
    for record in records:
        value, quality, layers = record["exit_threshold"], record[name], record["executed_layers"]
        admissible = _within_budget(quality, reference, budget, lower_is_better=name == "perplexity")
        result.candidates.append({field_name: value, "quality": quality, "executed_layers": layers,
                                  "within_budget": admissible})
        if admissible and layers < result.executed_layers:
            result.policy, result.value, result.quality, result.executed_layers = policy, value, quality, layers
    config.exit_policy = result.policy
    if result.value is not None:
        setattr(config, field_name, result.value)
    return result
