"""Exits on sharded blocks: every process must run every block, even when its own samples have all exited.

Under FSDP (one unit per block, or finer) or DeepSpeed ZeRO-3, running a block is a collective: its parameters are
all-gathered from every process first. A process whose batch has exited would stop issuing those all-gathers while
the others still wait on them (a hang, or wrong weights for the next batch). So, on sharded blocks, the processes
agree after each step, with one all-reduce of a flag, whether any sample anywhere still runs; a process with none
runs the step's blocks on a one-sample stand-in (outputs discarded, nothing recorded or counted) to take part in
the collectives, and every process leaves the loop at the same step. Exits then save compute, never communication.

Whole-model FSDP (one unit), DDP and a single process gather nothing inside a step: each process exits on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .backbones_adnet import StepState


class LocalExits:
    """Each process stops when its own samples have all exited: no collective runs inside a step."""

    in_step = False  # whether the processes are kept in step

    def any_running(self, active: torch.Tensor) -> bool:
        """Whether the pass goes on: some sample (here, or with sharding on any process) is still in the batch."""
        return bool(active.numel())

    def last_samples_leave(self, state: StepState) -> None:
        """The samples of `state` (exit states, after a step) are the last to leave this process's batch."""

    def stand_in(self, run: Callable[[StepState], torch.Tensor]) -> None:
        """A step runs on other processes while no sample runs here; `run` gives its blocks' output for a state."""


class ShardedExits(LocalExits):
    """Keeps the processes in step when the blocks are sharded (see the module docstring)."""

    in_step = True

    def __init__(self):
        self.placeholder: StepState | None = None

    def any_running(self, active: torch.Tensor) -> bool:
        return any_process(bool(active.numel()), active.device)

    def last_samples_leave(self, state: StepState) -> None:
        self.placeholder = state.select(torch.arange(1, device=state.hidden.device))

    def stand_in(self, run: Callable[[StepState], torch.Tensor]) -> None:
        self.placeholder.hidden = run(self.placeholder)


def any_process(flag: bool, device: torch.device) -> bool:
    """`flag` or'ed over every process: one all-reduce (MAX) of a one-element tensor."""
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def blocks_are_sharded(blocks: list[nn.Module]) -> bool:
    """Whether running a block gathers its parameters from other processes, so exits must keep processes in step.

    True when a block, or a module inside it, is an FSDP2 (`fully_shard`) or FSDP1 unit, or its parameters are
    DeepSpeed ZeRO-3 partitions. A model sharded as one unit gathers everything before the first block, so its
    blocks are not. `ADNetModel.sync_exits=None` (the default) decides with it in a distributed run.

    Args:
        blocks (list[nn.Module]): The backbone's blocks, e.g.
            `model.base_model.adapter.blocks(model.base_model.backbone)`.
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    units = (FSDPModule, FullyShardedDataParallel)
    return any(
        isinstance(module, units) or any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))
        for block in blocks
        for module in block.modules()
    )


def exit_sync(steps: list[list[nn.Module]], sync_exits: bool | None) -> LocalExits:
    """How the exiting pass keeps processes in step: `sync_exits` True or False forces it, None detects sharded
    blocks. One process never synchronises."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return LocalExits()
    if sync_exits is None:
        sync_exits = blocks_are_sharded([block for blocks in steps for block in blocks])
    return ShardedExits() if sync_exits else LocalExits()
