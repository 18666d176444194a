"""ADNet models: calculation units with learned halting on a Transformers backbone, run step by step.

Training runs every step and fuses them under the halting distribution. Inference stops each sample (each token,
for a causal LM) at its exit step; samples that have exited leave the batch, so the later blocks never run for them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .backbones_adnet import backbone_adapter, backbones_taking, matmul_weights, recording_attentions
from .configuration_adnet import ADNetConfig
from .draft_adnet import DraftUnit
from .engine_adnet import StepEngine, StepHead, Trace
from .exit_adapters_adnet import ExitAdapter
from .exits_adnet import EXIT_RULES, FULL_DEPTH, exit_rule
from .inputs_adnet import check_classification_labels, check_lm_labels, check_model_inputs, input_shape
from .losses_adnet import (
    DRAFT_FEATURE_WEIGHT,
    DRAFT_TOKEN_WEIGHT,
    IGNORE_INDEX,
    ADNetLoss,
    build_loss,
    distillation_loss,
    draft_unit_loss,
    labelled_rows,
    mean_over_rows,
    settled_steps,
    task_loss,
)
from .sharding_adnet import exit_sync
from .speculative_adnet import DraftUnitDecoder, SelfSpeculativeDecoder, check_settings, check_vocabulary
from .units_adnet import CalculationUnit, EvidenceWeights, step_evidence

logger = logging.get_logger(__name__)


class ADNetOutput(ModelOutput):
    """Base of ADNet's outputs: `ModelOutput` whose field writes look the name up in the class's dataclass fields.

    `ModelOutput.__setattr__` rebuilds the set of field names at every write, so building an output of n fields
    visits n^2 fields: for ADNet's ten-field outputs about 30 us of a 2 ms forward at batch 1
    (`benchmarks/bench_overhead.py`). A field write does what it does there (a value that is not None also goes in
    the dict, in field order); any other name is left to it. (The subclasses declare no `ClassVar`, so every entry
    of `__dataclass_fields__` is a field.)
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).__dataclass_fields__:
            super().__setattr__(name, value)
            return
        if value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)


@dataclass
class ADNetModelOutput(ADNetOutput):
    r"""Output of `ADNetModel`: the fields of Transformers' `BaseModelOutputWithPast` first, then ADNet's own.

    Items are samples, or (batch, tokens) for a causal LM. Under exits, `hidden_states` and `attentions` keep the
    backbone's own length; the entries of blocks an item skipped hold its exit state (zeros where a CNN's later
    stages differ in shape) and zero attention weights, and `exit_steps` says which entries were computed.

    Attributes:
        last_hidden_state (torch.Tensor | None): The block output at each sample's exit step, `(batch_size, seq_len,
            hidden_size)` or the CNN's feature map; `None` when a CNN's samples exit in stages whose feature maps
            differ in shape.
        cache (Cache | None): The key/value cache, when one was passed or `use_cache=True`.
        hidden_states (tuple[torch.Tensor, ...] | None): With `output_hidden_states`: the embedding output and each
            block's output for the whole batch (a ResNet: one per stage, as `ResNetModel` reports).
        attentions (tuple[torch.Tensor, ...] | None): With `output_attentions`: each block's attention weights.
        logits (torch.Tensor | None): `(*items, num_labels)`: the prediction at each item's exit step (training:
            the step predictions fused under the halting distribution). Under exits a padding token's logits are 0.
            `None` without a step head.
        step_logits (torch.Tensor | None): `(num_variable_steps, *items, num_labels)`: every variable step's
            prediction, at full depth when the task model asks for them (`output_step_logits=True`, and a
            classifier in training).
        step_losses (torch.Tensor | None): `(*items, num_variable_steps)`: every variable step's unreduced task
            loss, when the step head has a loss (full depth only).
        halting_probs (torch.Tensor | None): `(*items, num_variable_steps)`: the halting distribution `p_n`. With
            exits, the exit step takes the mass not yet halted and later steps get 0, so each row sums to 1. At
            full depth a task model computes it only in training or with `output_step_logits=True` (otherwise it
            runs the last step's unit and head only, like the plain model) and this is `None`.
        exit_steps (torch.LongTensor | None): `items`: backbone steps executed for each item, fixed steps included
            (0 for padding tokens).
        executed_layers (torch.LongTensor | None): `items`: backbone blocks executed for each item.
        flops (torch.Tensor | None): `items`: estimated FLOPs each item used in the blocks it ran, the units and the
            step predictions (matrix products and attention; a sample's real tokens only, as if it ran alone).
    """

    last_hidden_state: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    logits: torch.Tensor | None = None
    step_logits: torch.Tensor | None = None
    step_losses: torch.Tensor | None = None
    halting_probs: torch.Tensor | None = None
    exit_steps: torch.LongTensor | None = None
    executed_layers: torch.LongTensor | None = None
    flops: torch.Tensor | None = None


