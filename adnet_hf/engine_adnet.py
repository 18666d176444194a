"""The step engine: runs a backbone step by step with its calculation units, in one of two passes.

- `full_depth`: every step for every item. Training fuses the step predictions under the halting distribution;
  `exit_policy="none"` and full-depth decoding return the last step's prediction.
- `exiting`: items (samples, or tokens of a causal LM) stop at the step their exit rule picks, and a sample whose
  items have all stopped leaves the batch, so the later blocks never run for it. With a key/value cache, the samples
  that left get the deeper layers' keys/values from their exit state (`generation_adnet`).

The engine is handed the backbone adapter, the blocks grouped into steps and the units; the task model's part is a
`StepHead`. FLOPs are counted by a `FlopsAccountant`, hidden states and attentions kept by a `Trace`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import PreTrainedConfig

from .backbones_adnet import BackboneAdapter, Flops, StepState
from .exits_adnet import ExitRule, HaltingDistribution, exit_decision
from .generation_adnet import exit_cache
from .sharding_adnet import LocalExits

EVERYONE = slice(None)  # every sample of the batch, as an index: FLOPs added for it need no index operation


@dataclass
class StepHead:
    """A task model's prediction at each variable step, as the engine calls it.

    predict: `predict(n, summary, hidden)`, variable step n's logits from its unit summary and block output.
    flops: FLOPs of one `predict` per item, for the estimate.
    loss: the unreduced task loss of a step's logits, taken as soon as the step has run (full depth only).
    keep_logits: return every step's logits (a causal LM's N x B x T x vocab is large). Without them, training's
        fused logits are detached.
    evidence: `evidence(logits, previous_logits, not_halted)`, what a step's prediction says about stopping there
        (`units_adnet.step_evidence`), for units whose halting layer reads it.
    """

    predict: Callable[[int, torch.Tensor | None, torch.Tensor], torch.Tensor]
    flops: float = 0.0
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    keep_logits: bool = True
    evidence: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | float], torch.Tensor] | None = None


@dataclass
class StepOutputs:
    """What a pass computed, for the full batch; `ADNetModelOutput` documents each field."""

    last_hidden_state: torch.Tensor | None
    logits: torch.Tensor | None
    halting_probs: torch.Tensor
    exit_steps: torch.LongTensor
    flops: torch.Tensor
    step_logits: torch.Tensor | None = None
    step_losses: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def scatter(
    tensor: torch.Tensor,
    active: torch.Tensor | slice,
    batch_size: int,
    exit_states: dict[torch.Size, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A tensor of the samples `active`, placed in a full-batch tensor whose other rows are the samples' exit states
    of the same shape (`exit_states`, keyed by the shape after the batch), or zeros."""
    if tensor.shape[0] == batch_size:
        return tensor
    fill = (exit_states or {}).get(tensor.shape[1:])
    full = tensor.new_zeros(batch_size, *tensor.shape[1:]) if fill is None else fill.clone()
    full[active] = tensor
    return full


