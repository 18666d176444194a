"""Pick the exit threshold (or patience) with the largest saving whose quality loss stays within a budget.

Every candidate is measured with real exits on the held-out data (a causal LM's exited tokens change what later
tokens see, so exits cannot be replayed from one full-depth pass), against the same model at full depth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .losses_adnet import IGNORE_INDEX

POLICY_FIELDS = {"halting": "halting_epsilon", "confidence": "confidence_threshold", "patience": "patience"}


@dataclass
class CalibrationResult:
    """What `calibrate_exit` measured. `quality` is accuracy (classifiers) or perplexity (causal LMs)."""

    policy: str
    value: float | int | None
    quality: float
    full_depth_quality: float
    mean_executed_layers: float
    total_layers: int
    candidates: list[dict] = field(default_factory=list)


def default_candidates(policy: str, num_variable_steps: int) -> list[float | int]:
    """Thresholds ordered from the most cautious to the most aggressive."""
    if policy == "halting":
        return [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    if policy == "confidence":
        return [0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55]
    if policy == "patience":
        return list(range(num_variable_steps - 1, 0, -1))
    raise ValueError(f"policy must be one of {tuple(POLICY_FIELDS)}, got {policy!r}")


@torch.no_grad()
def evaluate_exits(model, batches: Iterable[dict], policy: str) -> tuple[float, float]:
    """(quality, mean executed layers per sample or per predicted token) with `policy` on `batches`."""
    is_lm = hasattr(model, "lm_head")
    correct = total = 0
    nll = 0.0
    layers = 0.0
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        out = model(**batch, exit_policy=policy)
        executed = out.exit_steps * model.config.layers_per_step
        if is_lm:
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            log_probs = torch.log_softmax(out.logits[:, :-1][keep].float(), dim=-1)
            nll += -log_probs.gather(-1, targets[keep].unsqueeze(-1)).sum().item()
            layers += executed[:, :-1][keep].sum().item()
            total += int(keep.sum())
        else:
            correct += (out.logits.argmax(-1) == labels).sum().item()
            layers += executed.sum().item()
            total += labels.shape[0]
    quality = math.exp(nll / total) if is_lm else correct / total
    return quality, layers / total


def _within_budget(quality: float, reference: float, budget: float, is_lm: bool) -> bool:
    if is_lm:
        return quality <= reference * (1 + budget)
    return quality >= reference - budget


def calibrate_exit(model, batches: Iterable[dict], policy: str = "halting", budget: float = 0.005,
                   candidates: list[float | int] | None = None) -> CalibrationResult:
    """Choose `policy`'s setting with the fewest executed layers whose quality loss is within `budget`.

    `batches`: model inputs with `labels` (a list, or any iterable that can be read several times).
    `budget`: accuracy points as a fraction for classifiers (0.005 = 0.5 points), relative perplexity increase
    for causal LMs (0.03 = 3%). The choice is written into `model.config` (`exit_policy` and the policy's field),
    so `save_pretrained` stores it; without any admissible candidate the model is set to `exit_policy="none"`.
    """
    if policy not in POLICY_FIELDS:
        raise ValueError(f"policy must be one of {tuple(POLICY_FIELDS)}, got {policy!r}")
    model.eval()
    batches = list(batches)
    is_lm = hasattr(model, "lm_head")
    config = model.config
    reference, full_layers = evaluate_exits(model, batches, "none")
    field_name = POLICY_FIELDS[policy]
    original = getattr(config, field_name)
    result = CalibrationResult("none", None, reference, reference, full_layers, config.num_blocks)
    try:
        for value in candidates or default_candidates(policy, config.num_variable_steps):
            setattr(config, field_name, value)
            quality, layers = evaluate_exits(model, batches, policy)
            admissible = _within_budget(quality, reference, budget, is_lm)
            result.candidates.append({field_name: value, "quality": quality, "mean_executed_layers": layers,
                                      "within_budget": admissible})
            if admissible and layers < result.mean_executed_layers:
                result.policy, result.value = policy, value
                result.quality, result.mean_executed_layers = quality, layers
    finally:
        setattr(config, field_name, original)
    config.exit_policy = result.policy
    if result.value is not None:
        setattr(config, field_name, result.value)
    return result
