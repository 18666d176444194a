"""ADNet configuration: the backbone's config plus the settings of units, halting, exits and losses."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .backbones_adnet import backbone_adapter
from .exits_adnet import EXIT_RULES, exit_policies, is_int, is_number
from .losses_adnet import LOSSES

LOSS_TYPES = tuple(LOSSES)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# Every head, so a saved checkpoint loads with `trust_remote_code=True` through any Auto class, not only its own.
AUTO_MAP = {
    "AutoConfig": "configuration_adnet.ADNetConfig",
    "AutoModel": "modeling_adnet.ADNetModel",
    "AutoModelForSequenceClassification": "modeling_adnet.ADNetForSequenceClassification",
    "AutoModelForCausalLM": "modeling_adnet.ADNetForCausalLM",
    "AutoModelForImageClassification": "modeling_adnet.ADNetForImageClassification",
}


def _check(condition: bool, field: str, allowed: str, value) -> None:
    if not condition:
        raise ValueError(f"ADNetConfig.{field} must be {allowed}, got {value!r}.")


class _BackboneAttribute:
    """A backbone config attribute read (and set) through the ADNet config, for utilities that look for it there
    (`hidden_size`, `num_hidden_layers`, ...); an attribute the backbone lacks stays missing (`AttributeError`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, config, owner: type | None = None):
        if config is None:
            return self
        return getattr(config.backbone_config, self.name)

    def __set__(self, config, value) -> None:
        setattr(config.backbone_config, self.name, value)