@dataclass
class ADNetSequenceClassifierOutput(ADNetOutput):
    r"""Output of `ADNetForSequenceClassification` and `ADNetForImageClassification`.

    The fields of Transformers' `SequenceClassifierOutput` come first, so `return_dict=False` gives
    `(loss, logits, ...)` as theirs does; ADNet's follow. Under exits, `hidden_states` and `attentions` are laid out
    as in `ADNetModelOutput`.

    Attributes:
        loss (torch.Tensor | None): `()`: with `labels`, the configured ADNet loss in training (GPSL by default),
            the task loss of the prediction made at inference.
        logits (torch.Tensor | None): `(batch_size, num_labels)`: the prediction at each sample's exit step
            (training: fused under the halting distribution).
        hidden_states (tuple[torch.Tensor, ...] | None): With `output_hidden_states`: the embedding output and every
            block's (or stage's) output.
        attentions (tuple[torch.Tensor, ...] | None): With `output_attentions`: every block's attention weights.
        step_logits (torch.Tensor | None): `(num_variable_steps, batch_size, num_labels)`: each variable step's
            prediction (at full depth: in training, or with `output_step_logits=True`).
        halting_probs (torch.Tensor | None): `(batch_size, num_variable_steps)`: the halting distribution (with
            exits; at full depth when `step_logits` are made).
        exit_steps (torch.LongTensor | None): `(batch_size,)`: backbone steps executed per sample.
        executed_layers (torch.LongTensor | None): `(batch_size,)`: backbone blocks executed per sample.
        flops (torch.Tensor | None): `(batch_size,)`: estimated FLOPs per sample (as in `ADNetModelOutput`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    step_logits: torch.Tensor | None = None
    halting_probs: torch.Tensor | None = None
    exit_steps: torch.LongTensor | None = None
    executed_layers: torch.LongTensor | None = None
    flops: torch.Tensor | None = None


@dataclass
class ADNetCausalLMOutput(ADNetOutput):
    r"""Output of `ADNetForCausalLM`: the fields of Transformers' `CausalLMOutputWithPast` first, then ADNet's.

    Items are tokens. Under exits, `hidden_states` and `attentions` are laid out as in `ADNetModelOutput`.

    Attributes:
        loss (torch.Tensor | None): `()`: with `labels`, the mean over the predicted tokens whose label is not -100
            (the configured ADNet loss in training, the cross-entropy of the prediction made at inference, so
            `exp(loss)` is the perplexity).
        logits (torch.Tensor | None): `(batch_size, seq_len, vocab_size)`: each token's prediction at its exit step.
        cache (Cache | None): The key/value cache, when one was passed or `use_cache=True`.
        hidden_states (tuple[torch.Tensor, ...] | None): With `output_hidden_states`: the embedding output and every
            block's output.
        attentions (tuple[torch.Tensor, ...] | None): With `output_attentions`: every block's attention weights.
        step_logits (torch.Tensor | None): `(num_variable_steps, batch_size, seq_len, vocab_size)`, with
            `output_step_logits=True`.
        halting_probs (torch.Tensor | None): `(batch_size, seq_len, num_variable_steps)`: the halting distribution.
        exit_steps (torch.LongTensor | None): `(batch_size, seq_len)`: backbone steps executed per token (0 for
            padding).
        executed_layers (torch.LongTensor | None): `(batch_size, seq_len)`: backbone blocks executed per token.
        flops (torch.Tensor | None): `(batch_size, seq_len)`: estimated FLOPs per token (as in `ADNetModelOutput`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    step_logits: torch.Tensor | None = None
    halting_probs: torch.Tensor | None = None
    exit_steps: torch.LongTensor | None = None
    executed_layers: torch.LongTensor | None = None
    flops: torch.Tensor | None = None


class ADNetPreTrainedModel(PreTrainedModel):
    """Base of the ADNet models: what every head shares.

    It initialises the units and output layers (never the backbone, which keeps its own or loaded weights), wraps a
    pretrained backbone checkpoint (`from_backbone`), freezes the full-depth path for exits trained afterwards
    (`freeze_full_depth`), and builds the configured loss (`loss_fn`). `from_pretrained` and `save_pretrained` are
    Transformers' own.

    Args:
        config (ADNetConfig): The configuration; the backbone is built from `config.backbone_config` with random
            weights (`from_backbone` or `from_pretrained` load trained ones).
    """

    config: ADNetConfig
    config_class = ADNetConfig
    base_model_prefix = "adnet"
    supports_gradient_checkpointing = True  # the backbone's blocks checkpoint themselves (text backbones)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Units, output layers, exit adapters and the draft unit only: the backbone is a sub-model and keeps its own
        (or loaded) weights."""
        if isinstance(module, EvidenceWeights):
            init.copy_(module.weight, EvidenceWeights.prior(module.weight))
        elif self._in_draft_layer(module):  # the draft unit's decoder layer: as the backbone's own layers
            self.base_model.backbone._init_weights(module)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ExitAdapter):  # the identity map: the exit reads as through the plain head
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DraftUnit) and module.vocabulary is not None:  # unset until add_draft_unit or loading
            init.constant_(module.vocabulary, DraftUnit.UNSET)

    def _in_draft_layer(self, module: nn.Module) -> bool:
        unit = getattr(self, "draft_unit", None)
        return unit is not None and any(module is inner for inner in unit.layer.modules())

    @classmethod
    def from_backbone(cls, name_or_path: str, backbone_kwargs: dict | None = None, **config_overrides):
        """Wrap a pretrained backbone checkpoint and load its weights unchanged; the units and output layers start new.

        The checkpoint is a plain Transformers one (a `BertModel`, a fine-tuned `BertForSequenceClassification`, a
        GPT-2 or Llama causal LM, a ResNet); an ADNet checkpoint loads with `from_pretrained`. A causal LM keeps the
        checkpoint's LM head where it is not tied to the embeddings.

        Args:
            name_or_path (str): A local folder or a Hub id.
            backbone_kwargs (dict | None): Passed to the backbone's `from_pretrained` (e.g. `dtype`, `gguf_file`,
                `attn_implementation`). Defaults to `None`.
            **config_overrides (Any): `ADNetConfig` fields, e.g. `num_labels=2` or `exit_policy="confidence"`.

        Returns:
            model (ADNetPreTrainedModel): A model of the class called, in the backbone's dtype and, as
                `from_pretrained` gives it, in evaluation mode: `Trainer` switches to training itself, a custom
                loop calls `model.train()` (the loss over every step is computed in training mode only).
        """
        pretrained = cls._load_pretrained_backbone(name_or_path, **(backbone_kwargs or {}))
        model = cls(ADNetConfig(backbone_config=pretrained.config, **config_overrides))
        model._copy_pretrained_weights(pretrained)
        model.config._name_or_path = str(name_or_path)
        return model.to(pretrained.dtype).eval()

    @staticmethod
    def _load_pretrained_backbone(name_or_path: str, **kwargs) -> PreTrainedModel:
        from transformers import AutoModel

        return AutoModel.from_pretrained(name_or_path, **kwargs)

    def _copy_pretrained_weights(self, pretrained: PreTrainedModel) -> None:
        self.base_model.load_backbone_weights(pretrained)

    @property
    def loss_fn(self) -> ADNetLoss:
        """The combining loss the config names now: built per call, so a `loss_type` or weight set after
        construction is the one trained with."""
        return build_loss(self.config)

    def freeze_full_depth(self) -> None:
        """Freeze everything the last step's prediction reads: the backbone, the last unit, its output layer (or
        the LM head). Training then moves only the earlier steps' units (and their own output layers, when not
        shared, or a causal LM's exit adapters), so full-depth outputs stay exactly as loaded.

        This is DeeBERT's second stage: exits added to a model fine-tuned at full depth (e.g. with
        `loss_type="last"`) keep that model's full-depth accuracy, which joint training of all steps can lower.
        """
        self.requires_grad_(False)
        self.base_model.units[:-1].requires_grad_(True)
        output_layers = getattr(self, "output_layers", None)
        if output_layers is not None and len(output_layers) > 1:
            output_layers[:-1].requires_grad_(True)
        if getattr(self, "exit_adapters", None) is not None:  # the last step has none: full depth is unchanged
            self.exit_adapters.requires_grad_(True)
        self._frozen_modules_eval = True
        self.train(self.training)

    def train(self, mode: bool = True):
        """`nn.Module.train`; with the full depth frozen (`freeze_full_depth`), the frozen modules stay in eval mode:
        their dropout trains nothing and would only make the step predictions, and so where each one settles (what
        the exits learn from), differ from what inference sees."""
        super().train(mode)
        if mode and getattr(self, "_frozen_modules_eval", False):
            for module in self.modules():
                parameters = list(module.parameters())
                if parameters and not any(p.requires_grad for p in parameters):
                    module.eval()
        return self


class ADNetModel(ADNetPreTrainedModel):
    """The backbone and one calculation unit per variable step, run with or without exits; no task head.

    The task models hold one as `model.adnet` (`model.base_model`). Alone (`AutoModel`) it makes no predictions, so
    a config whose policy needs them (`confidence`, `patience`) runs at full depth, with a warning.
    `config.per_token_units` gives a causal LM's units (a halting probability per token, no pooling over the
    sequence).

    `sync_exits` (an attribute, not a config field: it depends on how a run shards the model, not on the model)
    says whether the exiting pass keeps distributed processes in step. `None`, the default, detects blocks sharded
    by FSDP or DeepSpeed ZeRO-3; set `model.base_model.sync_exits = True` for another engine that gathers
    parameters inside the blocks, `False` to never synchronise.

    Args:
        config (ADNetConfig): The configuration.
    """

    sync_exits: bool | None = None

    def __init__(self, config: ADNetConfig):
        super().__init__(config)
        if config.halting_evidence is None:  # no task head chose (a causal LM, ADNetModel alone): False here, as
            config.halting_evidence = False  # `ADNetConfig.__post_init__` reads a saved None, so saving round-trips
        self.adapter = backbone_adapter(config.backbone_config)
        self.backbone = self.adapter.build(config.backbone_config)
        sizes = self.adapter.block_sizes(config.backbone_config)
        step_sizes = [sizes[(s + 1) * config.layers_per_step - 1] for s in range(config.num_steps)]
        variable_sizes = step_sizes[config.num_fixed_steps :]
        self.units = nn.ModuleList(
            CalculationUnit(
                size,
                config.unit_hidden_size,
                bool(config.per_token_units),
                halts=n < len(variable_sizes) - 1,
                reads_evidence=bool(config.halting_evidence),
            )
            for n, size in enumerate(variable_sizes)
        )
        config.bind_architecture()
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

    def _configured_policy(self, step_head: StepHead | None) -> str:
        """`config.exit_policy`, or full depth when it needs step predictions and none can be made: a checkpoint
        saved with `confidence` or `patience` loaded as the base model (`AutoModel`) has no task head."""
        policy = self.config.exit_policy
        if step_head is None and policy in EXIT_RULES and self.step_engine().needs_predictions(EXIT_RULES[policy]):
            logger.warning_once(
                f"exit_policy={policy!r} needs the task head's predictions, which ADNetModel alone "
                f"does not make: running at full depth. Load the checkpoint with its task model "
                f"({', '.join(self.config.architectures or ['an ADNetFor* class'])}) to exit."
            )
            return FULL_DEPTH
        return policy

    def step_engine(self) -> StepEngine:
        """The engine over the backbone's blocks grouped into steps of `layers_per_step`, and the units."""
        blocks, size = self.adapter.blocks(self.backbone), self.config.layers_per_step
        steps = [blocks[i : i + size] for i in range(0, len(blocks), size)]
        return StepEngine(
            self.adapter,
            self.config.backbone_config,
            steps,
            self.units,
            bool(self.config.per_token_units),
            size,
            exit_sync(steps, self.sync_exits),
            self.config.layer_dropout if self.training else 0.0,
        )

    @can_return_tuple
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
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ADNetModelOutput:
        r"""Run the backbone step by step, each item stopping at its exit step (training: every step).

        Text backbones take `input_ids` or `inputs_embeds`, a ResNet `pixel_values`.

        Args:
            input_ids (torch.LongTensor | None): `(batch_size, seq_len)` token ids. Defaults to `None`.
            attention_mask (torch.Tensor | None): `(batch_size, seq_len)`, 1 for real tokens and 0 for padding.
                Defaults to `None` (every token real).
            token_type_ids (torch.LongTensor | None): Segment ids, for backbones that take them (BERT). Defaults
                to `None`.
            position_ids (torch.LongTensor | None): Positions, e.g. ones that skip left padding on BERT. Defaults
                to `None` (the backbone's own; decoders skip left padding themselves).
            inputs_embeds (torch.Tensor | None): Input embeddings instead of `input_ids`. Defaults to `None`.
            pixel_values (torch.Tensor | None): `(batch_size, channels, height, width)` images (ResNet).
                Defaults to `None`.
            cache (Cache | None): A key/value cache (causal LMs). With exits, the tokens that exited get the deeper
                layers' keys/values from their exit hidden state (CALM's state propagation). Defaults to `None`.
            exit_policy (str | None): Overrides `config.exit_policy` for this call (inference only; training always
                runs every step). Defaults to `None`.
            exit_threshold (float | int | None): The policy's setting for this call (`halting_epsilon`,
                `confidence_threshold` or `patience`) instead of the config's. Defaults to `None`.
            step_head (StepHead | None): The task model's prediction at each variable step, which the `confidence`
                and `patience` policies need. Defaults to `None`.
            output_hidden_states (bool | None): Also return every block's output. Defaults to `None` (the
                config's).
            output_attentions (bool | None): Also return every block's attention weights. Defaults to `None` (the
                config's).

        Returns:
            The exit steps and, with a step head, the predictions.
        """
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            "pixel_values": pixel_values,
        }
        past_length = cache.get_seq_length() if cache is not None else 0
        check_model_inputs(self.adapter, self.config.backbone_config, inputs, self.dtype, past_length)
        state = self.adapter.embed(self.backbone, {k: v for k, v in inputs.items() if v is not None}, cache)
        policy = exit_policy or self._configured_policy(step_head)
        rule = None if self.training or policy == FULL_DEPTH else exit_rule(policy, self.config, exit_threshold)
        if rule is None and exit_threshold is not None:
            raise ValueError(
                "exit_threshold needs an exiting pass: it has no effect in training or with "
                f"exit_policy={FULL_DEPTH!r}."
            )
        engine = self.step_engine()
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_blocks = self.adapter.hidden_state_blocks(self.config.backbone_config) if output_hidden_states else None
        with recording_attentions(self.backbone, bool(output_attentions)) as records:
            trace = Trace(state.hidden.shape[0], hidden_blocks, records, self.config.num_blocks)
            if rule is None:
                steps = engine.full_depth(state, step_head, trace, cache, fuse=self.training)
            else:
                steps = engine.exiting(state, step_head, rule, trace, cache)
        return ADNetModelOutput(
            **vars(steps), executed_layers=steps.exit_steps * self.config.layers_per_step, cache=cache
        )


