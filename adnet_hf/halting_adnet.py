"""Fit the halting units that read the step evidence to a trained model's step predictions (BERxiT's learning to
exit, done after the model is trained).

GPSL with `gpsl_plateau="settled"` trains `lambda` toward the first step from which the prediction stays the
full-depth one: its halting term is the survival log-likelihood of that step, `-log p_s = -log lambda_s -
sum_{n<s} log(1 - lambda_n)`, which is one logistic regression per step over the items not yet settled before it
(target: settled at that step). Once the step predictions are trained (and frozen), the evidence each unit reads is
fixed, so that term can be minimised to convergence on one full-depth pass over the training data instead of by a
few SGD steps shared with the prediction loss, which move the hazards little.

The fit sets the summary weights `w` to zero and fits the bias `c` and the evidence weights `v` (six numbers per
unit) with an L2 penalty: six numbers per unit stay well determined on a few hundred samples, where the summary
weights (hundreds per unit) would overfit a small task. Units are fitted in order, since each reads the halting mass its
predecessors left (`log_not_halted`).

Fit on data the model was not trained on (`run_glue_style.py --fit_halting_split`): a trained model's early steps
agree with its last one more often on its own training data than on new data, so units fitted there learn to exit
too early (docs/calibration.md). Six numbers per unit need only a few hundred held-out samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from .exits_adnet import HaltingDistribution
from .losses_adnet import settled_steps


@dataclass
class HaltingFit:
    """What `fit_halting` fitted, for a log or a report.

    Attributes:
        samples (int): Samples the fit read.
        steps (list[dict]): One entry per halting unit, in order: `step` (its index among the variable steps),
            `rows` (the samples its loss reads: every one, or for `"survival"` those not settled before its step),
            `target` (the mean of their target) and `loss` (the mean loss before and after the fit; `None` where
            no row was left to fit).
    """

    samples: int
    steps: list[dict] = field(default_factory=list)


@torch.no_grad()
def full_depth_step_logits(model, batches: Iterable[dict]) -> torch.Tensor:
    """Every variable step's logits of `model` at full depth on `batches` (model inputs; labels are ignored), N x
    samples x C on the CPU, in eval mode (the predictions the exits will read)."""
    model.eval()
    parts = []
    for batch in batches:
        inputs = {name: value.to(model.device) for name, value in batch.items() if name != "labels"}
        parts.append(model(**inputs, exit_policy="none", output_step_logits=True).step_logits.float().cpu())
    return torch.cat(parts, dim=1)


def unfit_reason(model) -> str | None:
    """Why `fit_halting` does not apply to `model`, or None where it does (an ADNet classifier whose halting units
    read the step evidence)."""
    units = getattr(model.base_model, "units", None)
    if getattr(model.config, "model_type", None) != "adnet" or units is None:
        return "fit_halting fits an ADNet model's halting units."
    if not all(unit.reads_evidence for unit in units[:-1]):
        return (
            "fit_halting fits halting units that read the step evidence: the model needs "
            "ADNetConfig.halting_evidence=True (a classifier)."
        )
    if model.config.problem_type == "regression" or model.config.num_labels == 1:
        return (
            "fit_halting needs a classifier: a regressor's prediction has no step at which it settles (train its "
            "units with gpsl_plateau='loss')."
        )
    return None


def fits_halting(model) -> bool:
    return unfit_reason(model) is None


def _check(model) -> None:
    reason = unfit_reason(model)
    if reason is not None:
        raise ValueError(reason)


def _settled_by_loss(logits: torch.Tensor, log_not_halted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Log loss of the halted mass after this step, `1 - nh (1 - lambda)`, against `target` (settled by this step)."""
    log_left = (log_not_halted + F.logsigmoid(-logits)).clamp(max=-1e-7)  # log(nh (1 - lambda))
    log_halted = torch.log(-torch.expm1(log_left))
    return -(target * log_halted + (1 - target) * log_left).mean()


