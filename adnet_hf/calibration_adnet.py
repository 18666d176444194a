"""Pick the exit threshold (or patience) with the largest saving whose quality loss stays within a budget.

Every candidate is measured with real exits on the held-out data (a causal LM's exited tokens change what later
tokens see, so exits cannot be simulated from one full-depth pass), against the same model at full depth, by
`evaluation_adnet.sweep_exits`: the candidates are passed per call, and only the choice is written into the config.

Two ways to choose: the cheapest setting whose measured loss on the calibration data is within the budget
(`delta=None`: empirical, no guarantee), or, for a single-label classifier, Learn-then-Test risk control (`delta`):
the cheapest setting certified to lose at most the budget on new data from the same distribution, with probability
at least `1 - delta` over the calibration sample (`certify`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .evaluation_adnet import evaluate_batches, sample_errors, sweep_exits
from .exits_adnet import FULL_DEPTH, is_number, require, task_exit_rule

# What an exit setting is judged by, for each kind of task, and whether lower is better: a causal LM's perplexity;
# a regressor's mean squared error (Pearson's r ignores the scale and offset of the predictions, so an exit that
# shrinks them keeps it, and is near 0 for a weak model, which would let every exit pass); a multi-label
# classifier's micro-F1 over every label (subset accuracy is near 0 with many labels); otherwise accuracy.
CALIBRATION_METRICS = {"perplexity": True, "mse": True, "micro_f1": False, "accuracy": False}
RISK_CONTROL_METHOD = (
    "Learn-then-Test (Angelopoulos et al. 2021), fixed-sequence testing from the most cautious "
    "candidate, exact binomial p-value of the loss max(0, err_exit - err_full)"
)


def calibration_metric(metrics: dict[str, float]) -> str:
    """The name of the metric in `metrics` that `calibrate_exit` judges exits by."""
    return next(name for name in CALIBRATION_METRICS if name in metrics)


@dataclass
class CalibrationResult:
    """What `calibrate_exit` chose and measured.

    Attributes:
        policy (str): The exit policy chosen; `'none'` when no candidate was admissible.
        value (float | int | None): Its setting (the policy's config field); `None` for `'none'`.
        metric (str): What exits are judged by: `'accuracy'` (single-label), `'micro_f1'` (multi-label), `'mse'`
            (regression) or `'perplexity'` (causal LMs).
        quality (float): The `metric` of the chosen setting on the calibration batches.
        full_depth_quality (float): The `metric` at full depth.
        executed_layers (float): Mean blocks run per sample (per predicted token) with the chosen setting.
        num_blocks (int): The backbone's blocks, for scale.
        candidates (list[dict]): Every candidate in the order tried: its setting (under the policy's field name),
            `quality`, `executed_layers` and `within_budget`; with `delta`, also `loss_rate`, `p_value` and
            `certified`.
        guarantee (dict | None): With `delta`: what is stored as `config.exit_guarantee`. Defaults to `None`.
    """

    policy: str
    value: float | int | None
    metric: str
    quality: float
    full_depth_quality: float
    executed_layers: float
    num_blocks: int
    candidates: list[dict] = field(default_factory=list)
    guarantee: dict | None = None  # with `delta`: what is stored as `config.exit_guarantee`


def evaluate_exits(
    model, batches: Iterable[dict], policy: str, exit_threshold: float | int | None = None
) -> tuple[float, float]:
    """(quality by `calibration_metric`, mean executed layers per sample or per predicted token) with `policy` at
    `exit_threshold` (default: the config's setting) on `batches`."""
    metrics = evaluate_batches(model, batches, policy, exit_threshold)
    return metrics[calibration_metric(metrics)], metrics["executed_layers"]


def within_budget(quality: float, reference: float, budget: float, lower_is_better: bool) -> bool:
    """Whether `quality` loses at most `budget` to `reference`: relatively where lower is better, else absolutely."""
    if lower_is_better:
        return quality <= reference * (1 + budget)
    return quality >= reference - budget


def cheapest(executed_layers: Sequence[float], admissible: Sequence[bool], full_depth_layers: float) -> int | None:
    """The index of the admissible candidate with the fewest executed layers, if it runs fewer than full depth."""
    best = min((i for i, ok in enumerate(admissible) if ok), key=lambda i: executed_layers[i], default=None)
    return best if best is not None and executed_layers[best] < full_depth_layers else None


def binomial_cdf(counts: np.ndarray, n: int, p: float) -> np.ndarray:
    """`P(Binomial(n, p) <= count)` for each of `counts`, exact but for float64 rounding (about 1e-12 relative at
    n = 2000), without scipy: the log-probabilities of 0..n (`xlogy` keeps p = 0 and p = 1 exact) summed cumulatively
    in log space, so that tails down to 1e-300 keep their precision (where scipy's lose it below about 1e-200)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_factorials, p = torch.lgamma(k + 1), torch.tensor(p, dtype=torch.float64)
    log_pmf = (
        log_factorials[-1]
        - log_factorials
        - log_factorials.flip(0)
        + torch.special.xlogy(k, p)
        + torch.special.xlog1py(n - k, -p)
    )
    return torch.logcumsumexp(log_pmf, 0)[torch.as_tensor(counts)].exp().clamp(max=1.0).numpy()


def certify(
    exit_errors: np.ndarray, full_errors: np.ndarray, budget: float, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021, arXiv:2110.01052) of the candidates' accuracy
    drop: the p-value of each, and which are certified to drop accuracy by at most `budget` on new data from the
    calibration data's distribution, all of them at once with probability >= 1 - `delta` over the calibration sample.

    `exit_errors`: candidates x samples, whether each candidate's exit prediction is wrong; `full_errors`: samples,
    whether full depth's is. The loss is CALM's risk consistency (Schuster et al. 2022) for 0/1 error,
    `max(0, err_exit - err_full)`: 1 where the exit is wrong and full depth right. It is >= `err_exit - err_full`, so
    its mean bounds the accuracy drop from above. Being 0/1, its count on n samples is Binomial(n, risk), and
    `P(Binomial(n, budget) <= count)` is an exact, valid p-value of "risk > budget", smaller than the
    Hoeffding-Bentkus one (Bates et al. 2021), which bounds that same tail by e times it. The signed difference
    (in [-1, 1]) would credit the samples that only the exit gets right, but its bounded-variable p-values (Hoeffding,
    Bentkus) pay for a range of 2 around a mean near the middle, and are looser at the few hundred samples a dev
    set offers. Fixed-sequence testing along the candidates' order (the most cautious first) certifies each while
    its p-value is <= `delta` and stops at the first that is not, which controls the family-wise error at `delta`
    without a multiplicity correction; the order must not depend on the calibration sample.
    """
    losses = (exit_errors & ~full_errors).sum(-1)
    p_values = binomial_cdf(losses, full_errors.shape[-1], budget)
    failed = np.flatnonzero(p_values > delta)
    certified = np.arange(len(p_values)) < (failed[0] if len(failed) else len(p_values))
    return p_values, certified


def unbounded_task(config) -> str | None:
    """The kind of model `config` is when risk control has no valid bound for it, else None (a single-label
    classifier, whose accuracy drop `certify` bounds)."""
    if config.per_token_units:
        return "a causal LM (perplexity)"
    if config.is_regression:
        return "a regressor (mean squared error)"
    return "a multi-label classifier (micro-F1)" if config.problem_type == "multi_label_classification" else None


def check_risk_control(config, budget: float, delta) -> None:
    """Refuse `delta` (naming it) unless risk control applies: a number in (0, 1), a single-label classifier (the
    only task with a valid bound here) and a budget that is an accuracy drop."""
    require(
        is_number(delta) and 0 < delta < 1,
        "delta",
        "None (the empirical choice, no guarantee) or a number in (0, 1)",
        delta,
    )
    task = unbounded_task(config)
    if task is not None:
        raise ValueError(
            f"delta={delta!r}: risk control bounds a single-label classifier's accuracy drop, and this "
            f"model is {task}, for which no valid bound is implemented. Pass delta=None for the "
            "empirical choice (no guarantee)."
        )
    require(budget <= 1, "budget", "an accuracy drop in [0, 1] with delta", budget)


def _risk_control(full_depth: dict, records: list[dict], budget: float, delta: float) -> tuple[list[dict], int]:
    """Each candidate's loss rate, p-value and certification (`certify`), and the calibration size."""
    try:
        full_errors = sample_errors(full_depth["items"]).numpy()
        exit_errors = np.stack([sample_errors(record["items"]).numpy() for record in records])
    except ValueError as error:
        raise ValueError(f"delta needs a single-label classifier's labels: {error}") from None
    p_values, certified = certify(exit_errors, full_errors, budget, delta)
    loss_rates = (exit_errors & ~full_errors).mean(-1)
    return [
        {"loss_rate": float(rate), "p_value": float(p), "certified": bool(ok)}
        for rate, p, ok in zip(loss_rates, p_values, certified)
    ], len(full_errors)


def calibrate_exit(
    model,
    batches: Iterable[dict],
    policy: str = "halting",
    budget: float = 0.005,
    candidates: list[float | int] | None = None,
    delta: float | None = None,
) -> CalibrationResult:
    """Choose `policy`'s setting with the fewest executed layers whose quality loss is within `budget`.

    Every candidate runs with real exits on `batches`, against the same model at full depth (`sweep_exits`). The
    choice is written into `model.config` (`exit_policy` and the policy's field, and `exit_guarantee`), so
    `save_pretrained` stores it; without any admissible candidate the model is set to `exit_policy="none"`.
    Calibrate on held-out data, not on the training set.

    Args:
        model (ADNetPreTrainedModel): An ADNet task model (classifier, regressor or causal LM).
        batches (Iterable[dict]): Model inputs with `labels`: a list, or any iterable that can be read several
            times.
        policy (str): The exit policy to calibrate (a registered rule, not `'none'`). Defaults to `"halting"`.
        budget (float): The loss allowed against full depth: an absolute drop in accuracy (single-label;
            `0.005` = 0.5 points) or micro-F1 (multi-label), a relative increase in a regressor's mean squared
            error or a causal LM's perplexity (`0.03` = 3%). Defaults to `0.005`.
        candidates (list[float | int] | None): The settings to try, from the most cautious to the most aggressive;
            each is checked by the rule, and the policy against the task, before anything runs. Defaults to `None`
            (the rule's grid, `ExitRule.candidates`).
        delta (float | None): `None`: the cheapest setting whose loss measured on `batches` is within `budget`
            (no guarantee on new data). A number in (0, 1), single-label classifiers only: Learn-then-Test risk
            control, the cheapest setting certified so that, with probability at least `1 - delta` over the
            calibration sample, its accuracy drop on new data from the same distribution is at most `budget`;
            stored as `config.exit_guarantee`. Defaults to `None`.

    Returns:
        The setting chosen, its quality and cost, and every candidate's.

    Raises:
        ValueError: A policy, budget, candidate or `delta` the model's task does not take, or a full-depth
            quality that is not finite.
    """
    config = model.config
    rule = task_exit_rule(policy, config, owner="policy")
    require(is_number(budget) and budget >= 0, "budget", "a number >= 0", budget)
    if delta is not None:
        check_risk_control(config, budget, delta)
    field_name = rule.config_field
    values = rule.candidates(config.num_variable_steps) if candidates is None else list(candidates)
    require(len(values) > 0, "candidates", f"None (the rule's grid) or a non-empty list of {rule.allowed}", values)
    for value in values:
        rule.check(value, owner=f"calibrate_exit candidate for {field_name}")
    full_depth, *records = sweep_exits(
        model, batches, [(FULL_DEPTH, None)] + [(policy, value) for value in values], return_items=delta is not None
    )
    name = calibration_metric(full_depth)
    reference = full_depth[name]
    require(
        math.isfinite(reference),
        f"the full-depth {name}",
        "finite to calibrate against (are the labels constant, or the predictions?)",
        reference,
    )
    result = CalibrationResult(
        FULL_DEPTH, None, name, reference, reference, full_depth["executed_layers"], config.num_blocks
    )
    lower_is_better = CALIBRATION_METRICS[name]
    for record in records:
        result.candidates.append(
            {
                field_name: record["exit_threshold"],
                "quality": record[name],
                "executed_layers": record["executed_layers"],
                "within_budget": within_budget(record[name], reference, budget, lower_is_better),
            }
        )
    if delta is not None:
        risks, calibration_size = _risk_control(full_depth, records, budget, delta)
        for candidate, risk in zip(result.candidates, risks):
            candidate.update(risk)
    admitted = "within_budget" if delta is None else "certified"
    best = cheapest(
        [c["executed_layers"] for c in result.candidates],
        [c[admitted] for c in result.candidates],
        result.executed_layers,
    )
    if best is not None:
        chosen = result.candidates[best]
        result.policy, result.value = policy, chosen[field_name]
        result.quality, result.executed_layers = chosen["quality"], chosen["executed_layers"]
    if delta is not None:
        result.guarantee = {
            "policy": result.policy,
            "value": result.value,
            "metric": name,
            "budget": budget,
            "delta": delta,
            "calibration_size": calibration_size,
            "method": RISK_CONTROL_METHOD,
        }
    config.exit_policy = result.policy
    if result.value is not None:
        setattr(config, field_name, result.value)
    config.exit_guarantee = result.guarantee
    return result
