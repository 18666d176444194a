"""A draft unit: one decoder layer that drafts from a frozen causal LM's own top features (EAGLE, Li et al. 2024).

Early exits draft well only from a model trained for them. A draft unit works on any pretrained model: it reads the
top feature at position t (the last block's output after the final norm: what the LM head reads) and the
embedding of token t+1, and predicts the top feature at t+1, from which the model's own LM head (shared, not copied)
gives the draft's next token. Drafting feeds its predicted features back in, one token at a time, with a
key/value cache of its own; the full model verifies the drafts (`speculative_adnet.DraftUnitDecoder`), so the output
is the full model's. It is trained on the frozen model's cached features (`DraftUnitTrainer`, `draft_unit_loss`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache

from .backbones_adnet import BackboneAdapter, StepState
from .speculative_adnet import head_rows


class DraftUnit(nn.Module):
    """`fc([feature_t ; embedding(token_{t+1})])` (2 H -> H), then one decoder layer of the backbone's own family
    (a Llama-family layer with the backbone's rotary embeddings, a GPT-2 block): the predicted top feature at t+1.

    Args:
        hidden_size (int): The backbone's hidden size `H`.
        layer (nn.Module): A new block of the backbone's class (`DecoderAdapter.new_block`).
        vocabulary_size (int | None): Tokens the draft proposes (`ADNetConfig.draft_vocabulary_size`): their ids are
            the buffer `vocabulary`, saved with the unit; `None` proposes any token. Defaults to `None`.
    """

    UNSET = -1
    """The token id of a vocabulary not set yet (a new unit's, or one a checkpoint lacks): refused when read."""

    def __init__(self, hidden_size: int, layer: nn.Module, vocabulary_size: int | None = None):
        super().__init__()
        self.fc = nn.Linear(2 * hidden_size, hidden_size)
        self.layer = layer
        vocabulary = None if vocabulary_size is None else torch.full((vocabulary_size,), self.UNSET)
        self.register_buffer("vocabulary", vocabulary)

    def checked_vocabulary(self) -> torch.LongTensor | None:
        """The vocabulary (None: every token), refused where it was never set."""
        if self.vocabulary is not None and bool((self.vocabulary == self.UNSET).any()):
            raise ValueError(
                "This draft unit's vocabulary (ADNetConfig.draft_vocabulary_size) was never set: add the unit with "
                "add_draft_unit(vocabulary), or load a checkpoint saved with its vocabulary."
            )
        return self.vocabulary

    def head_rows(self, lm_head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows (weight, bias) of the LM head the draft reads: its vocabulary's, or all."""
        return head_rows(lm_head, self.checked_vocabulary())

    def forward(
        self, features: torch.Tensor, tokens: StepState, adapter: BackboneAdapter, cache: Cache | None = None
    ) -> torch.Tensor:
        """Predicted top features (B x T x H) from `features` (B x T x H, positions t) and `tokens`, the embedded
        tokens at t+1 with the mask and positions of positions t (`BackboneAdapter.embed` on the draft's cache); the
        layer runs as the backbone's adapter runs its blocks."""
        hidden = self.fc(torch.cat([features.to(tokens.hidden.dtype), tokens.hidden], dim=-1))
        return adapter.run_block(self.layer, StepState(hidden, tokens.token_mask, tokens.block_kwargs), cache)
