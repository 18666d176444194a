"""A draft unit: one decoder layer that drafts from a frozen causal LM's own top features (EAGLE, Li et al. 2024).

Early exits draft well only from a model trained for them. A draft unit works on any pretrained model: it reads the
top feature at position t (the last block's output, which the final norm and LM head read) and the embedding of
token t+1, and predicts the top feature at t+1, from which the model's own final norm and LM head (shared, not
copied) give the draft's next token. Drafting feeds its predicted features back in, one token at a time, with a
key/value cache of its own; the full model verifies the drafts (`speculative_adnet.DraftUnitDecoder`), so the output
is the full model's. It is trained on the frozen model's cached features (`DraftUnitTrainer`, `draft_unit_loss`).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones_adnet import StepState


class DraftUnit(nn.Module):
    """`fc([feature_t ; embedding(token_{t+1})])` (2 H -> H), then one decoder layer of the backbone's own family
    (a Llama-family layer with the backbone's rotary embeddings, a GPT-2 block): the predicted top feature at t+1.

    Args:
        hidden_size (int): The backbone's hidden size `H`.
        layer (nn.Module): A new block of the backbone's class (`DecoderAdapter.new_block`).
    """

    def __init__(self, hidden_size: int, layer: nn.Module):
        super().__init__()
        self.fc = nn.Linear(2 * hidden_size, hidden_size)
        self.layer = layer

    def forward(self, features: torch.Tensor, tokens: StepState, cache=None) -> torch.Tensor:
        """Predicted top features (B x T x H) from `features` (B x T x H, positions t) and `tokens`, the embedded
        tokens at t+1 with the mask and positions of positions t (`BackboneAdapter.embed` on the draft's cache)."""
        hidden = self.fc(torch.cat([features.to(tokens.hidden.dtype), tokens.hidden], dim=-1))
        return self.layer(hidden, cache=cache, **tokens.block_kwargs)
