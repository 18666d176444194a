"""ADNet for Hugging Face Transformers: calculation units with learned halting on pretrained backbones.

Importing the package registers `model_type="adnet"` with `AutoConfig` and the Auto model classes, and makes saved
checkpoints carry the modeling files and an `auto_map` for all three task heads, so they load with
`trust_remote_code=True` where this package is not installed.
"""

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
from .exits_adnet import EXIT_RULES, ConfidenceExit, ExitRule, HaltingExit, PatienceExit, register_exit_rule
from .halting_adnet import HaltingFit, fit_halting
from .losses_adnet import DeepSupervisionLoss, GrowingPlateauSensitiveLoss, LastStepLoss, PonderNetLoss
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
from .trainer_adnet import ADNetTrainer, ADNetTrainingArguments, MaxNormCallback, compute_classification_metrics

__version__ = "0.1.0"

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
    "ADNetTrainer",
    "ADNetTrainingArguments",
    "MaxNormCallback",
    "compute_classification_metrics",
    "CalibrationResult",
    "calibrate_exit",
    "HaltingFit",
    "fit_halting",
    "evaluate_batches",
    "sweep_exits",
    "task_metrics",
    "ADNetCausalLMOutput",
    "ADNetConfig",
    "ADNetForCausalLM",
    "ADNetForImageClassification",
    "ADNetForSequenceClassification",
    "ADNetModel",
    "ADNetModelOutput",
    "ADNetPreTrainedModel",
    "ADNetSequenceClassifierOutput",
    "ConfidenceExit",
    "DeepSupervisionLoss",
    "EXIT_RULES",
    "ExitRule",
    "HaltingExit",
    "PatienceExit",
    "register_exit_rule",
    "GrowingPlateauSensitiveLoss",
    "LastStepLoss",
    "PonderNetLoss",
]