def _unit_loss(
    objective: str, n: int, settled: torch.Tensor, not_halted: torch.Tensor | float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """What unit n is fitted to under `objective`: the rows its loss reads, their target, and the loss of their
    halting logits (`settled`: each sample's first settled step; `not_halted`: the mass left before step n)."""
    if objective == "survival":
        rows = (settled >= n).to(device)  # at risk: not settled before this step
        target = (settled == n).float().to(device)[rows]
        return rows, target, partial(F.binary_cross_entropy_with_logits, target=target)
    rows = torch.ones(len(settled), dtype=torch.bool, device=device)
    target = (settled <= n).float().to(device)
    log_not_halted = torch.log(torch.as_tensor(not_halted, device=device).float().expand(len(settled)))
    return rows, target, partial(_settled_by_loss, log_not_halted=log_not_halted, target=target)


def _fit_unit(
    unit,
    loss_of_logits: Callable[[torch.Tensor], torch.Tensor],
    summary: torch.Tensor,
    evidence: torch.Tensor,
    weight_decay: float,
    max_iter: int,
) -> list[float]:
    """Fit the unit's bias and evidence weights (its summary weights at zero, `summary` zeros) to minimise
    `loss_of_logits(halting logits)` by L-BFGS with an L2 penalty; returns the loss before and after."""
    params = [unit.halting.bias, unit.evidence.weight]

    def loss_fn() -> torch.Tensor:
        return loss_of_logits(unit.halting_logits(summary, evidence))

    with torch.no_grad():
        before = loss_fn().item()
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn() + weight_decay * sum(param.pow(2).sum() for param in params)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return [before, loss_fn().item()]


OBJECTIVES = ("survival", "settled_by")


def fit_halting(
    model, batches: Iterable[dict], weight_decay: float = 1e-3, max_iter: int = 200, objective: str = "settled_by"
) -> HaltingFit:
    """Fit a trained classifier's halting units to where its own predictions settle (BERxiT's learning to exit).

    One full-depth pass over `batches` finds, for every sample, the first step from which the prediction stays the
    full-depth one; then each unit's bias and evidence weights (six numbers; its summary weights are set to zero) are
    fitted by L-BFGS, unit after unit, since each reads the halting mass its predecessors left. Six numbers per unit
    need only a few hundred samples, and they are best held out of training: a model's early steps agree with its
    last one more often on its own training data, so units fitted there exit too early.

    Only the units' halting layers change (in place; the step predictions and full-depth outputs do not): choose
    the exit setting afterwards with `calibrate_exit` on held-out data. The model needs units that read the step
    evidence (`ADNetConfig.halting_evidence`, on for classifiers) and classes to settle on (no regressor).

    Args:
        model (ADNetForSequenceClassification | ADNetForImageClassification): The trained classifier.
        batches (Iterable[dict]): Model inputs; labels are not read, the model's own predictions are.
        weight_decay (float): L2 penalty on the fitted weights. Defaults to `1e-3`.
        max_iter (int): L-BFGS iterations per unit. Defaults to `200`.
        objective (str): `"settled_by"` scores at every step the halted mass `1 - prod_{k<=n}(1 - lambda_k)`, the
            quantity the `halting` rule thresholds, against whether the prediction has settled by that step (a log
            loss over every sample); `"survival"` is GPSL's settled term, the log-likelihood of the first settled
            step (a logistic regression over the samples not settled before each step). Both are proper scores of
            the same distribution, and linear units represent it only approximately, so they can trade accuracy
            for layers differently on a given task. Defaults to `"settled_by"`.

    Returns:
        Per unit, the rows fitted and the loss before and after.

    Raises:
        ValueError: The model is not an ADNet classifier whose units read the step evidence, or `objective` is
            unknown.
    """
    _check(model)
    return fit_halting_to_predictions(model, full_depth_step_logits(model, batches), weight_decay, max_iter, objective)


def fit_halting_to_predictions(
    model, step_logits: torch.Tensor, weight_decay: float = 1e-3, max_iter: int = 200, objective: str = "settled_by"
) -> HaltingFit:
    """`fit_halting` on the model's full-depth `step_logits` (N x samples x C, `full_depth_step_logits`)."""
    _check(model)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    problem_type = model.config.problem_type or "single_label_classification"
    settled = settled_steps(step_logits, problem_type).float().argmax(-1)  # first settled step per sample
    result = HaltingFit(samples=step_logits.shape[1])
    distribution, previous = HaltingDistribution(), None  # the halting mass each unit reads, as the engine builds it
    for n, unit in enumerate(model.base_model.units[:-1]):
        device = unit.halting.weight.device
        unit.halting.weight.data.zero_()
        evidence = model.read_step_evidence(step_logits[n], previous, distribution.not_halted).to(device)
        summary = evidence.new_zeros(len(evidence), unit.halting.in_features)
        rows, target, loss_of_logits = _unit_loss(objective, n, settled, distribution.not_halted, device)
        step = {"step": n, "rows": int(rows.sum()), "target": target.mean().item() if rows.any() else 0.0, "loss": None}
        if rows.any():
            step["loss"] = _fit_unit(unit, loss_of_logits, summary[rows], evidence[rows], weight_decay, max_iter)
        with torch.no_grad():
            lambdas = unit.halt(summary, None, evidence)
        distribution.step(lambdas.float().cpu())
        previous = step_logits[n]
        result.steps.append(step)
    return result


__all__ = [
    "OBJECTIVES",
    "HaltingFit",
    "fit_halting",
    "fits_halting",
    "fit_halting_to_predictions",
    "full_depth_step_logits",
]
