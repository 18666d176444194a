"""The calculation unit: what each variable step adds to the backbone to summarise the step and decide to halt."""

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
