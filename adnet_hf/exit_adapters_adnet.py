"""Exit adapters: what lets a frozen causal LM's shared final norm and LM head read its intermediate layers.

A pretrained decoder's intermediate hidden states are not in the basis its head reads (SmolLM2-135M: perplexity 2e11
after 15 of its 30 layers through the plain head). A tuned lens (Belrose et al. 2023) learns one affine map per layer
that carries the hidden state there into the last layer's basis, leaving the backbone, norm and head untouched; it is
trained on the frozen backbone, whose pass then needs no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExitAdapter(nn.Module):
    """`h + W h + b`, applied to an exit's hidden state (B x T x H) before the final norm and LM head. `W` and `b`
    start at zero, so an untrained adapter reads the exit exactly as the plain head does."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + F.linear(hidden, self.weight, self.bias)

    def flops(self) -> float:
        """FLOPs per token: the matrix product."""
        return 2.0 * self.weight.numel()
