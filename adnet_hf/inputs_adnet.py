"""What a forward pass receives, checked once before any block runs.

A bad input is refused with a `ValueError` (wrong shape or values) or `TypeError` (not a tensor, wrong dtype) that
names the argument and says what is allowed, instead of failing with a shape error deep inside a block, or not at
all. `ADNetModel.forward` checks the model inputs for every head; the heads check their `labels` here too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedConfig

from .backbones_adnet import BackboneAdapter
from .losses_adnet import IGNORE_INDEX, resolve_problem_type

_MAIN_INPUT_RANKS = {"input_ids": 2, "inputs_embeds": 3, "pixel_values": 4}


def _tensor(name: str, value: Any, rank: int, layout: str) -> torch.Tensor:
    """`value`, which must be a tensor of `rank` dimensions (`layout` names them), with at least one element."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}.")
    if value.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(value.shape)}.")
    if not value.numel():
        raise ValueError(
            f"{name} must not be empty (at least one sample and one position), got shape {tuple(value.shape)}."
        )
    return value


def _integer(name: str, value: torch.Tensor) -> None:
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {value.dtype}.")


def _floating(name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    """A float tensor of the weights' dtype (any float dtype under autocast, which casts it)."""
    autocast = value.is_floating_point() and torch.is_autocast_enabled(value.device.type)
    if value.dtype != dtype and not autocast:
        raise TypeError(
            f"{name} must be a {dtype} tensor like the model's weights, got {value.dtype}: cast it with "
            f".to(model.dtype)."
        )


def _values_checkable() -> bool:
    """Value checks read the data, which a graph being traced (`torch.export`, `torch.compile`) does not have: there
    only shapes and dtypes are checked, as in Transformers' own models."""
    return not torch.compiler.is_compiling()


def _in_range(name: str, value: torch.Tensor, low: float, high: float, what: str, ignore: int | None = None) -> None:
    """Every element of `value` (but `ignore`) lies in [low, high) (`high` included for float ranges)."""
    if not _values_checkable():
        return
    kept = value if ignore is None else value[value != ignore]
    if not kept.numel():
        return
    smallest, largest = (v.item() for v in torch.aminmax(kept))
    too_high = largest > high if value.is_floating_point() else largest >= high
    if smallest < low or too_high:
        allowed = f"{what}{'' if ignore is None else f' or {ignore} (ignored)'}"
        raise ValueError(f"{name} must hold {allowed}, got values from {smallest} to {largest}.")


def input_shape(inputs: dict[str, Any]) -> tuple[int, ...] | None:
    """(batch, length) of the token inputs, or (batch,) of `pixel_values`; None when the main input is missing or of
    the wrong rank (the model's own check then names it)."""
    for name, rank in _MAIN_INPUT_RANKS.items():
        value = inputs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == rank:
            return tuple(value.shape[:1] if name == "pixel_values" else value.shape[:2])
    return None


def check_model_inputs(
    adapter: BackboneAdapter, config: PreTrainedConfig, inputs: dict[str, Any], dtype: torch.dtype, past_length: int = 0
) -> None:
    """Raise unless `inputs` (the non-None forward arguments) are what the backbone's family takes: one main input
    of the right shape and dtype, a 2-D 0/1 token mask covering the cache and the new tokens, ids in range."""
    given = sorted(name for name, value in inputs.items() if value is not None)
    unknown = [name for name in given if name not in adapter.input_names]
    if unknown:
        raise ValueError(
            f"ADNet on a {config.model_type} backbone does not take {unknown[0]}: it takes "
            f"{', '.join(adapter.input_names)}."
        )
    main = [name for name in given if name in _MAIN_INPUT_RANKS]
    if len(main) != 1:
        names = " or ".join(name for name in adapter.input_names if name in _MAIN_INPUT_RANKS)
        raise ValueError(f"Pass only one of {names}, got {' and '.join(main)}." if main else f"{names} is required.")
    if main[0] == "pixel_values":
        pixels = _tensor("pixel_values", inputs["pixel_values"], 4, "(batch_size, num_channels, height, width)")
        if pixels.shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values must have num_channels={config.num_channels} channels (dim 1), got "
                f"shape {tuple(pixels.shape)}."
            )
        _floating("pixel_values", pixels, dtype)
        return
    batch, length = _check_tokens(main[0], inputs[main[0]], config, dtype)
    _check_positions(adapter, config, main[0], inputs.get("position_ids"), batch, length, past_length)
    if inputs.get("token_type_ids") is not None:
        token_types = _tensor("token_type_ids", inputs["token_type_ids"], 2, "(batch_size, sequence_length)")
        _same_shape("token_type_ids", token_types, (batch, length), "input_ids")
        _integer("token_type_ids", token_types)
        _in_range(
            "token_type_ids",
            token_types,
            0,
            config.type_vocab_size,
            f"segment ids in [0, type_vocab_size={config.type_vocab_size})",
        )
    if inputs.get("attention_mask") is not None:
        _check_attention_mask(inputs["attention_mask"], batch, past_length + length)


