"""Per-token exit with a key/value cache: the cache seen by the samples still in the batch.

A token that exits at step n still needs keys/values in the deeper layers, because later tokens attend to it. They
are filled by passing its exit hidden state through those layers' key/value projections only (CALM's state
propagation): the same keys/values a full-sequence forward gives an exited token, whose hidden state stays frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backbones_adnet import select_batch


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


class NoExitCache:
    """The exiting pass without a key/value cache: nothing to keep, so the pass ends once every sample exited."""

    view = None
    fills_after_exit = False

    def begin_step(self, active: torch.Tensor) -> None:
        """Before a step's blocks run for the samples at indices `active`."""

    def end_step(self, first_layer: int, blocks: list, active: torch.Tensor, exit_hidden: torch.Tensor) -> None:
        """After them: `exit_hidden` holds (batch first) the exit state of every sample that has left the batch."""


class PropagatedExitCache(NoExitCache):
    """The exiting pass with a key/value cache: the blocks see a `SubBatchCache`, and after every step the samples
    that have left the batch get the keys/values their exit state propagates to, down to the last layer."""

    fills_after_exit = True

    def __init__(self, cache, adapter, block_kwargs: dict, batch_size: int):
        self.view = SubBatchCache(cache)
        self.adapter, self.block_kwargs, self.batch_size = adapter, block_kwargs, batch_size

    def begin_step(self, active: torch.Tensor) -> None:
        self.view.active = None if active.numel() == self.batch_size else active

    def end_step(self, first_layer: int, blocks: list, active: torch.Tensor, exit_hidden: torch.Tensor) -> None:
        if self.view.active is None:  # every sample ran: the blocks updated the real cache themselves
            return
        exited = complement(active, self.batch_size)
        hidden, kwargs = exit_hidden[exited], select_batch(self.block_kwargs, exited)
        for offset, block in enumerate(blocks):
            self.view.commit(first_layer + offset, self.batch_size, exited,
                             lambda block=block: self.adapter.kv_projection(block, hidden, kwargs))


def exit_cache(cache, adapter, block_kwargs: dict, batch_size: int) -> NoExitCache:
    """How the exiting pass keeps `cache` (None: there is none to keep)."""
    return NoExitCache() if cache is None else PropagatedExitCache(cache, adapter, block_kwargs, batch_size)


def complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    """The indices in range(size) that are not in `indices`."""
    keep = torch.ones(size, dtype=torch.bool, device=indices.device)
    keep[indices] = False
    return keep.nonzero().squeeze(-1)