class FlopsAccountant:
    """Estimated FLOPs per item (B, or B x T for per-token units), of the items still running.

    FLOPs are added up as numbers (`Flops`) while the same items run on the same tokens, and put on the items once
    that changes or `total` is read: a full-depth pass touches a tensor once, not at every block, unit and head.
    """

    def __init__(
        self,
        items: torch.Size,
        device: torch.device,
        per_token: bool,
        context_lengths: Callable[[StepState], torch.Tensor],
    ):
        self.per_token, self.context_lengths = per_token, context_lengths
        self._shape, self._device = items, device
        self._total: torch.Tensor | None = None
        self._active: torch.Tensor | slice | None = None
        self._done: torch.Tensor | None = None
        self._state: StepState | None = None
        self._items: torch.Tensor | float = 0.0
        self._flops = Flops()

    @property
    def total(self) -> torch.Tensor:
        self._flush()
        return self._filled(0.0) if self._total is None else self._total

    def _filled(self, value: float) -> torch.Tensor:
        return torch.full(self._shape, value, dtype=torch.float64, device=self._device)

    def add(self, active: torch.Tensor | slice, done: torch.Tensor | None, flops: torch.Tensor | float) -> None:
        """Add `flops` per item to the samples `active`, except their items that are `done` (None: none is)."""
        self._begin(active, done)
        self._items = self._items + flops

    def add_positions(
        self, active: torch.Tensor | slice, done: torch.Tensor | None, flops: Flops, state: StepState
    ) -> None:
        """Add `flops` (per real token and its context in `state`) to the samples `active`, except their items that
        are `done`."""
        self._begin(active, done, state)
        self._flops = self._flops + flops

    def _begin(self, active: torch.Tensor | slice, done: torch.Tensor | None, state: StepState | None = None) -> None:
        """Put what was added on the items first unless the same items (and tokens) still run."""
        same_tokens = (
            state is None
            or self._state is None
            or (state.token_mask is self._state.token_mask and state.block_kwargs is self._state.block_kwargs)
        )
        if active is not self._active or done is not self._done or not same_tokens:
            self._flush()
            self._active, self._done = active, done
        if state is not None:
            self._state = state

    def _flush(self) -> None:
        if self._active is None:
            return
        items, flops = self._items, self._flops
        if flops.tokens or flops.context:
            tokens = self._state.token_mask.to(torch.float64)
            per_token = flops.tokens * tokens
            if flops.context:
                per_token = per_token + flops.context * tokens * self.context_lengths(self._state)
            items = items + (per_token if self.per_token else per_token.sum(-1))
        items = items + flops.items
        if self._done is not None:
            items = (~self._done).double() * items
        self._place(items)
        self._active = self._done = self._state = None
        self._items, self._flops = 0.0, Flops()

    def _place(self, items: torch.Tensor | float) -> None:
        """Add `items` (FLOPs per item of the samples `_active`) to the total, created by the first."""
        if self._total is not None:
            self._total[self._active] += items
        elif isinstance(self._active, slice):  # every item: the total so far
            self._total = items if isinstance(items, torch.Tensor) else self._filled(items)
        else:
            self._total = self._filled(0.0)
            self._total[self._active] = items


class Trace:
    """The hidden states and attention weights asked for, with the backbone's own length and layout.

    Hidden states (when `hidden_blocks` is given): the embedding output, then the output of every block in
    `hidden_blocks` (every block of a transformer, the last block of each stage of a ResNet). Attentions: one entry
    per block. A sample that has left the batch is given its exit state in the later hidden states (zeros when a
    CNN's later stages differ in shape) and zero attention weights; `exit_steps` says which entries were computed.
    """

    def __init__(
        self,
        batch_size: int,
        hidden_blocks: list[int] | None,
        attention_records: list[torch.Tensor] | None,
        num_blocks: int,
    ):
        self.batch_size, self.hidden_blocks, self.num_blocks = batch_size, hidden_blocks, num_blocks
        self.hidden_states: list[torch.Tensor] | None = None if hidden_blocks is None else []
        self.records = attention_records
        self.attentions: list[torch.Tensor] = []

    def record(
        self,
        block: int,
        hidden: torch.Tensor,
        active: torch.Tensor | slice,
        exit_states: dict[torch.Size, torch.Tensor] | None = None,
    ) -> None:
        """After block `block` (-1: the embeddings) ran for the samples `active`."""
        if self.hidden_states is not None and (block < 0 or block in self.hidden_blocks):
            self.hidden_states.append(scatter(hidden, active, self.batch_size, exit_states))
        if self.records:
            self.attentions.extend(scatter(a, active, self.batch_size) for a in self.records)
            self.records.clear()

    def outputs(
        self,
        skipped_shape: Callable[[int], torch.Size] | None = None,
        exit_states: dict[torch.Size, torch.Tensor] | None = None,
    ) -> dict:
        """The recorded tuples, completed for the blocks that ran for no sample: their hidden state is the exit
        state of each sample of the shape `skipped_shape(block)` gives (zeros for the others), their attention
        weights are zero."""
        hidden_states = attentions = None
        if self.hidden_states is not None:
            skipped = self.hidden_blocks[len(self.hidden_states) - 1 :]
            hidden_states = (
                *self.hidden_states,
                *(self._exit_state(skipped_shape(block), exit_states or {}) for block in skipped),
            )
        if self.attentions:
            zeros = torch.zeros_like(self.attentions[-1])
            attentions = (*self.attentions, *[zeros] * (self.num_blocks - len(self.attentions)))
        return {"hidden_states": hidden_states, "attentions": attentions}

    def _exit_state(self, shape: torch.Size, exit_states: dict[torch.Size, torch.Tensor]) -> torch.Tensor:
        """Every sample's exit state of this shape (after the batch), zeros for the samples whose differs."""
        state = exit_states.get(shape)
        if state is not None:
            return state
        like = self.hidden_states[-1]
        return like.new_zeros(self.batch_size, *shape)


