"""Per-token exit with a key/value cache: the cache seen by the samples still in the batch.

A token that exits at step n still needs keys/values in the deeper layers, because later tokens attend to it. They
are filled by passing its exit hidden state through those layers' key/value projections only (CALM's state
propagation): the same keys/values a full-sequence forward gives an exited token, whose hidden state stays frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SubBatchCache:
    """A key/value cache as the blocks of the still-active samples see it.

    While every sample is active, updates go straight to the real cache. Once some have exited, the blocks run on
    the active samples only: their new keys/values wait in `pending` (and are returned joined with those samples'
    past), until `commit` adds the exited samples' propagated keys/values and grows the real cache for the whole
    batch at once.
    """

    def __init__(self, cache):
        self.cache = cache
        self.active: torch.Tensor | None = None
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(layer_idx)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.active is None:
            return self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        self.pending[layer_idx] = (key_states, value_states)
        if self.cache.get_seq_length(layer_idx) == 0:
            return key_states, value_states
        layer = self.cache.layers[layer_idx]
        return (torch.cat([layer.keys[self.active], key_states], dim=-2),
                torch.cat([layer.values[self.active], value_states], dim=-2))

    def commit(self, layer_idx: int, batch_size: int, exited: torch.Tensor,
               propagate: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Grow layer `layer_idx` of the real cache with the active samples' pending keys/values and, for the
        samples at indices `exited`, the keys/values `propagate()` computes from their exit hidden state."""
        exited_key, exited_value = propagate()
        full_key = exited_key.new_empty(batch_size, *exited_key.shape[1:])
        full_value = exited_value.new_empty(batch_size, *exited_value.shape[1:])
        full_key[exited], full_value[exited] = exited_key, exited_value
        if layer_idx in self.pending:
            full_key[self.active], full_value[self.active] = self.pending.pop(layer_idx)
        self.cache.update(full_key, full_value, layer_idx)
