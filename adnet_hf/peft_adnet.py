"""Parameter-efficient fine-tuning (PEFT) of ADNet: LoRA on the backbone's blocks, the units and heads fully trained.

PEFT picks LoRA's target modules by the model type (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`) and makes a
sequence classifier's `classifier` / `score` fully trainable (`modules_to_save`). An ADNet model is neither of the
types PEFT knows nor named like them: its targets depend on the backbone, and its calculation units and output layers
are new (randomly initialised), so they must be trained fully. `adnet_lora_config` names both for PEFT:

    from peft import get_peft_model
    from adnet_hf.peft_adnet import adnet_lora_config

    model = get_peft_model(model, adnet_lora_config(model, r=8, lora_alpha=16))

Targets are given as the full names of the layers in the backbone's blocks, so the units' own `dense` layers (and a
pooler or LM head outside the blocks) never get an adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from transformers.pytorch_utils import Conv1D

from .modeling_adnet import ADNetForCausalLM, ADNetForSequenceClassification, ADNetPreTrainedModel

if TYPE_CHECKING:
    from peft import LoraConfig

# The layer types LoRA adapts that a transformer block holds (GPT-2's fused projections are `Conv1D`).
LORA_LAYER_TYPES = (nn.Linear, Conv1D)
# PEFT's task type for each head (`ADNetModel` alone gives features); PEFT's task wrappers pass the inputs through.
_TASK_TYPES = {ADNetForSequenceClassification: "SEQ_CLS", ADNetForCausalLM: "CAUSAL_LM"}


def _adnet_model(model: ADNetPreTrainedModel):
    if not isinstance(model, ADNetPreTrainedModel):
        raise TypeError(f"model must be an ADNet model (ADNetPreTrainedModel), got {type(model).__name__}.")
    if not model.base_model.adapter.has_attention:
        raise ValueError(
            "LoRA on a ResNet backbone is not supported: its BatchNorm statistics change in training "
            "and are not part of the adapter. Use a text backbone (BERT, RoBERTa, GPT-2, Llama)."
        )
    return model.base_model


def lora_target_modules(model: ADNetPreTrainedModel, names: list[str] | None = None) -> list[str]:
    """Full names of the layers LoRA adapts: every linear layer of the backbone's blocks (attention and MLP), or with
    `names` (e.g. `["query", "value"]`) those among them whose name is or ends with one of `names`."""
    adnet = _adnet_model(model)
    blocks = {id(block) for block in adnet.adapter.blocks(adnet.backbone)}
    targets = []
    for block_name, block in model.named_modules():
        if id(block) not in blocks:
            continue
        for name, layer in block.named_modules():
            if isinstance(layer, LORA_LAYER_TYPES) and (
                names is None or any(name == wanted or name.endswith(f".{wanted}") for wanted in names)
            ):
                targets.append(f"{block_name}.{name}")
    if not targets:
        raise ValueError(
            f"target_modules {names} match no linear layer in the backbone's blocks; the layers of the "
            f"first block are {sorted(_block_layer_names(adnet))}."
        )
    return targets


def _block_layer_names(adnet) -> set[str]:
    block = adnet.adapter.blocks(adnet.backbone)[0]
    return {name for name, layer in block.named_modules() if isinstance(layer, LORA_LAYER_TYPES)}


def adnet_trained_modules(model: ADNetPreTrainedModel) -> list[str]:
    """Full names of the modules ADNet adds to the backbone, which PEFT trains fully and saves (`modules_to_save`):
    each calculation unit with weights, and each output layer of a classifier (a causal LM predicts with the
    backbone's own LM head, which stays frozen)."""
    adnet = _adnet_model(model)
    added = [*adnet.units, *getattr(model, "output_layers", ())]
    added = {id(module) for module in added if any(True for _ in module.parameters())}
    return [name for name, module in model.named_modules() if id(module) in added]


def adnet_lora_config(
    model: ADNetPreTrainedModel, target_modules: list[str] | None = None, **lora_kwargs
) -> LoraConfig:
    """A PEFT `LoraConfig` for an ADNet model: LoRA on the backbone's blocks, the units and output layers trained fully.

    PEFT picks LoRA's targets by model type and trains a classifier's `classifier` / `score` fully; an ADNet model
    is neither a type PEFT knows nor named like that, and its units and output layers are new, so they must train
    fully. This names both: LoRA targets given by full name, so the units' own layers (and a pooler or LM head
    outside the blocks) never get an adapter, and every unit and output layer in `modules_to_save` (a causal LM's
    LM head is the backbone's and stays frozen). Use it as `get_peft_model(model, adnet_lora_config(model, r=8))`.

    Args:
        model (ADNetPreTrainedModel): An ADNet model with a text backbone (BERT, RoBERTa, GPT-2, Llama); a ResNet
            is refused (its BatchNorm statistics would change outside the adapter).
        target_modules (list[str] | None): Layer names to adapt among the blocks' linear layers, e.g.
            `["query", "value"]` (a name matches a layer whose name is or ends with it). Defaults to `None` (every
            linear layer of the blocks: attention and MLP).
        **lora_kwargs (Any): `LoraConfig`'s other arguments (`r`, `lora_alpha`, `lora_dropout`, ...);
            `modules_to_save` and `task_type` are set from the model and refused here.

    Returns:
        The config, with the task type of the model's head (`SEQ_CLS`, `CAUSAL_LM`, else `FEATURE_EXTRACTION`).

    Raises:
        ImportError: PEFT is not installed (`pip install 'adnet-hf[peft]'`).
    """
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("adnet_lora_config needs PEFT: pip install 'adnet-hf[peft]'.") from error
    for key in ("modules_to_save", "task_type"):
        if key in lora_kwargs:
            raise ValueError(
                f"{key} is set by adnet_lora_config from the model; pass LoraConfig(...) yourself to choose it."
            )
    task_type = _TASK_TYPES.get(type(model), "FEATURE_EXTRACTION")
    return LoraConfig(
        task_type=task_type,
        target_modules=lora_target_modules(model, target_modules),
        modules_to_save=adnet_trained_modules(model),
        **lora_kwargs,
    )


__all__ = ["adnet_lora_config", "adnet_trained_modules", "lora_target_modules"]
