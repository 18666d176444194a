"""Calculation units, the halting distribution and the inference exit rules."""

from __future__ import annotations

import torch
from torch import nn


def masked_mean_max(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of B x T x d `values` over the real positions of `mask` (B x T), each B x d."""
    if mask is None:
        return values.mean(1), values.amax(1)
    weights = mask.to(values.dtype).unsqueeze(-1)
    mean = (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    # values are sigmoids in (0, 1): -1 at padding never wins the max
    maximum = values.masked_fill(weights == 0, -1.0).amax(1)
    return mean, maximum


class CalculationUnit(nn.Module):
    """One variable step's unit: `S = sigmoid(W h + b)`, summary `r`, halting probability `lambda`.

    Pooled (classification): `r = concat(masked_mean_T(S), masked_max_T(S))`, B x 2d, one `lambda` per sample.
    Per token (causal LM): `r = S`, B x T x d, one `lambda` per token, no look at later tokens.
    The last step's unit has no halting layer: it always halts (`lambda = 1`), taking the remaining probability;
    a per-token unit then has nothing left to compute (the LM head reads the hidden state itself).
    """

    def __init__(self, input_size: int, hidden_size: int, per_token: bool = False, halts: bool = True):
        super().__init__()
        self.per_token = per_token
        self.dense = None if per_token and not halts else nn.Linear(input_size, hidden_size)
        self.halting = nn.Linear(hidden_size if per_token else 2 * hidden_size, 1) if halts else None

    def flops(self) -> tuple[float, float]:
        """Estimated FLOPs per real position (the dense layer) and per summary (the halting layer, which a pooled
        unit runs once per sample and a per-token unit once per token)."""
        dense = 0.0 if self.dense is None else 2.0 * self.dense.weight.numel()
        halting = 0.0 if self.halting is None else 2.0 * self.halting.weight.numel()
        return dense, halting

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: B x T x H. Returns the summary `r` and the halting probability `lambda` (B, or B x T)."""
        if self.dense is None:
            return None, hidden.new_ones(hidden.shape[:-1])
        activations = torch.sigmoid(self.dense(hidden))
        summary = activations if self.per_token else torch.cat(masked_mean_max(activations, mask), dim=-1)
        if self.halting is None:
            return summary, summary.new_ones(summary.shape[:-1])
        return summary, torch.sigmoid(self.halting(summary)).squeeze(-1)


def halting_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """PonderNet's halting distribution over the last dim: `p_n = lambda_n prod_{k<n}(1 - lambda_k)`.

    The last step takes the remaining probability, so every row sums to 1.
    """
    not_halted = torch.cumprod(1 - lambdas, dim=-1)
    remainder = torch.cat([torch.ones_like(lambdas[..., :1]), not_halted[..., :-1]], dim=-1)
    probs = remainder * lambdas
    return torch.cat([probs[..., :-1], remainder[..., -1:]], dim=-1)


class ExitRule:
    """Decides, step after step, which items (samples, or tokens of a causal LM) stop.

    Per-item state (e.g. the probability not yet halted) is kept here and shrinks with the batch (`select`).
    Every rule is deterministic and per item, so an item's exit never depends on the rest of the batch.
    """

    def __init__(self, policy: str, halting_epsilon: float, confidence_threshold: float, patience: int,
                 problem_type: str | None):
        if policy in ("confidence", "patience") and problem_type == "regression":
            raise ValueError(f"exit_policy={policy!r} needs class predictions; for regression use 'halting' or 'none'.")
        self.policy = policy
        self.epsilon = halting_epsilon
        self.threshold = confidence_threshold
        self.patience = patience
        self.multi_label = problem_type == "multi_label_classification"
        self.needs_predictions = policy in ("confidence", "patience")
        self.not_halted: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.unchanged: torch.Tensor | None = None

    def step(self, lambdas: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """Update with this step's `lambdas` (items) and `logits` (items x C); return which items stop now."""
        self.not_halted = (1 - lambdas) * (1 if self.not_halted is None else self.not_halted)
        if self.policy == "halting":
            return self.not_halted <= self.epsilon
        if self.policy == "none":
            return torch.zeros_like(lambdas, dtype=torch.bool)
        if logits is None:
            raise ValueError(f"exit_policy={self.policy!r} needs step predictions: use a task model, not ADNetModel.")
        if self.policy == "confidence":
            return self._confidence(logits) >= self.threshold
        return self._patience(logits)

    def _confidence(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            probs = torch.sigmoid(logits.float())
            return torch.maximum(probs, 1 - probs).amin(-1)
        return torch.softmax(logits.float(), dim=-1).amax(-1)

    def _patience(self, logits: torch.Tensor) -> torch.Tensor:
        prediction = logits > 0 if self.multi_label else logits.argmax(-1, keepdim=True)
        if self.previous is None:
            self.unchanged = torch.zeros(prediction.shape[:-1], dtype=torch.long, device=logits.device)
        else:
            same = (prediction == self.previous).all(-1)
            self.unchanged = torch.where(same, self.unchanged + 1, torch.zeros_like(self.unchanged))
        self.previous = prediction
        return self.unchanged >= self.patience

    def select(self, keep: torch.Tensor) -> None:
        """Keep the state of the samples at indices `keep` only."""
        for name in ("not_halted", "previous", "unchanged"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])