class StepEngine:
    """Runs `steps` (lists of backbone blocks) through `adapter`; the last `len(units)` steps carry a unit.

    `exit_sync`: how the exiting pass keeps processes in step (`sharding_adnet.exit_sync`).
    `layer_dropout`: LayerSkip's maximum layer dropout rate (training only: the model passes 0 otherwise)."""

    def __init__(
        self,
        adapter: BackboneAdapter,
        backbone_config: PreTrainedConfig,
        steps: list[list[nn.Module]],
        units: nn.ModuleList,
        per_token: bool,
        layers_per_step: int,
        exit_sync: LocalExits,
        layer_dropout: float = 0.0,
    ):
        self.adapter, self.backbone_config, self.steps, self.units = adapter, backbone_config, steps, units
        self.per_token, self.layers_per_step = per_token, layers_per_step
        self.exit_sync, self.layer_dropout = exit_sync, layer_dropout
        self.num_fixed_steps = len(steps) - len(units)
        # whether the halting units read the step predictions (`CalculationUnit.reads_evidence`)
        self.units_read_evidence = any(unit.reads_evidence for unit in units)

    def padding(self, state: StepState) -> torch.Tensor:
        """Items that are not real: padding tokens for per-token units, none for pooled ones."""
        if self.per_token:
            return state.token_mask == 0
        return torch.zeros(state.hidden.shape[0], dtype=torch.bool, device=state.hidden.device)

    def run_blocks(
        self, step: int, state: StepState, cache, finish_block: Callable[[int, torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, Flops]:
        """Step `step`'s output for the samples of `state`, and its estimated FLOPs per token.

        `finish_block(block_index, output)` gives the state the next block reads (and records it)."""
        hidden, flops = state.hidden, Flops()
        for offset, block in enumerate(self.steps[step]):
            index = step * self.layers_per_step + offset
            output, block_flops = self.run_block(
                block, index, StepState(hidden, state.token_mask, state.block_kwargs), cache
            )
            flops = flops + block_flops
            hidden = finish_block(index, output)
        return hidden, flops

    def step_output(self, step: int, state: StepState) -> torch.Tensor:
        """Step `step`'s output for the samples of `state`, with nothing recorded, counted or cached (a stand-in's)."""
        return self.run_blocks(step, state, None, lambda index, output: output)[0]

    def needs_predictions(self, rule: ExitRule) -> bool:
        """Whether exiting by `rule` needs the head's prediction at every variable step."""
        return rule.needs_predictions or self.units_read_evidence

    def run_block(self, block: nn.Module, index: int, state: StepState, cache) -> tuple[torch.Tensor, Flops]:
        """Block `index`'s output and FLOPs. Under layer dropout (LayerSkip, training only) each sample skips the
        block with its rate (`layer_dropout_rate`): it keeps its input, and the block runs for the others only;
        the FLOPs estimate, numbers shared by every item, still counts the block for all of them."""
        rate = self.layer_dropout and layer_dropout_rate(
            self.layer_dropout, index, sum(len(blocks) for blocks in self.steps)
        )
        if not rate:
            output = self.adapter.run_block(block, state, cache)
            return output, self.adapter.block_flops(block, output)
        if cache is not None:
            raise ValueError(
                "ADNetConfig.layer_dropout skips blocks per sample in training, which a key/value cache "
                "cannot follow: train without use_cache."
            )
        runs = (torch.rand(state.hidden.shape[0], device=state.hidden.device) >= rate).nonzero().squeeze(-1)
        if not runs.numel():
            return self._stand_in(block, state)
        output = self.adapter.run_block(block, state.select(runs), cache)
        return state.hidden.index_copy(0, runs, output), self.adapter.block_flops(block, output)

    def _stand_in(self, block: nn.Module, state: StepState) -> tuple[torch.Tensor, Flops]:
        """Every sample skips the block: it still runs, on one sample, its output weighted 0, so that every process
        runs and backpropagates through every block (a collective on sharded blocks, as `sharding_adnet`'s stand-in;
        DDP sees every parameter used). Nothing is counted; each sample keeps its input."""
        output = self.adapter.run_block(block, state.select(torch.arange(1, device=state.hidden.device)))
        return state.hidden + 0.0 * output.sum(), Flops()

    def run_unit(
        self,
        n: int,
        state: StepState,
        flops: FlopsAccountant,
        active: torch.Tensor | slice,
        done: torch.Tensor | None,
        head: StepHead | None = None,
        previous: torch.Tensor | None = None,
        not_halted: torch.Tensor | float = 1.0,
        halts: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Variable step n's unit on the step output in `state`: its summary, halting probabilities (None unless it
        `halts`) and, when a `head` is given, the step's prediction (made from the summary before the unit halts, so
        a unit that reads the evidence sees it, with the `previous` step's prediction and the mass `not_halted` so
        far)."""
        unit = self.units[n]
        positions = self.adapter.unit_view(state.hidden)
        summary = unit.summarise(positions, None if self.per_token else state.pooling_mask())
        per_position, halting_flops = unit.flops()
        per_summary = halting_flops if halts else 0.0
        if state.token_mask is None:  # every position is real (a CNN's feature map)
            per_summary += per_position * positions.shape[1]
        else:
            flops.add_positions(active, done, Flops(tokens=per_position), state)
        logits = evidence = None
        if head is not None:
            logits = head.predict(n, summary, state.hidden)
            flops.add(active, done, head.flops)
        flops.add(active, done, per_summary)
        if not halts:
            return summary, None, logits
        if unit.reads_evidence:
            evidence = head.evidence(logits, previous, not_halted)
        return summary, unit.halt(summary, positions, evidence), logits

    def full_depth(
        self, state: StepState, head: StepHead | None, trace: Trace, cache=None, fuse: bool = False
    ) -> StepOutputs:
        """Every step for every item. With a head, the units halt and the head predicts at every variable step only
        when something reads the step outputs (`fuse`, a step loss, kept step logits); otherwise only the last
        step's unit and head run, as the plain model runs its head once, and no halting distribution is returned.
        Without a head (`ADNetModel` alone) the units halt at every step, unless they read the predictions."""
        # pooled units have no padding items: at full depth nothing is masked for them
        padding, everyone = self.padding(state) if self.per_token else None, EVERYONE
        items = state.hidden.shape[:1] if padding is None else padding.shape
        flops = FlopsAccountant(items, state.hidden.device, self.per_token, self.adapter.context_lengths)
        distribution = HaltingDistribution()
        if head is None:
            halts = not self.units_read_evidence
        else:
            halts = fuse or head.loss is not None or head.keep_logits
        probs, step_logits, step_losses, logits, previous = [], [], [], None, None
        trace.record(-1, state.hidden, everyone)

        def finish_block(index: int, output: torch.Tensor) -> torch.Tensor:
            trace.record(index, output, everyone)
            return output

        for step in range(len(self.steps)):
            state.hidden, block_flops = self.run_blocks(step, state, cache, finish_block)
            flops.add_positions(everyone, padding, block_flops, state)
            n = step - self.num_fixed_steps
            last = n == len(self.units) - 1
            if n < 0 or not (halts or last and head is not None):
                continue
            summary, lambdas, prediction = self.run_unit(
                n, state, flops, everyone, padding, head, previous, distribution.not_halted, halts
            )
            if halts:
                probs.append(distribution.step(lambdas, last))
            if head is None:
                continue
            previous = prediction
            if head.loss is not None:
                step_losses.append(head.loss(prediction))
            if head.keep_logits:
                step_logits.append(prediction)
            logits = _fuse(logits, probs[-1], prediction, head.keep_logits) if fuse else prediction
        halting_probs = torch.stack(probs, dim=-1) if halts else None
        exit_steps = torch.full(items, len(self.steps), device=state.hidden.device)
        if padding is not None:
            halting_probs = None if halting_probs is None else halting_probs.masked_fill(padding.unsqueeze(-1), 0.0)
            exit_steps = exit_steps.masked_fill(padding, 0)
        return StepOutputs(
            last_hidden_state=state.hidden,
            logits=logits,
            halting_probs=halting_probs,
            exit_steps=exit_steps,
            flops=flops.total,
            step_logits=torch.stack(step_logits) if step_logits else None,
            step_losses=torch.stack(step_losses, dim=-1) if step_losses else None,
            **trace.outputs(),
        )

    def exiting(self, state: StepState, head: StepHead | None, rule: ExitRule, trace: Trace, cache=None) -> StepOutputs:
        """Each item stops at the step `rule` picks; samples whose items have all stopped leave the batch."""
        if self.needs_predictions(rule) and head is None:
            reason = "" if rule.needs_predictions else " (these halting units read them)"
            raise ValueError(
                f"exit_policy={rule.name!r} needs step predictions{reason}: use a task model, not ADNetModel."
            )
        return _ExitingPass(self, state, head, rule, trace, cache).run()


def layer_dropout_rate(maximum: float, block: int, num_blocks: int) -> float:
    """LayerSkip's rate for `block` (0-based) of `num_blocks`: `maximum * (2 ** (block / (num_blocks - 1)) - 1)`,
    rising exponentially with depth from 0 at the first block to `maximum` at the last (a lone block: `maximum`)."""
    if num_blocks == 1:
        return maximum
    return maximum * (2.0 ** (block / (num_blocks - 1)) - 1.0)


def _fuse(fused: torch.Tensor | None, probs: torch.Tensor, logits: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Training's prediction: the step logits summed under the halting distribution, one step at a time."""
    if not differentiable:
        probs, logits = probs.detach(), logits.detach()
    contribution = probs.unsqueeze(-1).to(logits.dtype) * logits
    return contribution if fused is None else fused + contribution


class _ExitingPass:
    """One forward pass with exits. `active` indexes the samples still in the batch, `done` their items that have
    stopped; every other tensor here is laid out for the full batch."""

    def __init__(
        self, engine: StepEngine, state: StepState, head: StepHead | None, rule: ExitRule, trace: Trace, cache
    ):
        self.engine, self.state, self.head, self.rule, self.trace = engine, state, head, rule, trace
        batch, device = state.hidden.shape[0], state.hidden.device
        self.padding = engine.padding(state)
        # with padding items, a sample can finish without any item stopping (all its tokens are padding)
        self.unpadded = not bool(self.padding.any())
        self.active = torch.arange(batch, device=device)
        self.done = self.padding
        self.exit_steps = torch.zeros(self.padding.shape, dtype=torch.long, device=device)
        self.halting = state.hidden.new_zeros(*self.padding.shape, len(engine.units))
        self.logits: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None  # the last step's predictions of the samples present
        self.exit_states: dict[torch.Size, torch.Tensor] = {}  # per shape: the samples that left, full batch
        self.last_block = -1  # the deepest block run for any sample
        self.distribution = HaltingDistribution()
        self.flops = FlopsAccountant(self.padding.shape, device, engine.per_token, engine.adapter.context_lengths)
        self.cache = exit_cache(cache, engine.adapter, state.block_kwargs, batch)
        self.sync = engine.exit_sync
        if self.cache.fills_after_exit and self.sync.in_step:
            raise NotImplementedError(
                "Exits with a key/value cache on sharded blocks: the cache of the tokens that "
                "exited is filled by calling the blocks' key/value projections outside the "
                "blocks, where FSDP / ZeRO-3 has not gathered them. Decode with "
                "exit_policy='none', or shard the model as one unit."
            )

    @property
    def none_left_yet(self) -> bool:
        """No sample has left the batch: `active` is every sample, in order (and no exit state is stored)."""
        return len(self.active) == self.padding.shape[0]

    @property
    def counted(self) -> torch.Tensor | slice:
        """The samples FLOPs are added for: `active`, or `EVERYONE` while it is every sample."""
        return EVERYONE if self.none_left_yet else self.active

    def run(self) -> StepOutputs:
        self.trace.record(-1, self.state.hidden, self.active)
        for step, blocks in enumerate(self.engine.steps):
            if not self.cache.fills_after_exit and not self.sync.any_running(self.active):
                break
            self.cache.begin_step(step * self.engine.layers_per_step, blocks, self.active, self.exit_hidden())
            if not self.active.numel():
                self.sync.stand_in(partial(self.engine.step_output, step))
                continue
            hidden = self._run_blocks(step)
            if step >= self.engine.num_fixed_steps:
                self._decide(step - self.engine.num_fixed_steps, step, hidden)
        skipped_shape = partial(
            self.engine.adapter.skipped_block_shape,
            self.engine.backbone_config,
            self.state.hidden.shape[1:],
            self.last_block,
        )
        return StepOutputs(
            last_hidden_state=self.exit_hidden(),
            logits=self.logits,
            halting_probs=self.halting,
            exit_steps=self.exit_steps,
            flops=self.flops.total,
            **self.trace.outputs(skipped_shape, self.exit_states),
        )

    def exit_hidden(self) -> torch.Tensor | None:
        """The exit state of every sample that has left, full batch; None when a CNN's samples left in stages whose
        feature maps differ in shape (or none has left)."""
        return next(iter(self.exit_states.values())) if len(self.exit_states) == 1 else None

    def _run_blocks(self, step: int) -> torch.Tensor:
        """One step for the active samples; their items that stopped keep their exit state through every block
        (CALM's state propagation: what later tokens attend to, and what the cache holds for them)."""
        entry = self.state.hidden

        def finish_block(index: int, output: torch.Tensor) -> torch.Tensor:
            if self.engine.per_token:
                output = torch.where(self.done.unsqueeze(-1), entry, output)
            self.trace.record(index, output, self.active, self.exit_states)
            self.last_block = index
            return output

        self.state.hidden, position_flops = self.engine.run_blocks(step, self.state, self.cache.view, finish_block)
        self.flops.add_positions(self.counted, self.done, position_flops, self.state)
        return self.state.hidden

    def _decide(self, n: int, step: int, hidden: torch.Tensor) -> None:
        """Variable step n: the unit, the rule's decision, the outputs of the items that stop."""
        # A rule that decides without the predictions (halting on units that do not read them) runs the head for
        # the items that stop only.
        head = self.head if self.engine.needs_predictions(self.rule) else None
        summary, lambdas, logits = self.engine.run_unit(
            n, self.state, self.flops, self.counted, self.done, head, self.previous, self.distribution.not_halted
        )
        self.previous = logits
        stop, probs = exit_decision(
            self.distribution, self.rule, lambdas, logits, n == len(self.engine.units) - 1, self.done
        )
        if self.unpadded and not bool(stop.any()):
            # nothing stops, so no sample finishes: only the halting probabilities to keep, and `done` stays the
            # same tensor, so the FLOPs of the next step are added up with this one's (`FlopsAccountant`)
            self.halting[self.active, ..., n] = probs
            return
        if self.none_left_yet and bool(stop.all()):
            self._all_leave(n, step, summary, hidden, logits, probs)
            return
        self.halting[self.active, ..., n] = probs
        self.exit_steps[self.active] = torch.where(stop, step + 1, self.exit_steps[self.active])
        if self.head is not None and (stop.any() or self.logits is None):  # allocated even if only padding stops
            self._keep_exit_logits(n, summary, hidden, logits, stop)
        self.done = self.done | stop
        self._drop_finished(hidden)

    def _all_leave(
        self,
        n: int,
        step: int,
        summary: torch.Tensor | None,
        hidden: torch.Tensor,
        logits: torch.Tensor | None,
        probs: torch.Tensor,
    ) -> None:
        """Every item of the whole batch stops at this step (always so at batch 1): this step's outputs are the
        pass's, as they are, with no scatter into the full batch."""
        self.halting[..., n] = probs
        self.exit_steps.fill_(step + 1)
        if self.head is not None:
            self.logits = self._stopping_logits(n, summary, hidden, logits, EVERYONE)
        self.exit_states[hidden.shape[1:]] = hidden
        self._last_samples_leave()

    def _last_samples_leave(self) -> None:
        """The batch is empty from now on; nothing but `active` is read once every sample has left."""
        self.sync.last_samples_leave(self.state)
        self.active, self.done = self.active[:0], self.done[:0]

    def _stopping_logits(
        self,
        n: int,
        summary: torch.Tensor | None,
        hidden: torch.Tensor,
        logits: torch.Tensor | None,
        stop: torch.Tensor | slice,
    ) -> torch.Tensor:
        """The prediction of the items that `stop` now, running the head for them alone if the rule decided
        without it."""
        if logits is not None:
            return logits[stop]
        self.flops.add(
            self.counted, self.done, self.head.flops * (stop.double() if isinstance(stop, torch.Tensor) else 1.0)
        )
        return self.head.predict(n, None if summary is None else summary[stop], hidden[stop])

    def _keep_exit_logits(
        self,
        n: int,
        summary: torch.Tensor | None,
        hidden: torch.Tensor,
        logits: torch.Tensor | None,
        stop: torch.Tensor,
    ) -> None:
        """Store the prediction of the items that stop now in the full-batch logits."""
        logits = self._stopping_logits(n, summary, hidden, logits, stop)
        if self.logits is None:
            self.logits = logits.new_zeros(*self.padding.shape, logits.shape[-1])
        index = stop.nonzero(as_tuple=True)
        self.logits[(self.active[index[0]], *index[1:])] = logits

    def _drop_finished(self, hidden: torch.Tensor) -> None:
        """Samples whose items have all stopped leave the batch: no later block runs for them."""
        finished = self.done.reshape(self.done.shape[0], -1).all(-1)
        if not finished.any():
            return
        keep = (~finished).nonzero().squeeze(-1)
        shape = hidden.shape[1:]
        if shape not in self.exit_states:
            self.exit_states[shape] = hidden.new_zeros(self.padding.shape[0], *shape)
        self.exit_states[shape][self.active[finished]] = hidden[finished]
        if not keep.numel():
            self._last_samples_leave()
            return
        self.active, self.done = self.active[keep], self.done[keep]
        self.state = self.state.select(keep)
        self.distribution.select(keep)
        self.rule.select(keep)
        if self.previous is not None:
            self.previous = self.previous[keep]
