"""ADNet models: calculation units with learned halting on a Transformers backbone, run step by step.

Training runs every step and fuses them under the halting distribution. Inference stops each sample (each token,
for a causal LM) at its exit step; samples that have exited leave the batch, so the later blocks never run for them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging
from transformers.utils.output_capturing import OutputRecorder

from .backbones_adnet import StepState, backbone_adapter, matmul_weights, select_batch
from .configuration_adnet import ADNetConfig
from .generation_adnet import SubBatchCache
from .losses_adnet import IGNORE_INDEX, build_loss, resolve_problem_type, task_loss
from .units_adnet import CalculationUnit, ExitRule, halting_distribution

logger = logging.get_logger(__name__)

# `step_head(n, summary, hidden)`: the prediction of variable step n from its unit summary and block output.
StepHead = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
# `step_loss(logits)`: the unreduced task loss of one step's prediction, computed as soon as the step has run.
StepLoss = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ADNetModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`, or the CNN's feature map):
        The block output at each sample's exit step; `None` when a CNN's samples exit in stages whose feature maps
        differ in shape.
    logits (`torch.Tensor` of shape `(*items, num_labels)`):
        The prediction at each item's exit step (training: the predictions fused under the halting distribution).
        Items are samples, or batch x tokens for a causal LM. `None` without a step head.
    step_logits (`torch.Tensor` of shape `(num_variable_steps, *items, num_labels)`):
        Every variable step's prediction; in training and with `exit_policy="none"` only.
    step_losses (`torch.Tensor` of shape `(*items, num_variable_steps)`):
        Every variable step's unreduced task loss, when a `step_loss` was given (full depth only).
    halting_probs (`torch.Tensor` of shape `(*items, num_variable_steps)`):
        The halting distribution `p_n`. At inference with exits, the exit step takes the mass not yet halted and
        the steps after it get 0, so each row still sums to 1.
    exit_steps (`torch.LongTensor` of shape `items`):
        Backbone steps executed for each item, fixed steps included (0 for padding tokens).
    executed_layers (`torch.LongTensor` of shape `items`): backbone blocks executed for each item.
    flops (`torch.Tensor` of shape `items`): estimated FLOPs each item used in the blocks it ran, the units and the
        step predictions (matrix products and attention; a sample's real tokens only, as if it ran alone).
    cache (`Cache`): the key/value cache, when one was passed or `use_cache=True`.
    hidden_states (`tuple(torch.Tensor)`): the embedding output and each executed step's output (full batch;
        zeros for samples that had left the batch).
    attentions (`tuple(torch.Tensor)`): each executed block's attention weights, laid out like `hidden_states`.
    """

    last_hidden_state: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    step_logits: torch.Tensor | None = None
    step_losses: torch.Tensor | None = None
    halting_probs: torch.Tensor | None = None
    exit_steps: torch.LongTensor | None = None
    executed_layers: torch.LongTensor | None = None
    flops: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ADNetSequenceClassifierOutput(ModelOutput):
    r"""
    Output of [`ADNetForSequenceClassification`] and [`ADNetForImageClassification`].

    loss (`torch.Tensor` of shape `()`): the configured ADNet loss (GPSL by default), when `labels` are given.
    logits (`torch.Tensor` of shape `(batch_size, num_labels)`): the prediction at each sample's exit step
        (training: fused under the halting distribution).
    step_logits (`torch.Tensor` of shape `(num_variable_steps, batch_size, num_labels)`): each variable step's
        prediction (training and `exit_policy="none"`).
    halting_probs (`torch.Tensor` of shape `(batch_size, num_variable_steps)`): the halting distribution.
    exit_steps (`torch.LongTensor` of shape `(batch_size,)`): backbone steps executed per sample.
    executed_layers (`torch.LongTensor` of shape `(batch_size,)`): backbone blocks executed per sample.
    flops (`torch.Tensor` of shape `(batch_size,)`): estimated FLOPs per sample (see `ADNetModelOutput`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    step_logits: torch.Tensor | None = None
    halting_probs: torch.Tensor | None = None
    exit_steps: torch.LongTensor | None = None
    executed_layers: torch.LongTensor | None = None
    flops: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ADNetCausalLMOutput(ModelOutput):
    r"""
    Output of [`ADNetForCausalLM`]. Items are tokens: `logits` is `(batch_size, seq_len, vocab_size)`,
    `halting_probs` `(batch_size, seq_len, num_variable_steps)`, `exit_steps`, `executed_layers` and `flops`
    `(batch_size, seq_len)`.
    `loss` averages over the predicted tokens whose label is not -100.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    step_logits: torch.Tensor | None = None
    halting_probs: torch.Tensor | None = None
    exit_steps: torch.LongTensor | None = None
    executed_layers: torch.LongTensor | None = None
    flops: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class ADNetPreTrainedModel(PreTrainedModel):
    config: ADNetConfig
    config_class = ADNetConfig
    base_model_prefix = "adnet"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Units and output layers only: the backbone is a sub-model and keeps its own (or loaded) weights."""
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)

    @classmethod
    def from_backbone(cls, name_or_path: str, backbone_kwargs: dict | None = None, **config_overrides):
        """Wrap a pretrained backbone checkpoint (local folder or Hub id) and load its weights unchanged.

        `backbone_kwargs` go to the backbone's `from_pretrained` (e.g. `dtype`, `gguf_file`, `attn_implementation`);
        `config_overrides` set `ADNetConfig` fields such as `num_labels` or `exit_policy`.
        """
        pretrained = cls._load_pretrained_backbone(name_or_path, **(backbone_kwargs or {}))
        model = cls(ADNetConfig(backbone_config=pretrained.config, **config_overrides))
        model._copy_pretrained_weights(pretrained)
        model.config._name_or_path = str(name_or_path)
        return model.to(pretrained.dtype)

    @staticmethod
    def _load_pretrained_backbone(name_or_path: str, **kwargs) -> PreTrainedModel:
        from transformers import AutoModel

        return AutoModel.from_pretrained(name_or_path, **kwargs)

    def _copy_pretrained_weights(self, pretrained: PreTrainedModel) -> None:
        self.base_model.load_backbone_weights(pretrained)

    def freeze_full_depth(self) -> None:
        """Freeze everything the last step's prediction reads: the backbone, the last unit, its output layer (or
        the LM head). Training then moves only the earlier steps' units (and their own output layers, when not
        shared), so full-depth outputs stay exactly as loaded.

        This is DeeBERT's second stage: exits added to a model fine-tuned at full depth (e.g. with
        `loss_type="last"`) keep that model's full-depth accuracy, which joint training of all steps can lower.
        """
        self.requires_grad_(False)
        self.base_model.units[:-1].requires_grad_(True)
        output_layers = getattr(self, "output_layers", None)
        if output_layers is not None and len(output_layers) > 1:
            output_layers[:-1].requires_grad_(True)


class ADNetModel(ADNetPreTrainedModel):
    """The backbone and one calculation unit per variable step; runs them with or without exits.

    `per_token=True` gives causal-LM units (a halting probability per token, no pooling over the sequence).
    """

    def __init__(self, config: ADNetConfig, per_token: bool = False):
        super().__init__(config)
        self.adapter = backbone_adapter(config.backbone_config)
        self.per_token = per_token
        self.backbone = self.adapter.build(config.backbone_config)
        sizes = self.adapter.block_sizes(config.backbone_config)
        step_sizes = [sizes[(s + 1) * config.layers_per_step - 1] for s in range(config.num_steps)]
        variable_sizes = step_sizes[config.num_fixed_steps :]
        self.units = nn.ModuleList(
            CalculationUnit(size, config.unit_hidden_size, per_token, halts=n < len(variable_sizes) - 1)
            for n, size in enumerate(variable_sizes)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def load_backbone_weights(self, pretrained: PreTrainedModel) -> None:
        """Copy a pretrained backbone's weights into `self.backbone`; every backbone weight must be covered."""
        missing, unexpected = self.backbone.load_state_dict(pretrained.state_dict(), strict=False)
        if missing:
            raise ValueError(f"The pretrained backbone lacks weights the ADNet backbone needs: {missing}")
        if unexpected:
            logger.info(f"Backbone weights not used by ADNet (e.g. the pooler): {unexpected}")

    def step_blocks(self) -> list[list[nn.Module]]:
        """The backbone's blocks grouped into steps of `layers_per_step`."""
        blocks = self.adapter.blocks(self.backbone)
        size = self.config.layers_per_step
        return [blocks[i : i + size] for i in range(0, len(blocks), size)]

    def run_step(self, blocks: list[nn.Module], state: StepState, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's output and its estimated FLOPs at each position (B x T)."""
        hidden, flops = state.hidden, 0.0
        for block in blocks:
            block_state = StepState(hidden, state.token_mask, state.block_kwargs)
            hidden = self.adapter.run_block(block, block_state, cache)
            flops = flops + self.adapter.block_flops(block, block_state, hidden)
        return hidden, flops

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        cache=None,
        exit_policy: str | None = None,
        exit_threshold: float | int | None = None,
        step_head: StepHead | None = None,
        step_loss: StepLoss | None = None,
        keep_step_logits: bool = True,
        step_head_flops: float = 0.0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ADNetModelOutput:
        r"""
        exit_policy (`str`, *optional*): overrides `config.exit_policy` for this call (inference only; training
            always runs every step).
        step_head (`Callable`, *optional*): `step_head(n, summary, hidden)` returns variable step n's prediction;
            the task models pass their output layer. The `confidence` and `patience` policies need it.
        step_loss (`Callable`, *optional*): `step_loss(logits)` returns a step's unreduced task loss; at full depth
            each step's loss is taken right away, so `keep_step_logits=False` need not hold every step's logits
            (a causal LM's N x B x T x vocab). Without kept step logits, training's fused `logits` are detached.
        step_head_flops (`float`): FLOPs of one `step_head` call per item, for the `flops` estimate.
        cache (`Cache`, *optional*): a key/value cache (causal LMs). With exits, the tokens that exited get the
            deeper layers' keys/values from their exit hidden state (CALM's state propagation).
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                  "position_ids": position_ids, "inputs_embeds": inputs_embeds, "pixel_values": pixel_values}
        state = self.adapter.embed(self.backbone, {k: v for k, v in inputs.items() if v is not None}, cache)
        policy = self._resolve_policy(exit_policy)
        run = _AdaptiveRun(self, state, policy, step_head, bool(output_hidden_states), cache, step_loss,
                           keep_step_logits, step_head_flops, exit_threshold)
        with _recording_attentions(self.backbone, bool(output_attentions)) as attentions:
            run.loop(attentions)
        return run.output()

    def _resolve_policy(self, exit_policy: str | None) -> str:
        policy = exit_policy or self.config.exit_policy
        if policy not in ("halting", "confidence", "patience", "none"):
            raise ValueError(f"exit_policy must be one of 'halting', 'confidence', 'patience', 'none', got {policy!r}")
        return "train" if self.training else policy


def _complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    """The indices in range(size) that are not in `indices`."""
    keep = torch.ones(size, dtype=torch.bool, device=indices.device)
    keep[indices] = False
    return keep.nonzero().squeeze(-1)


@contextmanager
def _recording_attentions(backbone: PreTrainedModel, enabled: bool):
    """Collect the attention weights of every attention module the backbone declares as recordable."""
    records: list[torch.Tensor] = []
    if not enabled:
        yield None
        return
    spec = type(backbone)._can_record_outputs.get("attentions") if type(backbone)._can_record_outputs else None
    if spec is None:
        raise ValueError(f"output_attentions is not available for a {backbone.config.model_type} backbone")
    if backbone.config._attn_implementation != "eager":
        raise ValueError("output_attentions needs the eager attention implementation: load the model with "
                         "attn_implementation='eager'")
    recorder = spec if isinstance(spec, OutputRecorder) else OutputRecorder(spec, index=1)
    handles = [
        module.register_forward_hook(lambda _m, _i, out: records.append(out[recorder.index]))
        for name, module in backbone.named_modules()
        if isinstance(module, recorder.target_class)
        and (recorder.layer_name is None or name.endswith(recorder.layer_name))
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


class _AdaptiveRun:
    """One forward pass through the steps: runs blocks and units, applies the exit rule, gathers outputs.

    Items are samples (pooled units) or batch x tokens (per-token units). A sample leaves the batch once all its
    items have exited. An exited token of a sample still in the batch keeps its exit hidden state in the deeper
    blocks (CALM's state propagation), so later tokens attend to keys/values computed from it.
    """

    def __init__(self, model: ADNetModel, state: StepState, policy: str, step_head: StepHead | None,
                 keep_hidden_states: bool, cache, step_loss: StepLoss | None = None, keep_step_logits: bool = True,
                 step_head_flops: float = 0.0, exit_threshold=None):
        self.model, self.config, self.state, self.head, self.cache = model, model.config, state, step_head, cache
        self.step_loss, self.keep_step_logits, self.step_head_flops = step_loss, keep_step_logits, step_head_flops
        self.training = policy == "train"
        self.full_depth = policy in ("train", "none")
        # with a cache and exits, blocks see the cache through a view that fills exited samples' keys/values
        self.cache_view = SubBatchCache(cache) if cache is not None and not self.full_depth else cache
        settings = {"halting": self.config.halting_epsilon, "confidence": self.config.confidence_threshold,
                    "patience": self.config.patience}
        if exit_threshold is not None and policy in settings:
            settings[policy] = exit_threshold
        self.rule = ExitRule("none" if self.full_depth else policy, settings["halting"], settings["confidence"],
                             settings["patience"], self.config.problem_type)
        batch, device = state.hidden.shape[0], state.hidden.device
        self.all_block_kwargs = state.block_kwargs
        self.active = torch.arange(batch, device=device)
        self.padding = state.token_mask == 0 if model.per_token else torch.zeros(batch, dtype=torch.bool, device=device)
        self.done = self.padding
        self.exit_steps = torch.zeros(self.padding.shape, dtype=torch.long, device=device)
        self.flops = torch.zeros(self.padding.shape, dtype=torch.float64, device=device)
        self.halting: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None
        self.exit_shapes_differ = False
        self.lambdas: list[torch.Tensor] = []
        self.step_logits: list[torch.Tensor] = []
        self.step_losses: list[torch.Tensor] = []
        self.fused_not_halted: torch.Tensor | float = 1.0
        self.hidden_states: list[torch.Tensor] | None = [] if keep_hidden_states else None
        self.attentions: list[torch.Tensor] = []
        self._record_hidden(state.hidden)

    def loop(self, attention_records: list[torch.Tensor] | None) -> None:
        fixed, num_variable = self.config.num_fixed_steps, self.config.num_variable_steps
        for step, blocks in enumerate(self.model.step_blocks()):
            if self.active.numel() == 0:
                if not isinstance(self.cache_view, SubBatchCache):
                    break
                self._commit_cache(step, blocks)  # everyone has exited: only propagated keys/values
                continue
            hidden = self._run_step(step, blocks)
            self._record_hidden(hidden)
            if attention_records is not None:
                self.attentions.extend(self._scatter(a) for a in attention_records)
                attention_records.clear()
            n = step - fixed
            if self.cache is not None and self.full_depth:  # full-depth generation: only the last step predicts
                if n == num_variable - 1 and self.head is not None:
                    self.logits = self.head(n, None, hidden)
                    self._count_item_flops(hidden.new_full(hidden.shape[:2], self.step_head_flops))
            elif n >= 0:
                self._variable_step(n, step, hidden, last=n == num_variable - 1)

    def _run_step(self, step: int, blocks: list[nn.Module]) -> torch.Tensor:
        """Run one step's blocks on the active samples; exited tokens keep their exit state (per-token units)."""
        if isinstance(self.cache_view, SubBatchCache):
            everyone = self.active.numel() == self.padding.shape[0]
            self.cache_view.active = None if everyone else self.active
        hidden, flops = self.model.run_step(blocks, self.state, self.cache_view)
        if isinstance(self.cache_view, SubBatchCache):
            self._commit_cache(step, blocks)
        if self.model.per_token and not self.full_depth:
            hidden = torch.where(self.done.unsqueeze(-1), self.state.hidden, hidden)
        self._count_flops(flops)
        self.state.hidden = hidden
        return hidden

    def _count_flops(self, position_flops: torch.Tensor, per_item: float = 0.0) -> None:
        """Add FLOPs per position (B x T) and per item to the items still running."""
        flops = position_flops if self.model.per_token else position_flops.sum(-1)
        self._count_item_flops(flops + per_item)

    def _count_item_flops(self, flops: torch.Tensor) -> None:
        """Add FLOPs per item (B, or B x T) to the items still running."""
        self.flops[self.active] += flops.masked_fill(self.done, 0.0).to(self.flops.dtype)

    def _commit_cache(self, step: int, blocks: list[nn.Module]) -> None:
        """Give the samples that have left the batch the keys/values their exit state propagates to."""
        view = self.cache_view
        if view.active is None and self.active.numel() == self.padding.shape[0]:
            return
        view.active = self.active
        exited = _complement(self.active, self.padding.shape[0])
        hidden, kwargs = self.last_hidden[exited], select_batch(self.all_block_kwargs, exited)
        first = step * self.config.layers_per_step
        for offset, block in enumerate(blocks):
            view.commit(first + offset, self.padding.shape[0], exited,
                        lambda block=block: self.model.adapter.kv_projection(block, hidden, kwargs))

    def _variable_step(self, n: int, step: int, hidden: torch.Tensor, last: bool) -> None:
        unit = self.model.units[n]
        positions = self.model.adapter.unit_view(hidden)
        summary, lambdas = unit(positions, None if self.model.per_token else self.state.token_mask)
        # the halting rule needs no prediction to decide: the head then runs only for the items that stop
        predict_all = self.head is not None and (self.full_depth or self.rule.needs_predictions)
        logits = self.head(n, summary, hidden) if predict_all else None
        real = self.state.token_mask if self.state.token_mask is not None else positions.new_ones(positions.shape[:2])
        per_position, per_summary = unit.flops()
        head_flops = self.step_head_flops if predict_all else 0.0
        self._count_flops(per_position * real.to(positions.dtype), per_summary + head_flops)
        if self.full_depth:
            self.lambdas.append(lambdas)
            if logits is not None:
                self._keep_full_depth_step(lambdas, logits)
            return
        not_halted = torch.ones_like(lambdas) if self.rule.not_halted is None else self.rule.not_halted
        stop = (self.rule.step(lambdas, logits) | last) & ~self.done
        probs = torch.where(stop, not_halted, not_halted * lambdas).masked_fill(self.done, 0.0)
        if self.halting is None:
            self.halting = probs.new_zeros(*self.padding.shape, self.config.num_variable_steps)
        self.halting[self.active, ..., n] = probs
        self.exit_steps[self.active] = torch.where(stop, step + 1, self.exit_steps[self.active])
        if self.head is not None and stop.any():
            self._keep_exit_logits(n, summary, hidden, logits, stop)
        self.done = self.done | stop
        self._drop_finished(hidden)

    def _keep_exit_logits(self, n: int, summary: torch.Tensor | None, hidden: torch.Tensor,
                          logits: torch.Tensor | None, stop: torch.Tensor) -> None:
        """Store the prediction of the items that stop now, running the head for them alone if not yet run."""
        if logits is None:
            logits = self.head(n, None if summary is None else summary[stop], hidden[stop])
            self._count_item_flops(self.step_head_flops * stop.to(self.flops.dtype))
        else:
            logits = logits[stop]
        if self.logits is None:
            self.logits = logits.new_zeros(*self.padding.shape, logits.shape[-1])
        index = stop.nonzero(as_tuple=True)
        self.logits[(self.active[index[0]], *index[1:])] = logits

    def _keep_full_depth_step(self, lambdas: torch.Tensor, logits: torch.Tensor) -> None:
        """Take the step's loss now and fold its prediction into the output logits (fused in training)."""
        if self.step_loss is not None:
            self.step_losses.append(self.step_loss(logits))
        if self.keep_step_logits:
            self.step_logits.append(logits)
        if not self.training:
            self.logits = logits
            return
        weight = self.fused_not_halted * lambdas  # the last step's lambda is 1: it takes what is left
        self.fused_not_halted = self.fused_not_halted * (1 - lambdas)
        if not self.keep_step_logits:
            weight, logits = weight.detach(), logits.detach()
        contribution = weight.unsqueeze(-1).to(logits.dtype) * logits
        self.logits = contribution if self.logits is None else self.logits + contribution

    def _drop_finished(self, hidden: torch.Tensor) -> None:
        """Samples whose items have all exited leave the batch: no later block runs for them."""
        finished = self.done.reshape(self.done.shape[0], -1).all(-1)
        if not finished.any():
            return
        if self.last_hidden is None:
            self.last_hidden = hidden.new_zeros(self.padding.shape[0], *hidden.shape[1:])
        if self.last_hidden.shape[1:] == hidden.shape[1:]:
            self.last_hidden[self.active[finished]] = hidden[finished]
        else:  # a CNN's samples exited in stages whose feature maps differ: no single tensor holds them
            self.exit_shapes_differ = True
        keep = (~finished).nonzero().squeeze(-1)
        self.active = self.active[keep]
        self.state = self.state.select(keep)
        self.rule.select(keep)
        self.done = self.done[keep]

    def _scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of the active samples, placed in a full-batch tensor (zeros for samples that left)."""
        if tensor.shape[0] == self.padding.shape[0]:
            return tensor
        full = tensor.new_zeros(self.padding.shape[0], *tensor.shape[1:])
        full[self.active] = tensor
        return full

    def _record_hidden(self, hidden: torch.Tensor) -> None:
        if self.hidden_states is not None:
            self.hidden_states.append(self._scatter(hidden))

    def _last_hidden_state(self) -> torch.Tensor | None:
        if self.exit_shapes_differ:
            return None
        return self.state.hidden if self.last_hidden is None else self.last_hidden

    def output(self) -> ADNetModelOutput:
        halting, exit_steps = self.halting, self.exit_steps
        if self.full_depth:
            exit_steps = exit_steps.masked_fill(~self.padding, self.config.num_steps)
        if self.lambdas:
            halting = halting_distribution(torch.stack(self.lambdas, dim=-1))
            halting = halting.masked_fill(self.padding.unsqueeze(-1), 0.0)
        return ADNetModelOutput(
            last_hidden_state=self._last_hidden_state(),
            logits=self.logits,
            step_logits=torch.stack(self.step_logits) if self.step_logits else None,
            step_losses=torch.stack(self.step_losses, dim=-1) if self.step_losses else None,
            halting_probs=halting,
            exit_steps=exit_steps,
            executed_layers=exit_steps * self.config.layers_per_step,
            flops=self.flops,
            cache=self.cache,
            hidden_states=tuple(self.hidden_states) if self.hidden_states is not None else None,
            attentions=tuple(self.attentions) if self.attentions else None,
        )


class _ADNetClassifier(ADNetPreTrainedModel):
    """Shared by the sequence and image classifiers: an output layer on the unit summaries, and the loss."""

    def __init__(self, config: ADNetConfig):
        super().__init__(config)
        self.adnet = ADNetModel(config)

        def output_layer() -> nn.Module:
            return nn.Sequential(nn.Dropout(config.classifier_dropout),
                                 nn.Linear(2 * config.unit_hidden_size, config.num_labels))

        count = 1 if config.share_output_layer else config.num_variable_steps
        self.output_layers = nn.ModuleList(output_layer() for _ in range(count))
        self.loss_fn = build_loss(config)
        self.post_init()

    def step_head(self, n: int, summary: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_layers[0 if self.config.share_output_layer else n](summary)

    def _classify(self, labels: torch.Tensor | None, exit_policy: str | None, exit_threshold=None,
                  **inputs) -> ADNetSequenceClassifierOutput:
        step_loss = None
        if labels is not None and self.config.problem_type is None:
            self.config.problem_type = resolve_problem_type(None, self.config.num_labels, labels)
        if labels is not None and self.training:
            problem_type = self.config.problem_type

            def step_loss(logits: torch.Tensor) -> torch.Tensor:
                return task_loss(logits, labels, problem_type)

        out = self.adnet(exit_policy=exit_policy, exit_threshold=exit_threshold, step_head=self.step_head, step_loss=step_loss,
                         step_head_flops=2.0 * matmul_weights(self.output_layers[0]), **inputs)
        loss = None if labels is None else self.combine_losses(out, labels)
        return ADNetSequenceClassifierOutput(
            loss=loss, logits=out.logits, step_logits=out.step_logits, halting_probs=out.halting_probs,
            exit_steps=out.exit_steps, executed_layers=out.executed_layers, flops=out.flops,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )

    def combine_losses(self, out: ADNetModelOutput, labels: torch.Tensor) -> torch.Tensor:
        """Training: the configured loss over the steps. Inference: the task loss of the prediction made."""
        if out.step_losses is None:
            return task_loss(out.logits, labels, self.config.problem_type).mean()
        return self.loss_fn(out.step_losses, out.halting_probs)


class ADNetForSequenceClassification(_ADNetClassifier):
    """ADNet on a BERT, RoBERTa or GPT-2 backbone for single-label, multi-label or regression tasks."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        exit_policy: str | None = None,
        exit_threshold: float | int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> ADNetSequenceClassifierOutput:
        r"""
        labels (`torch.Tensor` of shape `(batch_size,)`, or `(batch_size, num_labels)` for multi-label):
            Class indices, or targets for regression / multi-label. In training the loss follows
            `config.loss_type`; at inference it is the task loss of the prediction made (at the exit step).
        exit_policy (`str`, *optional*): overrides `config.exit_policy` for this call.
        """
        return self._classify(
            labels, exit_policy, exit_threshold, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )


class ADNetForImageClassification(_ADNetClassifier):
    """ADNet on a ResNet: each image stops after its own number of residual blocks."""

    main_input_name = "pixel_values"

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        exit_policy: str | None = None,
        exit_threshold: float | int | None = None,
        output_hidden_states: bool | None = None,
    ) -> ADNetSequenceClassifierOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`): the images.
        labels (`torch.LongTensor` of shape `(batch_size,)`): class indices.
        """
        return self._classify(labels, exit_policy, exit_threshold, pixel_values=pixel_values,
                              output_hidden_states=output_hidden_states)


class ADNetForCausalLM(ADNetPreTrainedModel, GenerationMixin):
    """ADNet on a GPT-2 or Llama-family decoder: per-token units, every step predicting with the tied LM head."""

    def __init__(self, config: ADNetConfig):
        super().__init__(config)
        self.adnet = ADNetModel(config, per_token=True)
        if not self.adnet.adapter.is_causal:
            raise ValueError(f"ADNetForCausalLM needs a decoder backbone, got {config.backbone_config.model_type!r}")
        backbone_config = config.backbone_config
        self.lm_head = nn.Linear(backbone_config.hidden_size, backbone_config.vocab_size, bias=False)
        embedding = self.adnet.get_input_embeddings()
        embedding_name = next(name for name, module in self.named_modules() if module is embedding)
        self._tied_weights_keys = {"lm_head.weight": f"{embedding_name}.weight"}
        self.loss_fn = build_loss(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_input_embeddings(self) -> nn.Module:
        return self.adnet.get_input_embeddings()

    def step_head(self, n: int, summary: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.adnet.adapter.final_norm(self.adnet.backbone)(hidden))

    @staticmethod
    def _load_pretrained_backbone(name_or_path: str, **kwargs) -> PreTrainedModel:
        """A causal LM checkpoint, so that an untied LM head can be kept too."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)

    def _copy_pretrained_weights(self, pretrained: PreTrainedModel) -> None:
        self.adnet.load_backbone_weights(pretrained.base_model)
        if not self.config.tie_word_embeddings:
            self.lm_head.load_state_dict(pretrained.get_output_embeddings().state_dict())

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        exit_policy: str | None = None,
        exit_threshold: float | int | None = None,
        output_step_logits: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ADNetCausalLMOutput:
        r"""
        output_step_logits (`bool`): also return every step's logits (N x B x T x vocab: memory-hungry). Off by
            default: the per-step losses are taken as each step runs, and training's fused `logits` are detached.
        labels (`torch.LongTensor` of shape `(batch_size, seq_len)`): next-token targets as for any Transformers
            causal LM (shifted inside; -100 is ignored).
        cache (`Cache`, *optional*): key/value cache for generation; decoding with a cache runs at full depth.
        """
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config.backbone_config)
        targets = None if labels is None else labels[:, 1:]

        def step_loss(logits: torch.Tensor) -> torch.Tensor:
            return task_loss(logits[:, :-1], targets, "single_label_classification")

        out = self.adnet(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, cache=cache, exit_policy=exit_policy, exit_threshold=exit_threshold,
            step_head=self.step_head,
            step_loss=step_loss if labels is not None and self.training else None,
            keep_step_logits=output_step_logits,
            step_head_flops=2.0 * matmul_weights(self.lm_head),
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        loss = None if labels is None else self.combine_losses(out, targets)
        return ADNetCausalLMOutput(
            loss=loss, logits=out.logits, step_logits=out.step_logits, halting_probs=out.halting_probs,
            exit_steps=out.exit_steps, executed_layers=out.executed_layers, flops=out.flops, cache=out.cache,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )

    def combine_losses(self, out: ADNetModelOutput, targets: torch.Tensor) -> torch.Tensor:
        """Over every predicted token whose target (B x T-1) is not -100: in training the configured loss over the
        steps, at inference the cross-entropy of the prediction made (so `exp(loss)` is the perplexity)."""
        keep = targets != IGNORE_INDEX
        if out.step_losses is None:
            return task_loss(out.logits[:, :-1][keep], targets[keep], "single_label_classification").mean()
        return self.loss_fn(out.step_losses[keep], out.halting_probs[:, :-1][keep])


__all__ = [
    "ADNetCausalLMOutput",
    "ADNetForCausalLM",
    "ADNetForImageClassification",
    "ADNetForSequenceClassification",
    "ADNetModel",
    "ADNetModelOutput",
    "ADNetPreTrainedModel",
    "ADNetSequenceClassifierOutput",
]