class ADNetConfig(PreTrainedConfig):
    r"""
    Configuration of an ADNet model: calculation units with learned halting on a pretrained backbone.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`): the backbone's config (BERT, RoBERTa, GPT-2, Llama family or
            ResNet); a dict needs a `model_type`. Defaults to a `BertConfig()`.
        num_fixed_steps (`int`): leading steps that always run and carry no unit (the paper's fixed-time units).
        layers_per_step (`int`): consecutive backbone blocks grouped into one step; must divide the block count.
        unit_hidden_size (`int`): width `d` of each calculation unit.
        share_output_layer (`bool`): one output layer for every step (`True`) or one per step.
        exit_policy (`str`): inference exit rule: `halting`, `confidence`, `patience` or `none` (full depth).
        halting_epsilon (`float`): `halting` stops once the cumulative halting probability reaches `1 - eps`.
        confidence_threshold (`float`): `confidence` stops once the max class probability reaches it.
        patience (`int`): `patience` stops once the prediction is unchanged for this many consecutive steps.
        loss_type (`str`): `gpsl`, `pondernet`, `deep_supervision` or `last`.
        gpsl_* (`float`): the Growing Plateau Sensitive Loss weights (see `GrowingPlateauSensitiveLoss`);
            `gpsl_growth_midpoint=None` means half the number of variable steps.
        pondernet_prior (`float`): parameter of the geometric prior of the `pondernet` loss.
        pondernet_beta (`float`): weight of the KL term of the `pondernet` loss.
        max_weight_norm (`float`, *optional*): max-norm of unit and output-layer weight rows after each optimiser step.
        classifier_dropout (`float`): dropout before the output layer.
        tie_word_embeddings (`bool`, *optional*): causal LM only; defaults to the backbone's own setting.
        per_token_units (`bool`, *optional*): units that halt per token (causal LMs) instead of per pooled sample.
            Set by the task model that builds the config; saved, so every Auto class rebuilds the same units.
    """

    model_type = "adnet"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    backbone_config: PreTrainedConfig | dict | None = None
    num_fixed_steps: int = 1
    layers_per_step: int = 1
    unit_hidden_size: int = 128
    share_output_layer: bool = True
    exit_policy: str = "halting"
    halting_epsilon: float = 0.05
    confidence_threshold: float = 0.9
    patience: int = 2
    loss_type: str = "gpsl"
    gpsl_alpha: float = 0.3
    gpsl_beta: float = 0.1
    gpsl_step_cost: float = 0.05
    gpsl_temperature: float = 0.5
    gpsl_growth_rate: float = 1.0
    gpsl_growth_midpoint: float | None = None
    pondernet_prior: float = 0.5
    pondernet_beta: float = 0.01
    max_weight_norm: float | None = None
    classifier_dropout: float = 0.1
    tie_word_embeddings: bool | None = None
    per_token_units: bool | None = None

    hidden_size = _BackboneAttribute()
    num_hidden_layers = _BackboneAttribute()
    num_attention_heads = _BackboneAttribute()
    vocab_size = _BackboneAttribute()

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.per_token_units is None and "ADNetForCausalLM" in (self.architectures or ()):
            self.per_token_units = True  # a causal LM saved before the field existed
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.backbone_config, "tie_word_embeddings", False))
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.validate_adnet()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The saved config, which must be an ADNet one: a plain backbone checkpoint (e.g. a
        `BertForSequenceClassification`) is wrapped with `from_backbone`, not loaded as ADNet."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} checkpoint, not an ADNet one: wrap it with "
                f"the task model's from_backbone (e.g. ADNetForSequenceClassification.from_backbone("
                f"{str(pretrained_model_name_or_path)!r}, num_labels=...)), which loads its weights unchanged."
            )
        return config_dict, kwargs

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """A text backbone's config (what `generate` builds its cache from); this config for an image backbone."""
        return self.backbone_config if hasattr(self.backbone_config, "vocab_size") else self

    @property
    def num_blocks(self) -> int:
        """Backbone blocks (encoder layers, decoder blocks, residual blocks)."""
        return backbone_adapter(self.backbone_config).num_blocks(self.backbone_config)

    @property
    def num_steps(self) -> int:
        """Backbone steps, fixed and variable."""
        return self.num_blocks // self.layers_per_step

    @property
    def num_variable_steps(self) -> int:
        """Steps that carry a calculation unit: `N` in the design's formulas."""
        return self.num_steps - self.num_fixed_steps

    def use_per_token_units(self, per_token: bool, model_name: str) -> None:
        """Record the units `model_name` builds; a config saved for the other kind of units cannot be reused."""
        if self.per_token_units is not None and self.per_token_units != per_token:
            kind = "per-token (a causal LM's)" if self.per_token_units else "pooled (a classifier's)"
            raise ValueError(f"ADNetConfig.per_token_units={self.per_token_units}: this config is for {kind} units, "
                             f"which {model_name} does not build. Load it with the head it was saved from.")
        self.per_token_units = per_token

    def validate_adnet(self) -> None:
        """Raise a `ValueError` naming the first field outside its allowed values."""
        backbone_adapter(self.backbone_config)  # raises for an unsupported backbone
        _check(is_int(self.layers_per_step) and self.layers_per_step >= 1, "layers_per_step",
               "an integer >= 1", self.layers_per_step)
        _check(self.num_blocks % self.layers_per_step == 0, "layers_per_step",
               f"a divisor of the backbone's {self.num_blocks} blocks", self.layers_per_step)
        _check(is_int(self.num_fixed_steps) and 0 <= self.num_fixed_steps < self.num_steps, "num_fixed_steps",
               f"an integer in [0, {self.num_steps - 1}] (at least one step must carry a unit)", self.num_fixed_steps)
        _check(is_int(self.unit_hidden_size) and self.unit_hidden_size >= 1, "unit_hidden_size",
               "an integer >= 1", self.unit_hidden_size)
        _check(isinstance(self.share_output_layer, bool), "share_output_layer", "a bool", self.share_output_layer)
        _check(self.exit_policy in exit_policies(), "exit_policy", f"one of {exit_policies()}", self.exit_policy)
        for rule in EXIT_RULES.values():
            if hasattr(self, rule.config_field):  # a rule registered later may bring a field older configs lack
                rule.check(getattr(self, rule.config_field), owner=f"ADNetConfig.{rule.config_field}")
        _check(self.loss_type in LOSS_TYPES, "loss_type", f"one of {LOSS_TYPES}", self.loss_type)
        for field in ("gpsl_alpha", "gpsl_beta", "gpsl_step_cost", "pondernet_beta"):
            value = getattr(self, field)
            _check(is_number(value) and value >= 0, field, "a number >= 0", value)
        for field in ("gpsl_temperature", "gpsl_growth_rate"):
            value = getattr(self, field)
            _check(is_number(value) and value > 0, field, "a number > 0", value)
        _check(self.gpsl_growth_midpoint is None or is_number(self.gpsl_growth_midpoint), "gpsl_growth_midpoint",
               "None or a number", self.gpsl_growth_midpoint)
        _check(is_number(self.pondernet_prior) and 0 < self.pondernet_prior <= 1, "pondernet_prior",
               "a number in (0, 1]", self.pondernet_prior)
        _check(self.max_weight_norm is None or (is_number(self.max_weight_norm) and self.max_weight_norm > 0),
               "max_weight_norm", "None or a number > 0", self.max_weight_norm)
        _check(is_number(self.classifier_dropout) and 0 <= self.classifier_dropout < 1, "classifier_dropout",
               "a number in [0, 1)", self.classifier_dropout)
        _check(self.problem_type is None or self.problem_type in PROBLEM_TYPES, "problem_type",
               f"None or one of {PROBLEM_TYPES}", self.problem_type)
        _check(is_int(self.num_labels) and self.num_labels >= 1, "num_labels", "an integer >= 1", self.num_labels)
        _check(self.per_token_units in (None, True, False), "per_token_units", "None or a bool", self.per_token_units)


__all__ = ["ADNetConfig"]
