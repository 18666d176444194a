"""One adapter per backbone family: how to run "embeddings, then block k" with the backbone's own modules.

The task models never branch on the backbone type: they ask the adapter for the blocks, the embedded input
(`StepState`) and how to run one block. Adding a family means adding one adapter to `_ADAPTERS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.models.llama.modeling_llama import rotate_half
from transformers.pytorch_utils import Conv1D
from transformers.utils.output_capturing import OutputRecorder


@dataclass
class StepState:
    """What flows from one backbone block to the next for the samples still in the batch.

    hidden: B x T x H (transformers) or B x C x H' x W' (CNNs).
    token_mask: B x T, 1 for real tokens (None when every position is real, e.g. images).
    block_kwargs: keyword arguments every block takes (4D attention mask, positions, rotary embeddings);
        tensors in it have the batch first, so removing exited samples is one index.
    """

    hidden: torch.Tensor
    token_mask: torch.Tensor | None = None
    block_kwargs: dict[str, Any] = field(default_factory=dict)
    _padded: bool | None = field(default=None, init=False, repr=False)

    def pooling_mask(self) -> torch.Tensor | None:
        """`token_mask` for pooling over the tokens, or None when every token is real (always at batch 1), so that
        pooling reads no mask. The mask is read once per state, not while a graph is traced."""
        if self.token_mask is not None and self._padded is None:
            self._padded = torch.compiler.is_compiling() or not bool(self.token_mask.all())
        return self.token_mask if self._padded else None

    def select(self, keep: torch.Tensor) -> StepState:
        """The state of the samples at indices `keep` only."""
        return StepState(
            hidden=self.hidden[keep],
            token_mask=None if self.token_mask is None else self.token_mask[keep],
            block_kwargs=select_batch(self.block_kwargs, keep),
        )


@dataclass(frozen=True)
class Flops:
    """Estimated FLOPs as numbers per item, so that adding them up costs no tensor operation: `items` for each item,
    `tokens` for each real token it covers (a pooled sample's real tokens, or a token itself) and `context` for each
    position such a token attends to. `FlopsAccountant` puts them on the items with the token mask and the context
    of each token (`BackboneAdapter.context_lengths`)."""

    items: float = 0.0
    tokens: float = 0.0
    context: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.items + other.items, self.tokens + other.tokens, self.context + other.context)


def select_batch(value: Any, keep: torch.Tensor) -> Any:
    """`value` (a tensor with the batch first, or a tuple / dict of them) for the samples `keep` only."""
    if isinstance(value, torch.Tensor):
        return value[keep]
    if isinstance(value, tuple):
        return tuple(select_batch(v, keep) for v in value)
    if isinstance(value, dict):
        return {k: select_batch(v, keep) for k, v in value.items()}
    return value


def _positions_from_mask(token_mask: torch.Tensor, past_length: int) -> torch.Tensor:
    """Position ids that skip left padding, so a padded sample sees the positions it has alone."""
    positions = token_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, past_length:] if past_length else positions.clamp(min=0)


def _token_mask(inputs: dict[str, Any], batch: int, length: int, device: torch.device) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    return mask


_MATMUL_WEIGHTS: WeakKeyDictionary[nn.Module, int] = WeakKeyDictionary()


def matmul_weights(module: nn.Module) -> int:
    """Weights of the linear and convolution layers in `module`: each costs 2 FLOPs per output position."""
    if module not in _MATMUL_WEIGHTS:
        _MATMUL_WEIGHTS[module] = sum(
            m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, Conv1D))
        )
    return _MATMUL_WEIGHTS[module]


class BackboneAdapter:
    """Runs a Transformers backbone step by step. Subclasses name the modules of one family."""

    model_types: tuple[str, ...] = ()
    main_input_name = "input_ids"
    input_names: tuple[str, ...] = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
    absolute_positions = False  # a learned position table (`max_position_embeddings`) bounds the sequence length
    is_causal = False
    has_attention = True

    def build(self, config: PreTrainedConfig) -> PreTrainedModel:
        return AutoModel.from_config(config)

    def num_blocks(self, config: PreTrainedConfig) -> int:
        return config.num_hidden_layers

    def block_sizes(self, config: PreTrainedConfig) -> list[int]:
        """Width of each block's output, the input size of a unit after it."""
        return [config.hidden_size] * self.num_blocks(config)

    def blocks(self, backbone: PreTrainedModel) -> list[nn.Module]:
        raise NotImplementedError

    def max_length(self, config: PreTrainedConfig) -> int | None:
        """The longest sequence the backbone takes (its position table); None when positions are unbounded."""
        return config.max_position_embeddings if self.absolute_positions else None

    def hidden_state_blocks(self, config: PreTrainedConfig) -> list[int]:
        """The blocks whose outputs the backbone's own `hidden_states` holds (after the embedding output)."""
        return list(range(self.num_blocks(config)))

    def skipped_block_shape(
        self, config: PreTrainedConfig, shape: torch.Size, from_block: int, block: int
    ) -> torch.Size:
        """The output shape (after the batch) of `block`, which ran for no sample, from `shape`, block
        `from_block`'s: a transformer's blocks keep it."""
        return shape

    def embed(self, backbone: PreTrainedModel, inputs: dict[str, Any], cache=None) -> StepState:
        raise NotImplementedError

    def run_block(self, block: nn.Module, state: StepState, cache=None) -> torch.Tensor:
        return block(state.hidden, cache=cache, **state.block_kwargs)

    def unit_view(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block output as B x T x H, the layout the calculation units read."""
        return hidden

    def block_flops(self, block: nn.Module, output: torch.Tensor) -> Flops:
        """Estimated FLOPs of `block` at each real token: its matrix products (2 per weight), and for attention the
        scores and weighted values over the token's context (all tokens, or the causal past with the cache)."""
        return Flops(tokens=2.0 * matmul_weights(block), context=4.0 * output.shape[-1] if self.has_attention else 0.0)

    def context_lengths(self, state: StepState) -> torch.Tensor:
        """How many positions each token attends to (B x T, or B x 1 for the same number in a whole sample)."""
        if self.is_causal:
            return state.block_kwargs["position_ids"] + 1
        return state.token_mask.sum(-1, keepdim=True)

    def final_norm(self, backbone: PreTrainedModel) -> nn.Module:
        """The norm applied before the LM head (causal LMs only)."""
        raise NotImplementedError(f"{type(self).__name__} has no LM head")

    def kv_projection(
        self, block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values `block` would cache for input `hidden` (B x T x H), as B x heads x T x head_dim,
        computed with its key/value projections only (decoders, for per-token exit with a cache)."""
        raise NotImplementedError(f"{type(self).__name__} has no key/value cache")


class BertAdapter(BackboneAdapter):
    """BERT and RoBERTa: `embeddings`, then `encoder.layer[k]` with a bidirectional mask."""

    model_types = ("bert", "roberta")
    input_names = (*BackboneAdapter.input_names, "token_type_ids")
    absolute_positions = True

    def max_length(self, config):
        """RoBERTa's positions start after its padding id (`create_position_ids_from_input_ids`)."""
        offset = config.pad_token_id + 1 if config.model_type == "roberta" else 0
        return config.max_position_embeddings - offset

    def build(self, config: PreTrainedConfig) -> PreTrainedModel:
        return AutoModel.from_config(config, add_pooling_layer=False)

    def blocks(self, backbone):
        return list(backbone.encoder.layer)

    def embed(self, backbone, inputs, cache=None):
        hidden = backbone.embeddings(
            input_ids=inputs.get("input_ids"),
            token_type_ids=inputs.get("token_type_ids"),
            position_ids=inputs.get("position_ids"),
            inputs_embeds=inputs.get("inputs_embeds"),
        )
        token_mask = _token_mask(inputs, *hidden.shape[:2], hidden.device)
        mask = create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=token_mask)
        return StepState(hidden, token_mask, {"attention_mask": mask})


class DecoderAdapter(BackboneAdapter):
    """Decoder-only LMs: token embeddings, positions that skip left padding, a causal mask over the cache."""

    is_causal = True

    def encode_positions(
        self, backbone, embeds: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The first block's input and any position arguments every block takes."""
        raise NotImplementedError

    def embed(self, backbone, inputs, cache=None):
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = backbone.get_input_embeddings()(inputs["input_ids"])
        past = cache.get_seq_length() if cache is not None else 0
        token_mask = _token_mask(inputs, embeds.shape[0], past + embeds.shape[1], embeds.device)
        positions = inputs.get("position_ids")
        if positions is None:
            positions = _positions_from_mask(token_mask, past)
        positions = positions.expand(embeds.shape[0], -1)  # (1, T) broadcast: batch first, as samples leave
        mask = create_causal_mask(
            config=backbone.config, inputs_embeds=embeds, attention_mask=token_mask, cache=cache, position_ids=positions
        )
        hidden, position_kwargs = self.encode_positions(backbone, embeds, positions)
        kwargs = {"attention_mask": mask, "position_ids": positions, **position_kwargs}
        return StepState(hidden, token_mask[:, past:], kwargs)

    def new_block(self, backbone: PreTrainedModel) -> nn.Module:
        """A new block of the backbone's own class and config, with random weights and its keys/values in layer 0 of
        a cache of its own: the layer of a draft unit (`draft_adnet.DraftUnit`)."""
        return type(self.blocks(backbone)[0])(backbone.config, layer_idx=0)


class GPT2Adapter(DecoderAdapter):
    """GPT-2: `wte + wpe`, then `h[k]`; `ln_f` before the tied LM head."""

    model_types = ("gpt2",)
    absolute_positions = True

    def blocks(self, backbone):
        return list(backbone.h)

    def encode_positions(self, backbone, embeds, positions):
        return backbone.drop(embeds + backbone.wpe(positions)), {}

    def final_norm(self, backbone):
        return backbone.ln_f

    def kv_projection(self, block, hidden, block_kwargs):
        attn = block.attn
        size = attn.split_size
        normed = block.ln_1(hidden)
        # GPT-2's Conv1D keeps (in, out) weights; columns [size:] are the key and value projections
        kv = torch.addmm(attn.c_attn.bias[size:], normed.reshape(-1, normed.shape[-1]), attn.c_attn.weight[:, size:])
        key, value = kv.view(*normed.shape[:-1], 2 * size).split(size, dim=-1)
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)


class LlamaAdapter(DecoderAdapter):
    """Llama family: `embed_tokens`, rotary embeddings shared by all `layers[k]`; `norm` before the LM head."""

    model_types = ("llama", "mistral", "qwen2")

    def blocks(self, backbone):
        return list(backbone.layers[: backbone.config.num_hidden_layers])

    def encode_positions(self, backbone, embeds, positions):
        return embeds, {"position_embeddings": backbone.rotary_emb(embeds, position_ids=positions)}

    def final_norm(self, backbone):
        return backbone.norm

    def kv_projection(self, block, hidden, block_kwargs):
        attn = block.self_attn
        normed = block.input_layernorm(hidden)
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        key = attn.k_proj(normed).view(shape).transpose(1, 2)
        value = attn.v_proj(normed).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in block_kwargs["position_embeddings"])
        return key * cos + rotate_half(key) * sin, value


class ResNetAdapter(BackboneAdapter):
    """ResNet: the stem (`embedder`), then every residual block of every stage in order."""

    model_types = ("resnet",)
    main_input_name = "pixel_values"
    input_names = ("pixel_values",)
    has_attention = False

    def num_blocks(self, config):
        return sum(config.depths)

    def block_sizes(self, config):
        return [size for size, depth in zip(config.hidden_sizes, config.depths) for _ in range(depth)]

    def hidden_state_blocks(self, config):
        """`ResNetModel` reports one hidden state per stage: the output of its last block."""
        return [sum(config.depths[: stage + 1]) - 1 for stage in range(len(config.depths))]

    def skipped_block_shape(self, config, shape, from_block, block):
        """Its stage's channels; every stage entered after `from_block`'s halves the sides (stride 2, rounding up)."""
        stage = [index for index, depth in enumerate(config.depths) for _ in range(depth)]
        sides = list(shape[1:])
        for _ in range(stage[block] - stage[from_block]):
            sides = [(side + 1) // 2 for side in sides]
        return torch.Size([config.hidden_sizes[stage[block]], *sides])

    def blocks(self, backbone):
        return [block for stage in backbone.encoder.stages for block in stage.layers]

    def embed(self, backbone, inputs, cache=None):
        return StepState(backbone.embedder(inputs["pixel_values"]))

    def run_block(self, block, state, cache=None):
        return block(state.hidden)

    def unit_view(self, hidden):
        return hidden.flatten(2).transpose(1, 2)

    def block_flops(self, block, output):
        """Every position of a feature map is real: its FLOPs are a number per image."""
        return Flops(items=2.0 * matmul_weights(block) * output.shape[2] * output.shape[3])


@contextmanager
def recording_attentions(backbone: PreTrainedModel, enabled: bool) -> Iterator[list[torch.Tensor] | None]:
    """Collect the attention weights of every attention module the backbone declares as recordable."""
    records: list[torch.Tensor] = []
    if not enabled:
        yield None
        return
    spec = type(backbone)._can_record_outputs.get("attentions") if type(backbone)._can_record_outputs else None
    if spec is None:
        raise ValueError(f"output_attentions is not available for a {backbone.config.model_type} backbone")
    if backbone.config._attn_implementation != "eager":
        raise ValueError(
            "output_attentions needs the eager attention implementation: load the model with "
            "attn_implementation='eager'"
        )
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


_ADAPTERS: dict[str, BackboneAdapter] = {
    model_type: adapter
    for adapter in (BertAdapter(), GPT2Adapter(), LlamaAdapter(), ResNetAdapter())
    for model_type in adapter.model_types
}
SUPPORTED_BACKBONES = tuple(_ADAPTERS)


def backbone_adapter(config: PreTrainedConfig | None) -> BackboneAdapter:
    """The adapter for a backbone config, or a `ValueError` naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"ADNetConfig.backbone_config must be a config of one of {SUPPORTED_BACKBONES}, got {model_type!r}."
        )
    return _ADAPTERS[model_type]


def backbones_taking(input_name: str) -> tuple[str, ...]:
    """The supported backbone model types whose input is `input_name` (`input_ids` or `pixel_values`)."""
    return tuple(model_type for model_type, adapter in _ADAPTERS.items() if adapter.main_input_name == input_name)
