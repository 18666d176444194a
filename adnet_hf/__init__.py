"""ADNet for Hugging Face Transformers: calculation units with learned halting on pretrained backbones.

Importing the package registers `model_type="adnet"` with `AutoConfig` and the Auto model classes, and makes saved
checkpoints carry the modeling files and an `auto_map` for all three task heads, so they load with
`trust_remote_code=True` where this package is not installed.

Every name a user imports is here. The training names (`ADNetTrainer`, `ADNetTrainingArguments`, `MaxNormCallback`,
`compute_classification_metrics`, and `adnet_optimizer_groups`, `floor_scheduler`, `apply_max_norm` for a loop of
your own; the draft unit's `DraftUnitTrainer`, `TopFeatureShards`, `cache_top_features`) load on first use:
Transformers' `Trainer` and `TrainingArguments` import PEFT and `datasets` where they are installed, which a model
that only runs has no use for. `adnet_lora_config` and the ONNX export import PEFT and ONNX Runtime only when
called.
"""

import importlib
from typing import TYPE_CHECKING

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from .calibration_adnet import CalibrationResult, calibrate_exit
from .configuration_adnet import ADNetConfig
from .evaluation_adnet import evaluate_batches, sweep_exits, task_metrics
from .exits_adnet import (
    EXIT_RULES,
    ConfidenceExit,
    ExitRule,
    HaltingExit,
    PatienceExit,
    halting_distribution,
    register_exit_rule,
)
from .export_adnet import ADNetStepRunner, StepRunnerOutput, export_steps
from .halting_adnet import HaltingFit, fit_halting
from .losses_adnet import (
    ADNetLoss,
    DeepSupervisionLoss,
    GrowingPlateauSensitiveLoss,
    LastStepLoss,
    LayerSkipLoss,
    PonderNetLoss,
    draft_unit_loss,
)
from .modeling_adnet import (
    ADNetCausalLMOutput,
    ADNetForCausalLM,
    ADNetForImageClassification,
    ADNetForSequenceClassification,
    ADNetModel,
    ADNetModelOutput,
    ADNetPreTrainedModel,
    ADNetSequenceClassifierOutput,
)
from .peft_adnet import adnet_lora_config
from .sharding_adnet import blocks_are_sharded
from .speculative_adnet import SelfSpeculativeOutput, frequent_tokens

if TYPE_CHECKING:
    from .trainer_adnet import (
        ADNetTrainer,
        ADNetTrainingArguments,
        DraftUnitTrainer,
        MaxNormCallback,
        TopFeatureShards,
        adnet_optimizer_groups,
        apply_max_norm,
        cache_top_features,
        compute_classification_metrics,
        floor_scheduler,
    )

__version__ = "0.1.0"

# Loaded on first access (`__getattr__`): importing Transformers' trainer imports PEFT and `datasets` where installed.
_LAZY_MODULE = "trainer_adnet"
_LAZY = (
    "ADNetTrainer",
    "ADNetTrainingArguments",
    "MaxNormCallback",
    "compute_classification_metrics",
    "adnet_optimizer_groups",
    "floor_scheduler",
    "apply_max_norm",
    "DraftUnitTrainer",
    "TopFeatureShards",
    "cache_top_features",
)


def __getattr__(name: str):
    if name != _LAZY_MODULE and name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY_MODULE}", __name__)  # `adnet_hf.trainer_adnet` itself, or a name in it
    value = module if name == _LAZY_MODULE else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


_AUTO_CLASSES = {
    "AutoModel": ADNetModel,
    "AutoModelForSequenceClassification": ADNetForSequenceClassification,
    "AutoModelForCausalLM": ADNetForCausalLM,
    "AutoModelForImageClassification": ADNetForImageClassification,
}


def _register() -> None:
    AutoConfig.register(ADNetConfig.model_type, ADNetConfig, exist_ok=True)
    for auto_class, model_class in zip(
        (AutoModel, AutoModelForSequenceClassification, AutoModelForCausalLM, AutoModelForImageClassification),
        _AUTO_CLASSES.values(),
    ):
        auto_class.register(ADNetConfig, model_class, exist_ok=True)
    ADNetConfig.register_for_auto_class()
    for auto_name, model_class in _AUTO_CLASSES.items():
        model_class.register_for_auto_class(auto_name)


_register()

__all__ = [
    # configuration and models
    "ADNetConfig",
    "ADNetPreTrainedModel",
    "ADNetModel",
    "ADNetForSequenceClassification",
    "ADNetForImageClassification",
    "ADNetForCausalLM",
    "ADNetModelOutput",
    "ADNetSequenceClassifierOutput",
    "ADNetCausalLMOutput",
    "blocks_are_sharded",
    # training
    "ADNetTrainer",
    "ADNetTrainingArguments",
    "MaxNormCallback",
    "compute_classification_metrics",
    "adnet_optimizer_groups",
    "floor_scheduler",
    "apply_max_norm",
    "fit_halting",
    "HaltingFit",
    "DraftUnitTrainer",
    "TopFeatureShards",
    "cache_top_features",
    # exits and calibration
    "ExitRule",
    "HaltingExit",
    "ConfidenceExit",
    "PatienceExit",
    "EXIT_RULES",
    "register_exit_rule",
    "halting_distribution",
    "calibrate_exit",
    "CalibrationResult",
    # losses
    "ADNetLoss",
    "GrowingPlateauSensitiveLoss",
    "PonderNetLoss",
    "DeepSupervisionLoss",
    "LastStepLoss",
    "LayerSkipLoss",
    "draft_unit_loss",
    # evaluation
    "evaluate_batches",
    "sweep_exits",
    "task_metrics",
    # generation
    "frequent_tokens",
    "SelfSpeculativeOutput",
    # export (ONNX)
    "export_steps",
    "ADNetStepRunner",
    "StepRunnerOutput",
    # parameter-efficient fine-tuning
    "adnet_lora_config",
]