class _ADNetClassifier(ADNetPreTrainedModel):
    """Shared by the sequence and image classifiers: an output layer on the unit summaries, and the loss.

    The loss is a per-batch mean (`accepts_loss_kwargs = False`): `Trainer` divides it by the accumulation steps.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: ADNetConfig):
        super().__init__(config)
        config.use_per_token_units(False, type(self).__name__)
        if config.halting_evidence is None:
            config.halting_evidence = True
        for name in ("exit_adapters", "exit_distillation", "draft_unit", "draft_vocabulary_size"):
            if getattr(config, name):
                raise ValueError(
                    f"ADNetConfig.{name} is a causal LM's; {type(self).__name__} reads unit summaries: leave it unset."
                )
        backbone_input = backbone_adapter(config.backbone_config).main_input_name
        if backbone_input != self.main_input_name:
            raise ValueError(
                f"{type(self).__name__} takes {self.main_input_name}: its backbone must be one of "
                f"{backbones_taking(self.main_input_name)}, got {config.backbone_config.model_type!r}, "
                f"which takes {backbone_input}."
            )
        self.adnet = ADNetModel(config)

        def output_layer() -> nn.Module:
            return nn.Sequential(
                nn.Dropout(config.classifier_dropout), nn.Linear(2 * config.unit_hidden_size, config.num_labels)
            )

        count = 1 if config.share_output_layer else config.num_variable_steps
        self.output_layers = nn.ModuleList(output_layer() for _ in range(count))
        self.post_init()

    def step_head(self, n: int, summary: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_layers[0 if self.config.share_output_layer else n](summary)

    def _classify(
        self, labels: torch.Tensor | None, output_step_logits: bool, **inputs
    ) -> ADNetSequenceClassifierOutput:
        if labels is not None:
            labels, self.config.problem_type = check_classification_labels(
                labels, self.config.problem_type, self.config.num_labels, input_shape(inputs)
            )
        problem_type = self.config.problem_type
        step_loss = None
        if labels is not None and self.training:

            def step_loss(logits: torch.Tensor) -> torch.Tensor:
                return task_loss(logits, labels, problem_type)

        # training reads the step predictions for GPSL's `settled` plateau
        head = StepHead(
            self.step_head,
            2.0 * matmul_weights(self.output_layers[0]),
            step_loss,
            keep_logits=self.training or output_step_logits,
            evidence=self.read_step_evidence,
        )
        out = self.adnet(step_head=head, return_dict=True, **inputs)
        loss = None if labels is None else self.combine_losses(out, labels)
        return ADNetSequenceClassifierOutput(
            loss=loss,
            logits=out.logits,
            step_logits=out.step_logits,
            halting_probs=out.halting_probs,
            exit_steps=out.exit_steps,
            executed_layers=out.executed_layers,
            flops=out.flops,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def read_step_evidence(
        self, logits: torch.Tensor, previous: torch.Tensor | None, not_halted: torch.Tensor | float
    ) -> torch.Tensor:
        """`step_evidence` for this model's task (the config's, or as the heads infer it while unset), for units
        that read it; looked up when a unit asks, so that a pass whose units do not read it pays nothing."""
        problem_type = self.config.problem_type
        if problem_type is None:
            problem_type = "regression" if self.config.is_regression else "single_label_classification"
        return step_evidence(logits, previous, not_halted, problem_type)

    def combine_losses(self, out: ADNetModelOutput, labels: torch.Tensor) -> torch.Tensor:
        """Training: the configured loss over the steps, given where each sample's prediction settles (for GPSL's
        `settled` plateau). Inference: the task loss of the prediction made. Both are means over the samples whose
        label is not -100."""
        problem_type = self.config.problem_type
        keep = labelled_rows(labels, problem_type)
        if out.step_losses is None:
            losses = task_loss(out.logits, labels, problem_type)
            return mean_over_rows(losses if keep is None else losses[keep])
        settled = None if problem_type == "regression" else settled_steps(out.step_logits, problem_type)
        return self.loss_fn(out.step_losses, out.halting_probs, keep, settled)


class ADNetForSequenceClassification(_ADNetClassifier):
    """ADNet on a BERT, RoBERTa or GPT-2 backbone for single-label, multi-label or regression tasks.

    Each calculation unit summarises the sequence, and an output layer (shared by every step, or one per step)
    predicts from that summary; at inference each sample stops at its own exit step and leaves the batch. The task
    follows `config.problem_type` and `num_labels`, as Transformers' sequence classifiers do.

    Args:
        config (ADNetConfig): The configuration, with a text backbone.
    """

    @can_return_tuple
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
        output_step_logits: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> ADNetSequenceClassifierOutput:
        r"""Classify each sample, stopping it at its exit step.

        Args:
            input_ids (torch.LongTensor | None): `(batch_size, seq_len)` token ids. Defaults to `None`.
            attention_mask (torch.Tensor | None): `(batch_size, seq_len)`, 1 for real tokens and 0 for padding.
                Defaults to `None`.
            token_type_ids (torch.LongTensor | None): Segment ids (BERT). Defaults to `None`.
            position_ids (torch.LongTensor | None): Positions; pass `attention_mask.cumsum(-1) - 1` (clamped at 0)
                to make a left-padded BERT sample equal to the same sample alone. Defaults to `None`.
            inputs_embeds (torch.Tensor | None): Input embeddings instead of `input_ids`. Defaults to `None`.
            labels (torch.Tensor | None): `(batch_size,)` class indices (-100: counted in no loss), or
                `(batch_size, num_labels)` targets for regression and multi-label. In training the loss follows
                `config.loss_type`; at inference it is the task loss of the prediction made. Defaults to `None`.
            exit_policy (str | None): Overrides `config.exit_policy` for this call. Defaults to `None`.
            exit_threshold (float | int | None): The policy's setting for this call instead of the config's.
                Defaults to `None`.
            output_step_logits (bool): At full depth, also return every variable step's prediction and the halting
                distribution. Off by default: they cost a unit and a head at every step, which the prediction does
                not need (always on in training, which reads them). Defaults to `False`.
            output_hidden_states (bool | None): Also return every block's output. Defaults to `None` (the
                config's).
            output_attentions (bool | None): Also return every block's attention weights. Defaults to `None` (the
                config's).

        Returns:
            The predictions, where each sample exited, and the loss with `labels`.
        """
        return self._classify(
            labels,
            output_step_logits,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            exit_policy=exit_policy,
            exit_threshold=exit_threshold,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )


class ADNetForImageClassification(_ADNetClassifier):
    """ADNet on a ResNet: each image stops after its own number of residual blocks.

    The units pool each step's feature map; otherwise it is `ADNetForSequenceClassification` with images, and it
    runs in Transformers' `image-classification` pipeline.

    Args:
        config (ADNetConfig): The configuration, with a ResNet backbone.
    """

    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False  # ResNet's blocks do not checkpoint (nor does `ResNetModel`)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        exit_policy: str | None = None,
        exit_threshold: float | int | None = None,
        output_step_logits: bool = False,
        output_hidden_states: bool | None = None,
    ) -> ADNetSequenceClassifierOutput:
        r"""Classify each image, stopping it at its exit step.

        Args:
            pixel_values (torch.Tensor | None): `(batch_size, num_channels, height, width)` images. Defaults to
                `None`.
            labels (torch.Tensor | None): `(batch_size,)` class indices, or targets as for
                `ADNetForSequenceClassification`. Defaults to `None`.
            exit_policy (str | None): Overrides `config.exit_policy` for this call. Defaults to `None`.
            exit_threshold (float | int | None): The policy's setting for this call instead of the config's.
                Defaults to `None`.
            output_step_logits (bool): As `ADNetForSequenceClassification.forward`'s. Defaults to `False`.
            output_hidden_states (bool | None): Also return every stage's output. Defaults to `None` (the
                config's).

        Returns:
            The predictions, where each image exited, and the loss with `labels`.
        """
        return self._classify(
            labels,
            output_step_logits,
            pixel_values=pixel_values,
            exit_policy=exit_policy,
            exit_threshold=exit_threshold,
            output_hidden_states=output_hidden_states,
        )


class ADNetForCausalLM(ADNetPreTrainedModel, GenerationMixin):
    """ADNet on a GPT-2 or Llama-family decoder: per-token units, every step predicting with the LM head.

    Every step reads the backbone's own final norm and LM head (through an exit adapter with
    `config.exit_adapters`). A token that exits keeps its exit hidden state for the deeper blocks, whose keys and
    values for it come from that state (CALM's state propagation), and a sample leaves the batch once all its
    tokens have exited. `generate` exits per token, or with `assistant_early_exit=k` decodes self-speculatively.

    Under gradient accumulation `Trainer` passes `num_items_in_batch` (`accepts_loss_kwargs = True`), and the loss
    is this micro-batch's share of the mean over every accumulated token, as Transformers' own causal LMs do.

    Args:
        config (ADNetConfig): The configuration, with a decoder backbone.
    """

    accepts_loss_kwargs = True

    def __init__(self, config: ADNetConfig):
        super().__init__(config)
        config.use_per_token_units(True, type(self).__name__)
        self.adnet = ADNetModel(config)
        if not self.adnet.adapter.is_causal:
            raise ValueError(f"ADNetForCausalLM needs a decoder backbone, got {config.backbone_config.model_type!r}")
        backbone_config = config.backbone_config
        self.lm_head = nn.Linear(backbone_config.hidden_size, backbone_config.vocab_size, bias=False)
        self.exit_adapters = (
            nn.ModuleList(ExitAdapter(backbone_config.hidden_size) for _ in range(config.num_steps - 1))
            if config.exit_adapters
            else None
        )
        if config.draft_vocabulary_size is not None and not (
            config.draft_unit and config.draft_vocabulary_size <= backbone_config.vocab_size
        ):
            raise ValueError(
                f"ADNetConfig.draft_vocabulary_size is the draft unit's (draft_unit=True), at most the vocabulary's "
                f"{backbone_config.vocab_size} tokens; got {config.draft_vocabulary_size} with "
                f"draft_unit={config.draft_unit}."
            )
        self.draft_unit = self._new_draft_unit(config.draft_vocabulary_size) if config.draft_unit else None
        embedding = self.adnet.get_input_embeddings()
        embedding_name = next(name for name, module in self.named_modules() if module is embedding)
        self._tied_weights_keys = {"lm_head.weight": f"{embedding_name}.weight"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _new_draft_unit(self, vocabulary_size: int | None) -> DraftUnit:
        layer = self.adnet.adapter.new_block(self.adnet.backbone)
        return DraftUnit(self.config.backbone_config.hidden_size, layer, vocabulary_size)

    def add_draft_unit(self, vocabulary: torch.Tensor | None = None) -> DraftUnit:
        """Give this model a new, untrained draft unit (`config.draft_unit`), every other weight unchanged; a model
        that has one keeps it. `from_pretrained(path, draft_unit=True)` adds one over the whole vocabulary while
        loading.

        Args:
            vocabulary (torch.Tensor | None): The tokens the draft proposes (`config.draft_vocabulary_size`), e.g.
                `frequent_tokens` of the training text: saved with the unit and read at each drafted token instead
                of the whole LM head. Defaults to `None` (every token).

        Returns:
            draft_unit (DraftUnit): The model's draft unit, on the LM head's device and in its dtype.
        """
        if self.draft_unit is not None:
            if vocabulary is not None:
                raise ValueError("This model has a draft unit already: its vocabulary is fixed with it.")
            return self.draft_unit
        vocabulary = check_vocabulary(vocabulary, self.lm_head.weight.shape[0], "vocabulary")
        size = None if vocabulary is None else len(vocabulary)
        unit = self._new_draft_unit(size).to(self.lm_head.weight.device, self.lm_head.weight.dtype)
        unit.train(self.training)
        self.draft_unit = unit  # first, so that its layer is initialised as the backbone's (`_init_weights`)
        unit.apply(self._initialize_weights)
        if vocabulary is not None:
            unit.vocabulary.copy_(vocabulary)
        self.config._set_built_fields(draft_unit=True, draft_vocabulary_size=size)
        return unit

    def _checked_draft_unit(self) -> DraftUnit:
        """The draft unit, or a `ValueError` saying how to get one."""
        if self.draft_unit is None:
            raise ValueError(
                "This model has no draft unit (ADNetConfig.draft_unit=False): call add_draft_unit() first, or load "
                "it with from_pretrained(path, draft_unit=True)."
            )
        return self.draft_unit

    def freeze_all_but_draft_unit(self) -> None:
        """Leave only the draft unit to train: the frozen model's outputs, and the cached features the unit learns
        from, stay exactly as they are; the frozen modules stay in eval mode (`train`)."""
        unit = self._checked_draft_unit()
        self.requires_grad_(False)
        unit.requires_grad_(True)
        self._frozen_modules_eval = True
        self.train(self.training)

    def draft_unit_features(
        self,
        features: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """The draft unit's prediction of the next top features.

        Args:
            features (torch.Tensor): `(batch_size, n, hidden_size)`: top features (`top_features`: the last block's
                output after the final norm) at positions t.
            input_ids (torch.LongTensor): `(batch_size, n)`: the tokens at t+1.
            attention_mask (torch.Tensor | None): `(batch_size, past + n)`, 1 for real positions, over the
                draft's cache and these positions. Defaults to `None` (all real).
            cache (Cache | None): The draft unit's own key/value cache. Defaults to `None`.

        Returns:
            `(batch_size, n, hidden_size)`: the predicted top features at t+1, which `lm_head` reads as next-token
            logits.
        """
        unit, adnet = self._checked_draft_unit(), self.adnet
        tokens = adnet.adapter.embed(adnet.backbone, {"input_ids": input_ids, "attention_mask": attention_mask}, cache)
        return unit(features, tokens, adnet.adapter, cache)

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_input_embeddings(self) -> nn.Module:
        return self.adnet.get_input_embeddings()

    def step_head(self, n: int, summary: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        return self.exit_head(hidden, (self.config.num_fixed_steps + n + 1) * self.config.layers_per_step)

    def exit_head(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        """The logits read from `hidden`, the output of the first `depth` blocks (at a step boundary)."""
        return self.lm_head(self.exit_states(hidden, depth))

    def exit_states(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        """What the LM head reads from `hidden`, the output of the first `depth` blocks (at a step boundary): `hidden`
        through that exit's adapter (`config.exit_adapters`; none after the last block) and the final norm."""
        if self.exit_adapters is not None and depth < self.config.num_blocks:
            hidden = self.exit_adapters[depth // self.config.layers_per_step - 1](hidden)
        return self.adnet.adapter.final_norm(self.adnet.backbone)(hidden)

    def top_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What a draft unit reads and predicts from `hidden`, the last block's output: the features the LM head reads
        (after the final norm), of a scale the unit can regress whatever the residual stream's."""
        return self.exit_states(hidden, self.config.num_blocks)

    def head_flops(self) -> float:
        """FLOPs of one step prediction per token: the LM head, and an exit adapter where the model has them
        (counted at the last step too, which has none: an upper bound)."""
        adapters = 0.0 if self.exit_adapters is None else max((a.flops() for a in self.exit_adapters), default=0.0)
        return 2.0 * matmul_weights(self.lm_head) + adapters

    def draft_loss(
        self,
        features: torch.Tensor,
        input_ids: torch.LongTensor,
        feature_weight: float = DRAFT_FEATURE_WEIGHT,
        token_weight: float = DRAFT_TOKEN_WEIGHT,
        feature_noise: float = 0.0,
    ) -> torch.Tensor:
        """The draft unit's training loss (`draft_unit_loss`) on blocks of the frozen model's cached top features:
        from the features at t and the tokens at t+1 it predicts the features at t+1 of every block. Both
        next-token distributions are read over the unit's vocabulary (`config.draft_vocabulary_size`), as drafting
        reads them.

        Args:
            features (torch.Tensor): `(batch_size, block_size, hidden_size)`: the frozen model's top features of
                `input_ids` (`cache_top_features`).
            input_ids (torch.LongTensor): `(batch_size, block_size)`: the blocks of tokens, without padding.
            feature_weight (float): Weight of the feature regression. Defaults to `1.0`.
            token_weight (float): Weight of the cross-entropy against the frozen model's next-token distribution.
                Defaults to `0.1`.
            feature_noise (float): While the unit trains, uniform noise of this width (times the features' root
                mean square) on the features it reads (EAGLE): when drafting, all but its first token read its own
                imperfect predictions. Defaults to `0.0`.

        Returns:
            `()`: the mean over the predicted positions.
        """
        unit = self._checked_draft_unit()
        inputs = features[:, :-1]
        if feature_noise and unit.training:
            width = feature_noise * inputs.float().pow(2).mean().sqrt()
            inputs = inputs + (torch.rand_like(inputs) - 0.5) * width
        predicted = self.draft_unit_features(inputs, input_ids[:, 1:])
        target = features[:, 1:].to(predicted.dtype)
        weight, bias = unit.head_rows(self.lm_head)
        with torch.no_grad():
            target_logits = F.linear(target, weight, bias)
        draft_logits = F.linear(predicted, weight, bias)
        return draft_unit_loss(
            predicted.flatten(0, 1),
            target.flatten(0, 1),
            draft_logits.flatten(0, 1),
            target_logits.flatten(0, 1),
            feature_weight,
            token_weight,
        )

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """The 2-D token mask as `generate` has it, also with a static cache: each pass builds its own 4-D mask from
        it (the adapter needs the token mask for positions, FLOPs and exits)."""
        return attention_mask

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        use_draft_unit: bool = False,
        **kwargs,
    ):
        """Transformers' `generate`, with per-token exits or self-speculative decoding.

        Without `assistant_early_exit`, it is Transformers' own `generate` with a key/value cache, each token
        exiting by the configured policy (`exit_policy=` and `exit_threshold=` set it for the call; with `"none"`
        greedy decoding gives the backbone's own output token for token). Any batch size, left padding included.

        With `assistant_early_exit=k` it decodes self-speculatively: the first `k` blocks and the shared final norm
        and LM head draft up to `num_assistant_tokens` tokens, the remaining blocks verify them all in one pass on
        the exit states and cache the draft made (no block runs twice for a token), and every layer's cache is
        cropped back past the first rejected token. The output is the full model's: greedy, token for token; with
        `do_sample=True`, a drafted token is kept with probability `min(1, p/q)` and otherwise replaced by a sample
        of `max(0, p - q)`, so tokens follow the full model's distribution. The units and `exit_policy` play no
        part. It replaces Transformers' early-exit assistant, which runs the shared blocks twice per token.

        With `use_draft_unit=True` the model's draft unit (`config.draft_unit`) drafts instead, from the full
        model's top features and then its own predicted ones, and the whole model verifies: the same lossless
        output, also on a pretrained model never trained for early exit.

        Args:
            inputs (torch.Tensor | None): The prompt's token ids, `(batch_size, prompt_len)`; `input_ids=` works
                too. Defaults to `None`.
            generation_config (GenerationConfig | None): As Transformers' `generate`; keyword arguments override
                it. Defaults to `None` (the model's).
            use_draft_unit (bool): Draft with the draft unit (EAGLE), under the same options and conditions as
                `assistant_early_exit`, which it replaces. Defaults to `False`.
            **kwargs (Any): Transformers' `generate` arguments and model inputs (`attention_mask`, `max_new_tokens`,
                `do_sample`, `logits_processor`, `stopping_criteria`, `streamer`, `return_dict_in_generate`, ...).
                The self-speculative options:

                - `assistant_early_exit` (int): blocks the draft runs, at an exit (a multiple of
                  `layers_per_step`, below the full depth). `None` (the default) decodes without drafts.
                - `num_assistant_tokens` (int): tokens drafted per round at most. Transformers' default, `20`.
                - `assistant_confidence_threshold` (float): a draft stops once its top probability falls below
                  this; `0` drafts a fixed length. Transformers' default, `0.4`.
                - `draft_vocabulary` (torch.Tensor): distinct token ids (e.g. `frequent_tokens` of a corpus); the
                  draft reads only those rows of the LM head, the verification always the whole head, so the output
                  is unchanged. Worth it where the head dominates a token's cost.

                Self-speculative decoding takes a batch of one prompt, `num_beams=1` and a dynamic cache, and
                refuses by name any other model input.

        Returns:
            output (torch.LongTensor | ModelOutput): The prompt and the new tokens, `(batch_size, length)`; with
                `return_dict_in_generate=True` Transformers' output, which for self-speculative decoding is a
                `SelfSpeculativeOutput` (draft statistics included).
        """
        if not isinstance(use_draft_unit, bool):
            raise ValueError(f"use_draft_unit must be a bool, got {use_draft_unit!r}.")
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        if use_draft_unit and config.assistant_early_exit is not None:
            raise ValueError(
                "Draft with an exit (assistant_early_exit) or with the draft unit (use_draft_unit), not both: pass "
                "assistant_early_exit=None where the generation config sets it."
            )
        if config.assistant_early_exit is None and not use_draft_unit:
            return super().generate(inputs, generation_config, **kwargs)
        if "input_ids" in model_kwargs:  # `generate(**tokenizer(...))`, as Transformers' own generate takes it
            if inputs is not None:
                raise ValueError("Pass the prompt once: as `inputs` or as `input_ids`, not both.")
            inputs = model_kwargs.pop("input_ids")
        return self._self_speculative_generate(inputs, config, model_kwargs, use_draft_unit)

    @torch.no_grad()
    def _self_speculative_generate(
        self, input_ids: torch.LongTensor | None, config: GenerationConfig, model_kwargs: dict, use_draft_unit: bool
    ):
        option = "use_draft_unit" if use_draft_unit else "assistant_early_exit"
        processors = model_kwargs.pop("logits_processor", None) or LogitsProcessorList()
        stopping = model_kwargs.pop("stopping_criteria", None) or StoppingCriteriaList()
        streamer, mask = model_kwargs.pop("streamer", None), model_kwargs.pop("attention_mask", None)
        vocabulary = model_kwargs.pop("draft_vocabulary", None)
        model_kwargs.pop("use_cache", None)
        if input_ids is None:
            raise ValueError(f"{option} needs the prompt's input_ids (as `inputs` or `input_ids=`).")
        if model_kwargs:
            raise ValueError(
                f"{option} takes input_ids, attention_mask, logits_processor, "
                f"stopping_criteria, streamer and draft_vocabulary; it does not take "
                f"{', '.join(sorted(model_kwargs))}."
            )
        check_settings(config, input_ids.shape[0], option)
        if use_draft_unit:
            self._checked_draft_unit()
        self._prepare_special_tokens(config, mask is not None, device=input_ids.device)
        if mask is None:  # as generate() infers it: the pad token masked where it is not the end-of-sequence token
            mask = self._prepare_attention_mask_for_generation(input_ids, config, {})
        if config.max_new_tokens is not None:
            config.max_length = input_ids.shape[1] + config.max_new_tokens
        processors = self._get_logits_processor(
            config,
            input_ids.shape[1],
            input_ids,
            logits_processor=processors,
            device=input_ids.device,
            model_kwargs={"attention_mask": mask},
        )
        stopping = self._get_stopping_criteria(config, stopping)
        decoder_class = DraftUnitDecoder if use_draft_unit else SelfSpeculativeDecoder
        decoder = decoder_class(self, config, processors, stopping, mask, streamer, vocabulary)
        sequence = decoder.generate(input_ids)
        return decoder.output(sequence) if config.return_dict_in_generate else sequence

    @staticmethod
    def _load_pretrained_backbone(name_or_path: str, **kwargs) -> PreTrainedModel:
        """A causal LM checkpoint, so that an untied LM head can be kept too."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)

    def _copy_pretrained_weights(self, pretrained: PreTrainedModel) -> None:
        self.adnet.load_backbone_weights(pretrained.base_model)
        if not self.config.tie_word_embeddings:
            self.lm_head.load_state_dict(pretrained.get_output_embeddings().state_dict())

    @can_return_tuple
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
        token_type_ids: torch.LongTensor | None = None,
        output_step_logits: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> ADNetCausalLMOutput:
        r"""Predict every next token, each token stopping at its own exit step.

        Args:
            input_ids (torch.LongTensor | None): `(batch_size, seq_len)` token ids. Defaults to `None`.
            attention_mask (torch.Tensor | None): `(batch_size, seq_len)`, 1 for real tokens and 0 for padding
                (left or right). Defaults to `None`.
            position_ids (torch.LongTensor | None): Positions. Defaults to `None` (counted over the real tokens, so
                left padding is skipped).
            cache (Cache | None): A key/value cache for generation. Defaults to `None`.
            inputs_embeds (torch.Tensor | None): Input embeddings instead of `input_ids`. Defaults to `None`.
            labels (torch.LongTensor | None): `(batch_size, seq_len)` next-token targets as for any Transformers
                causal LM (shifted inside; -100 is ignored). Defaults to `None`.
            use_cache (bool | None): Start a `DynamicCache` when no `cache` is given. Defaults to `None`.
            exit_policy (str | None): Overrides `config.exit_policy` for this call. Defaults to `None`.
            exit_threshold (float | int | None): The policy's setting for this call instead of the config's.
                Defaults to `None`.
            token_type_ids (torch.LongTensor | None): Refused (decoder backbones take none); named so that it is
                not dropped silently. Defaults to `None`.
            output_step_logits (bool): Also return every step's logits (`num_variable_steps x batch x seq_len x
                vocab`: memory-hungry) and, at full depth, the halting distribution. Off by default: the per-step
                losses are taken as each step runs, and at inference full depth runs no unit but the last.
                Defaults to `False`.
            output_hidden_states (bool | None): Also return every block's output. Defaults to `None` (the
                config's).
            output_attentions (bool | None): Also return every block's attention weights. Defaults to `None` (the
                config's).
            num_items_in_batch (int | torch.Tensor | None): Predicted tokens (label not -100) in all the
                micro-batches of one optimiser step (`Trainer` passes it); the loss is then the sum over this
                micro-batch's tokens divided by it. Defaults to `None`.

        Returns:
            The next-token logits, where each token exited, and the loss with `labels`.
        """
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config.backbone_config)
        if labels is not None:
            check_lm_labels(
                labels,
                input_shape({"input_ids": input_ids, "inputs_embeds": inputs_embeds}),
                self.config.backbone_config.vocab_size,
            )
        targets = None if labels is None else labels[:, 1:]

        def step_loss(logits: torch.Tensor) -> torch.Tensor:
            return task_loss(logits[:, :-1], targets, "single_label_classification")

        if labels is not None and self.training and self.config.exit_distillation:
            teacher = self._full_depth_log_probs(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
            )

            def step_loss(logits: torch.Tensor) -> torch.Tensor:
                return distillation_loss(logits[:, :-1], teacher[:, :-1], targets)

        head = StepHead(
            self.step_head,
            self.head_flops(),
            step_loss if labels is not None and self.training else None,
            output_step_logits,
        )
        out = self.adnet(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            exit_policy=exit_policy,
            exit_threshold=exit_threshold,
            step_head=head,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            token_type_ids=token_type_ids,
        )
        loss = None if labels is None else self.combine_losses(out, targets, num_items_in_batch)
        return ADNetCausalLMOutput(
            loss=loss,
            logits=out.logits,
            step_logits=out.step_logits,
            halting_probs=out.halting_probs,
            exit_steps=out.exit_steps,
            executed_layers=out.executed_layers,
            flops=out.flops,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    @torch.no_grad()
    def _full_depth_log_probs(self, **inputs) -> torch.Tensor:
        """The model's own full-depth next-token log-probabilities, as at evaluation (no dropout, no fusion): the
        target of `exit_distillation`."""
        self.eval()
        try:
            return torch.log_softmax(self(**inputs, exit_policy=FULL_DEPTH).logits.float(), dim=-1)
        finally:
            self.train()

    def combine_losses(
        self, out: ADNetModelOutput, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Over every predicted token whose target (B x T-1) is not -100: in training the configured loss over the
        steps, at inference the cross-entropy of the prediction made (so `exp(loss)` is the perplexity). A mean over
        these tokens, or with `num_items_in_batch` their sum divided by it."""
        keep = targets != IGNORE_INDEX
        if out.step_losses is None:
            loss = mean_over_rows(task_loss(out.logits[:, :-1][keep], targets[keep], "single_label_classification"))
        else:
            loss = self.loss_fn(out.step_losses, out.halting_probs[:, :-1], keep)
        if num_items_in_batch is None:
            return loss
        return loss * keep.sum() / num_items_in_batch


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