def _check_tokens(name: str, value: Any, config: PreTrainedConfig, dtype: torch.dtype) -> tuple[int, int]:
    if name == "input_ids":
        ids = _tensor(name, value, 2, "(batch_size, sequence_length)")
        _integer(name, ids)
        _in_range(name, ids, 0, config.vocab_size, f"token ids in [0, vocab_size={config.vocab_size})")
        return tuple(ids.shape)
    embeds = _tensor(name, value, 3, "(batch_size, sequence_length, hidden_size)")
    if embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds must have hidden_size={config.hidden_size} features, got {embeds.shape[-1]}.")
    _floating(name, embeds, dtype)
    return tuple(embeds.shape[:2])


def _check_positions(
    adapter: BackboneAdapter,
    config: PreTrainedConfig,
    tokens: str,
    position_ids: Any,
    batch: int,
    length: int,
    past_length: int,
) -> None:
    """Explicit positions fit the position table; implied ones (the `tokens`, after the cache) fit the backbone's
    longest sequence."""
    table = config.max_position_embeddings if adapter.absolute_positions else None
    if position_ids is None:
        limit = adapter.max_length(config)
        if limit is not None and past_length + length > limit:
            cached = f" after {past_length} cached tokens" if past_length else ""
            raise ValueError(
                f"{tokens} has {length} tokens{cached}, more than the {limit} positions of the "
                f"{config.model_type} backbone: truncate it (e.g. the tokenizer's max_length={limit})."
            )
        return
    positions = _tensor("position_ids", position_ids, 2, "(batch_size or 1, sequence_length)")
    if positions.shape[0] not in (1, batch) or positions.shape[1] != length:
        raise ValueError(
            f"position_ids must have shape ({batch} or 1, {length}) like the tokens, got {tuple(positions.shape)}."
        )
    _integer("position_ids", positions)
    _in_range(
        "position_ids", positions, 0, table or float("inf"), f"positions in [0, {table})" if table else "positions >= 0"
    )


def _same_shape(name: str, value: torch.Tensor, shape: tuple[int, ...], like: str) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have the shape of {like}, {shape}, got {tuple(value.shape)}.")


def _check_attention_mask(value: Any, batch: int, length: int) -> None:
    mask = _tensor(
        "attention_mask",
        value,
        2,
        "(batch_size, sequence_length), a 2-D token mask (ADNet needs each "
        "token's mask for positions, exits and FLOPs, and builds the 4-D mask itself)",
    )
    _same_shape("attention_mask", mask, (batch, length), "the tokens (with the cached ones, if any)")
    if mask.is_complex():
        raise TypeError(f"attention_mask must be a bool, integer or float tensor, got {mask.dtype}.")
    if mask.dtype != torch.bool and _values_checkable() and ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold 1 for real tokens and 0 for padding, got other values.")


def check_classification_labels(
    labels: Any, problem_type: str | None, num_labels: int, shape: tuple[int, ...] | None
) -> tuple[torch.Tensor, str]:
    """`labels` for a classifier, and the problem type (`problem_type`, or the one Transformers infers from them):
    single-label `(batch_size,)` class indices (`(batch_size, 1)` is flattened, as Transformers' heads do),
    multi-label `(batch_size, num_labels)` targets in [0, 1], regression `(batch_size,)` or
    `(batch_size, num_labels)`. Anything else raises, naming what is allowed."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    problem_type = resolve_problem_type(problem_type, num_labels, labels)
    batch = shape[0] if shape else None
    if problem_type == "single_label_classification":
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.view(-1)
        _labels_shape(labels, [(batch,)], "class indices for single_label_classification")
        _integer("labels", labels)
        _in_range(
            "labels", labels, 0, num_labels, f"class indices in [0, num_labels={num_labels})", ignore=IGNORE_INDEX
        )
        return labels, problem_type
    if labels.is_complex():
        raise TypeError(f"labels must be a real tensor for {problem_type}, got {labels.dtype}.")
    if problem_type == "multi_label_classification":
        _labels_shape(
            labels,
            [(batch, num_labels)],
            "0/1 targets for multi_label_classification (class indices need an integer tensor)",
        )
        _in_range("labels", labels.float(), 0.0, 1.0, "targets in [0, 1] for multi_label_classification")
        return labels, problem_type
    allowed = [(batch,), (batch, num_labels)] if num_labels == 1 else [(batch, num_labels)]
    _labels_shape(labels, allowed, "regression targets")
    return labels, problem_type


def _labels_shape(labels: torch.Tensor, allowed: list[tuple], what: str) -> None:
    if not any(
        len(labels.shape) == len(shape) and all(s is None or s == n for s, n in zip(shape, labels.shape))
        for shape in allowed
    ):
        shapes = " or ".join(str(shape) for shape in allowed)
        raise ValueError(f"labels must be {what} of shape {shapes}, got shape {tuple(labels.shape)}.")


def check_lm_labels(labels: Any, shape: tuple[int, ...] | None, vocab_size: int) -> None:
    """A causal LM's `labels`: token ids (or -100) of the tokens' shape `(batch_size, sequence_length)`."""
    labels = _tensor("labels", labels, 2, "(batch_size, sequence_length) like input_ids")
    if shape is not None:
        _same_shape("labels", labels, shape, "input_ids")
    _integer("labels", labels)
    _in_range("labels", labels, 0, vocab_size, f"token ids in [0, vocab_size={vocab_size})", ignore=IGNORE_INDEX)
