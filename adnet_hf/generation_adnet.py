"""Per-token exit with a key/value cache: the cache seen by the samples still in the batch.

A token that exits at step n still needs keys/values in the deeper layers, because later tokens attend to it. They
are filled by passing its exit hidden state through those layers' key/value projections only (CALM's state
propagation): the same keys/values a full-sequence forward gives an exited token, whose hidden state stays frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backbones_adnet import select_batch

KeyValues = tuple[torch.Tensor, torch.Tensor]


class SubBatchCache:
    """A key/value cache as the blocks of the still-active samples see it.

    While every sample is active, updates go straight to the real cache. Once some have left the batch, the blocks
    run on the active samples only: each of their updates is completed with the keys/values `propagate[layer_idx]()`
    computes for the samples that left, the real cache (dynamic or static) is updated for the whole batch at once,
    and the active samples' rows of what it returns go back to the block.
    """

    def __init__(self, cache, batch_size: int):
        self.cache, self.batch_size = cache, batch_size
        self.active: torch.Tensor | None = None
        self.exited: torch.Tensor | None = None
        self.propagate: dict[int, Callable[[], KeyValues]] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(layer_idx)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.active is None:
            return self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        keys, values = self.update_whole_batch(layer_idx, (key_states, value_states), *args, **kwargs)
        return keys[self.active], values[self.active]

    def update_whole_batch(self, layer_idx: int, active: KeyValues | None, *args, **kwargs) -> KeyValues:
        """Update layer `layer_idx` of the real cache with the `active` samples' new keys/values (None: no sample is
        active) and the propagated ones of the samples that left."""
        propagated = self.propagate[layer_idx]()
        full = []
        for index, exited_states in enumerate(propagated):
            states = exited_states.new_empty(self.batch_size, *exited_states.shape[1:])
            states[self.exited] = exited_states
            if active is not None:
                states[self.active] = active[index]
            full.append(states)
        return self.cache.update(*full, layer_idx, *args, **kwargs)


class NoExitCache:
    """The exiting pass without a key/value cache: nothing to keep, so the pass ends once every sample exited."""

    view = None
    fills_after_exit = False

    def begin_step(
        self, first_layer: int, blocks: list, active: torch.Tensor, exit_hidden: torch.Tensor | None
    ) -> None:
        """Before a step's blocks run for the samples at indices `active`; `exit_hidden` holds (batch first) the exit
        state of every sample that has left the batch."""


class PropagatedExitCache(NoExitCache):
    """The exiting pass with a key/value cache: the blocks see a `SubBatchCache` that gives the samples that left
    the batch the keys/values their exit state propagates to, down to the last layer."""

    fills_after_exit = True

    def __init__(self, cache, adapter, block_kwargs: dict, batch_size: int):
        self.view = SubBatchCache(cache, batch_size)
        self.adapter, self.block_kwargs = adapter, block_kwargs

    def begin_step(
        self, first_layer: int, blocks: list, active: torch.Tensor, exit_hidden: torch.Tensor | None
    ) -> None:
        view = self.view
        if active.numel() == view.batch_size:  # every sample runs: the blocks update the real cache themselves
            view.active = None
            return
        view.active, view.exited = active, complement(active, view.batch_size)
        hidden, kwargs = exit_hidden[view.exited], select_batch(self.block_kwargs, view.exited)
        view.propagate = {
            first_layer + offset: lambda block=block: self.adapter.kv_projection(block, hidden, kwargs)
            for offset, block in enumerate(blocks)
        }
        if not active.numel():  # no block runs: only the propagated keys/values are left to store
            for layer_idx in view.propagate:
                view.update_whole_batch(layer_idx, None)


def exit_cache(cache, adapter, block_kwargs: dict, batch_size: int) -> NoExitCache:
    """How the exiting pass keeps `cache` (None: there is none to keep)."""
    return NoExitCache() if cache is None else PropagatedExitCache(cache, adapter, block_kwargs, batch_size)


def complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    """The indices in range(size) that are not in `indices`."""
    keep = torch.ones(size, dtype=torch.bool, device=indices.device)
    keep[indices] = False
    return keep.nonzero().squeeze(-1)
