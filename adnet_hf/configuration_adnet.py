"""ADNet configuration: the backbone's config plus the settings of units, halting, exits and losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .backbones_adnet import SUPPORTED_BACKBONES, backbone_adapter
from .exits_adnet import EXIT_RULES, FULL_DEPTH, ExitRule, exit_policies, is_int, is_number, require, task_exit_rule
from .losses_adnet import LOSSES, PLATEAU_TARGETS

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


# Bounds beyond which a value is a typo or an attack rather than a setting: they keep memory in reach (num_labels
# builds an `id2label` entry and an output row per label) and every loss term finite in float32.
MAX_NUM_LABELS = 100_000  # ImageNet-21k has 21,843 classes; a larger label space is a causal LM's vocabulary
MAX_UNIT_HIDDEN_SIZE = 65_536  # wider than the hidden size of any backbone
MAX_SCALE = 1e6  # loss weights, step cost, growth rate, |growth midpoint|, temperature, weight norm
MIN_TEMPERATURE = 1e-6  # below it, `loss / temperature` overflows float32 and the plateau target turns NaN


def _in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """A finite number between `low` and `high` (each end included unless `*_open`)."""
    return lambda value: (
        is_number(value)
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )


def _one_of(choices: tuple) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def _optional(is_valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or is_valid(value)


def _is_bool(value) -> bool:
    return isinstance(value, bool)


@dataclass(frozen=True)
class FieldRule:
    """The values one `ADNetConfig` field may take: the same `check` as an `ExitRule`'s for its own field."""

    allowed: str  # as an error message states them
    is_valid: Callable[[Any], bool]

    def check(self, value, owner: str) -> None:
        require(self.is_valid(value), owner, self.allowed, value)


# What `calibrate_exit(..., delta=...)` stores as `exit_guarantee`, and the values each key may take.
GUARANTEE_KEYS = {
    "policy": "an exit policy",
    "value": "its setting, None for 'none'",
    "metric": "'accuracy'",
    "budget": "a number in [0, 1]",
    "delta": "a number in (0, 1)",
    "calibration_size": "an integer >= 1",
    "method": "a string",
}


def _is_guarantee(value) -> bool:
    """A risk-control guarantee as `calibrate_exit` stores it (`GUARANTEE_KEYS`)."""
    if not isinstance(value, dict) or set(value) != set(GUARANTEE_KEYS) or value["policy"] not in exit_policies():
        return False
    policy, setting, size = value["policy"], value["value"], value["calibration_size"]
    return (
        (setting is None if policy == FULL_DEPTH else EXIT_RULES[policy].is_valid(setting))
        and value["metric"] == "accuracy"
        and _in_range(0, 1)(value["budget"])
        and _in_range(0, 1, low_open=True, high_open=True)(value["delta"])
        and is_int(size)
        and size >= 1
        and isinstance(value["method"], str)
    )


_WEIGHT = FieldRule(f"a number in [0, {MAX_SCALE:g}]", _in_range(0, MAX_SCALE))
FIELD_RULES: dict[str, FieldRule] = {
    "backbone_config": FieldRule(
        f"a config (or a dict with a model_type) of one of {SUPPORTED_BACKBONES}, or None (BERT)",
        _optional(
            lambda value: (
                isinstance(value, PreTrainedConfig)
                or (isinstance(value, dict) and value.get("model_type") in SUPPORTED_BACKBONES)
            )
        ),
    ),
    "num_fixed_steps": FieldRule("an integer >= 0", lambda value: is_int(value) and value >= 0),
    "layers_per_step": FieldRule("an integer >= 1", lambda value: is_int(value) and value >= 1),
    "unit_hidden_size": FieldRule(
        f"an integer in [1, {MAX_UNIT_HIDDEN_SIZE}]", lambda value: is_int(value) and 1 <= value <= MAX_UNIT_HIDDEN_SIZE
    ),
    "share_output_layer": FieldRule("a bool", _is_bool),
    "loss_type": FieldRule(f"one of {LOSS_TYPES}", _one_of(LOSS_TYPES)),
    "gpsl_alpha": _WEIGHT,
    "gpsl_beta": _WEIGHT,
    "gpsl_step_cost": _WEIGHT,
    "pondernet_beta": _WEIGHT,
    "gpsl_temperature": FieldRule(
        f"a number in [{MIN_TEMPERATURE:g}, {MAX_SCALE:g}]", _in_range(MIN_TEMPERATURE, MAX_SCALE)
    ),
    "gpsl_growth_rate": FieldRule(f"a number in (0, {MAX_SCALE:g}]", _in_range(0, MAX_SCALE, low_open=True)),
    "gpsl_growth_midpoint": FieldRule(
        f"None or a number in [{-MAX_SCALE:g}, {MAX_SCALE:g}]", _optional(_in_range(-MAX_SCALE, MAX_SCALE))
    ),
    "pondernet_prior": FieldRule("a number in (0, 1]", _in_range(0, 1, low_open=True)),
    "max_weight_norm": FieldRule(
        f"None or a number in (0, {MAX_SCALE:g}]", _optional(_in_range(0, MAX_SCALE, low_open=True))
    ),
    "classifier_dropout": FieldRule("a number in [0, 1)", _in_range(0, 1, high_open=True)),
    "tie_word_embeddings": FieldRule("None or a bool", _optional(_is_bool)),
    "per_token_units": FieldRule("None or a bool", _optional(_is_bool)),
    "halting_evidence": FieldRule("None or a bool", _optional(_is_bool)),
    "gpsl_plateau": FieldRule(f"one of {PLATEAU_TARGETS}", _one_of(PLATEAU_TARGETS)),
    "problem_type": FieldRule(f"None or one of {PROBLEM_TYPES}", _optional(_one_of(PROBLEM_TYPES))),
    "num_labels": FieldRule(
        f"an integer in [1, {MAX_NUM_LABELS}]", lambda value: is_int(value) and 1 <= value <= MAX_NUM_LABELS
    ),
    "exit_guarantee": FieldRule(
        "None or a dict with exactly the keys "
        + ", ".join(f"{key} ({allowed})" for key, allowed in GUARANTEE_KEYS.items()),
        _optional(_is_guarantee),
    ),
    "layer_dropout": FieldRule("a number in [0, 1)", _in_range(0, 1, high_open=True)),
    "early_exit_loss_scale": FieldRule("a number in [0, 1]", _in_range(0, 1)),
    "exit_adapters": FieldRule("a bool", _is_bool),
    "exit_distillation": FieldRule("a bool", _is_bool),
    "draft_unit": FieldRule("a bool", _is_bool),
    "draft_vocabulary_size": FieldRule(
        "None or an integer >= 1", _optional(lambda value: is_int(value) and value >= 1)
    ),
}


def field_rules() -> dict[str, FieldRule | type[ExitRule]]:
    """Every checked field and its rule; the exit policy's values and the exit rules' own fields are read from the
    registry when needed, so rules registered later count."""
    policies = exit_policies()
    return {
        **FIELD_RULES,
        "exit_policy": FieldRule(f"one of {policies}", _one_of(policies)),
        **{rule.config_field: rule for rule in EXIT_RULES.values()},
    }


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


@strict
class ADNetConfig(PreTrainedConfig):
    r"""Configuration of an ADNet model: a backbone's config plus the calculation units, halting, exits and losses.

    Build one directly, or let a task model's `from_backbone(path, **overrides)` build it from a pretrained
    backbone. Saved with the model (`config.json`), it carries an `auto_map` for every head, so a checkpoint loads
    through any Auto class, also with `trust_remote_code=True` where this package is not installed.

    Every field is checked whenever it is set: at construction, when a saved `config.json` loads, by
    `from_pretrained(path, **overrides)` (the overrides are applied together, in any order) and on assignment (a
    refused assignment leaves the old value). The fields that depend on each other (`layers_per_step` and the
    backbone's depth, `num_fixed_steps`, the exit policy and the task) are checked after each change and again before
    saving, so no saved config fails to load. A bad value raises a `ValueError` naming the field and the values it
    may take (`adnet_hf.configuration_adnet.field_rules()` holds the rules). Once a model is built from a config, the
    fields its modules depend on (`num_fixed_steps`, `layers_per_step`, `unit_hidden_size`, `share_output_layer`,
    `classifier_dropout`, `num_labels`, `tie_word_embeddings`, `per_token_units`, `halting_evidence`,
    `exit_adapters`, `draft_unit`, `draft_vocabulary_size`, the backbone) cannot change on it: give them when
    building the model.

    Each field below is also a keyword argument of the constructor, beside `PreTrainedConfig`'s own (`id2label`,
    `architectures`, ...).

    Attributes:
        backbone_config (PreTrainedConfig | dict | None): The backbone's config: BERT, RoBERTa, GPT-2, a Llama-family
            decoder or ResNet; a dict needs a `model_type`. Defaults to `None`, a `BertConfig()`.
        num_fixed_steps (int): Leading steps that always run and carry no unit (the paper's fixed-time units).
            `0` puts an exit after every step. Defaults to `1`.
        layers_per_step (int): Consecutive backbone blocks grouped into one step; must divide the block count.
            Defaults to `1`.
        unit_hidden_size (int): Width `d` of each calculation unit's layer `sigmoid(W h + b)`; a classifier's
            summary, its mean and max over the positions, has `2 d`. Defaults to `128`.
        share_output_layer (bool): One output layer for every step (`True`) or one per step (classifiers).
            Defaults to `True`.
        exit_policy (str): The inference exit rule: `'halting'`, `'confidence'`, `'patience'`, a rule added with
            `register_exit_rule`, or `'none'` (full depth). Training always runs every step. Defaults to
            `'halting'`.
        halting_epsilon (float): `halting` stops an item once its cumulative halting probability reaches
            `1 - halting_epsilon`; in (0, 1). Defaults to `0.05`.
        confidence_threshold (float): `confidence` stops an item once its step prediction's top class probability
            (every label's, for multi-label) reaches it; in (0, 1]. Defaults to `0.9`.
        patience (int): `patience` stops an item once its prediction has not changed for this many consecutive
            steps. Defaults to `2`.
        loss_type (str): How the per-step losses are combined: `'gpsl'` (`GrowingPlateauSensitiveLoss`),
            `'pondernet'` (`PonderNetLoss`), `'deep_supervision'` (`DeepSupervisionLoss`), `'last'`
            (`LastStepLoss`) or `'layerskip'` (`LayerSkipLoss`). Defaults to `'gpsl'`.
        gpsl_alpha (float): GPSL's weight of the depth-growing deep-supervision term. Defaults to `0.3`.
        gpsl_beta (float): GPSL's weight of the plateau term `KL(q || p)`. Defaults to `0.1`.
        gpsl_step_cost (float): GPSL's cost of one more step in the `'loss'` plateau target, relative to the loss
            values. Defaults to `0.05`.
        gpsl_temperature (float): Temperature of the softmax that makes GPSL's `'loss'` plateau target.
            Defaults to `0.5`.
        gpsl_growth_rate (float): Slope of the logistic curve of GPSL's growth weights. Defaults to `1.0`.
        gpsl_growth_midpoint (float | None): Step at the middle of that curve; `None` is half the number of
            variable steps. Defaults to `None`.
        pondernet_prior (float): Parameter of the geometric prior of the `'pondernet'` loss. Defaults to `0.5`.
        pondernet_beta (float): Weight of the `'pondernet'` loss's KL term. Defaults to `0.01`.
        max_weight_norm (float | None): Max-norm of the unit and output-layer weight rows, applied after every
            optimiser step by `MaxNormCallback` (`ADNetTrainer` adds it); `None` applies none. Defaults to `None`.
        classifier_dropout (float): Dropout before a classifier's output layer. Defaults to `0.1`.
        tie_word_embeddings (bool | None): Causal LM only: the LM head shares the input embeddings. `None` takes the
            backbone's own setting at construction. Defaults to `None`.
        per_token_units (bool | None): Units that halt per token (causal LMs) instead of per pooled sample. Set by
            the task model that builds the config and saved, so every Auto class rebuilds the same units; a saved
            causal LM config without it reads `True`. Defaults to `None`.
        halting_evidence (bool | None): The halting units also read the step prediction's evidence (top-class
            log-odds, margin, certainty, agreement with the previous step, halting mass so far) next to their
            summary, which lets `fit_halting` fit them. `None` is resolved by the model built: `True` for the
            classifiers, `False` for per-token units and `ADNetModel` alone; a saved config without the field reads
            `False`, the units it was trained with. Defaults to `None`.
        gpsl_plateau (str): The target of GPSL's plateau term. `'settled'` (classifiers): all the halting mass on
            the first step from which the prediction stays the full-depth one (BERxiT's and CALM's target), so the
            plateau term is the survival log-likelihood of that step and `halting_epsilon` bounds the estimated
            chance that the prediction has not settled. `'loss'`: the softmax of the step losses and step cost (the
            paper's form; regression and causal LMs always use it). Defaults to `'settled'`.
        exit_guarantee (dict | None): Written by `calibrate_exit(..., delta=...)`: the exit setting (`policy`,
            `value`) certified by risk control to lose at most `budget` of `metric` against full depth on new data
            from the calibration data's distribution, with probability at least `1 - delta` over its
            `calibration_size` samples (`method`). It holds for that setting only; `None` when the exit setting
            carries no guarantee. Defaults to `None`.
        layer_dropout (float): LayerSkip's layer dropout in training: block `l` of `L` is skipped for each sample
            with probability `layer_dropout * (2 ** (l / (L - 1)) - 1)`, 0 for the first block and this maximum for
            the last. Never at evaluation or inference. Defaults to `0.0`.
        early_exit_loss_scale (float): The `'layerskip'` loss's `e_scale`: the weight of every exit but the last,
            relative to it. Defaults to `1.0`.
        exit_adapters (bool): Causal LM only: an identity-initialised affine map after every step but the last,
            before the shared final norm and LM head (a tuned lens), so that a frozen backbone's intermediate layers
            can be read by its head. Per-token exits and self-speculative drafts read an exit through it; full depth
            never does. Defaults to `False`.
        exit_distillation (bool): Causal LM training only: each step's loss is the KL divergence from the model's
            own full-depth prediction (made first, without gradients) instead of the next token's cross-entropy, so
            that exits learn to agree with the full model, which drafts and exits are judged by. The backbone then
            runs forward twice. Defaults to `False`.
        draft_unit (bool): Causal LM only: a draft unit (`DraftUnit`, EAGLE's draft head) that reads the model's
            top features and the next token's embedding and predicts the next top features, for lossless
            speculative decoding on a frozen model (`generate(..., use_draft_unit=True)`); trained on the frozen
            model (`DraftUnitTrainer`). `ADNetForCausalLM.add_draft_unit()` adds one to a built model. Defaults to
            `False`.
        draft_vocabulary_size (int | None): The draft unit's vocabulary: it reads only this many rows of the LM head
            (the most frequent tokens of its training text, stored with the unit, FR-Spec), which on a small model
            with a large vocabulary is most of a drafted token's cost; verification reads the whole head, so the
            output is unchanged. `None` drafts over the whole vocabulary. Defaults to `None`.
        problem_type (str | None): `PreTrainedConfig`'s: `'regression'`, `'single_label_classification'` or
            `'multi_label_classification'`; `None` is inferred from the labels of the first batch, as Transformers'
            heads do. A regressor takes the `halting` and `none` exit policies only. Defaults to `None`.
        num_labels (int): `PreTrainedConfig`'s: classes, or outputs of a regressor or multi-label classifier; at
            most 100,000. Defaults to `2`.
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
    halting_evidence: bool | None = None
    gpsl_plateau: str = "settled"
    exit_guarantee: dict | None = None
    layer_dropout: float = 0.0
    early_exit_loss_scale: float = 1.0
    exit_adapters: bool = False
    exit_distillation: bool = False
    draft_unit: bool = False
    draft_vocabulary_size: int | None = None

    hidden_size = _BackboneAttribute()
    num_hidden_layers = _BackboneAttribute()
    num_attention_heads = _BackboneAttribute()
    vocab_size = _BackboneAttribute()

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.per_token_units is None and "ADNetForCausalLM" in (self.architectures or ()):
            self.per_token_units = True  # a saved causal LM config without the field
        if self.halting_evidence is None and self.architectures:
            self.halting_evidence = False  # a saved config without the field: units that read their summary only
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.backbone_config, "tie_word_embeddings", False))
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.validate_adnet()

    def __setattr__(self, name: str, value) -> None:
        """Check the field's own rule before setting it; once constructed, check the fields that depend on it too,
        and leave the old value in place when that fails."""
        rule = field_rules().get(name)
        if rule is not None:
            rule.check(value, owner=f"ADNetConfig.{name}")
        current = self.__dict__.get(name, _UNSET)
        # A plain value set again (the problem type, set at each forward with labels) changes nothing to re-check.
        unchanged = type(current) is type(value) and isinstance(value, (str, int, float)) and current == value
        if unchanged or not self.__dict__.get("_post_init_done") or (rule is None and name not in _DEPENDED_ON):
            super().__setattr__(name, value)
            return
        previous = getattr(self, name, _UNSET)
        super().__setattr__(name, value)
        try:
            self.validate_adnet()
            self._check_architecture(name)
        except ValueError:
            super().__setattr__(name, previous) if previous is not _UNSET else object.__delattr__(self, name)
            raise

    def architecture(self) -> tuple:
        """What a model built from this config has fixed: its modules' shapes (and dropout)."""
        return (id(self.backbone_config), self.num_blocks, *(getattr(self, name) for name in ARCHITECTURE_FIELDS))

    def bind_architecture(self) -> None:
        """Called by the model built from this config: from now on a field it was built with cannot change (the
        model would silently keep the old one, and a checkpoint saved with the new one would not load)."""
        self.__dict__["_built_architecture"] = self.architecture()

    def _set_built_fields(self, **values) -> None:
        """For the model built from this config once it has added the modules these fields describe
        (`ADNetForCausalLM.add_draft_unit`): set them, then bind the config to the model again."""
        unknown = set(values) - set(ARCHITECTURE_FIELDS)
        if unknown:
            raise ValueError(f"_set_built_fields sets fields a model is built with, not {sorted(unknown)}.")
        bound = self.__dict__.pop("_built_architecture", None) is not None
        try:
            for name, value in values.items():
                setattr(self, name, value)
        finally:
            if bound:
                self.bind_architecture()

    def _check_architecture(self, name: str) -> None:
        built = self.__dict__.get("_built_architecture")
        if built is not None and self.architecture() != built:
            name = "num_labels" if name == "id2label" else name  # the label count is what the weights depend on
            raise ValueError(
                f"ADNetConfig.{name} cannot change once a model is built from this config (its "
                f"weights or dropout were made for the old value): give it when building the model, "
                f"e.g. from_pretrained(path, {name}=...)."
            )

    def __getstate__(self) -> dict:
        """Copies and pickles carry the settings, not the binding to a built model (a copy builds a new one)."""
        return {name: value for name, value in self.__dict__.items() if name != "_built_architecture"}

    def _remove_keys_not_serialized(self, d: dict) -> None:
        d.pop("_built_architecture", None)  # belongs to the model built, not to the settings
        super()._remove_keys_not_serialized(d)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Transformers' `from_dict`, with overrides of the config's own fields (`from_pretrained(path, **overrides)`)
        joined to the saved values before construction, so they are validated together, in any order."""
        own = {field.name for field in fields(cls)} - {"backbone_config"}  # a backbone dict is merged by Transformers
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in own}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    @property
    def is_regression(self) -> bool:
        """A regressor: `problem_type="regression"`, or unset with one label (as Transformers' heads infer it)."""
        return self.problem_type == "regression" or (
            self.problem_type is None and self.num_labels == 1 and not self.per_token_units
        )

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
            raise ValueError(
                f"ADNetConfig.per_token_units={self.per_token_units}: this config is for {kind} units, "
                f"which {model_name} does not build. Load it with the head it was saved from."
            )
        self.per_token_units = per_token

    def validate_adnet(self) -> None:
        """Raise a `ValueError` naming the first field outside its allowed values. A `@strict` class validator, so
        `save_pretrained` runs it too: no out-of-range value is ever saved."""
        require(
            isinstance(self.backbone_config, PreTrainedConfig),
            "ADNetConfig.backbone_config",
            "a PreTrainedConfig (or, when constructing, a dict with a model_type)",
            self.backbone_config,
        )
        backbone_adapter(self.backbone_config)  # raises for an unsupported backbone
        for name, rule in field_rules().items():
            if hasattr(self, name):  # a rule registered later may bring a field older configs lack
                rule.check(getattr(self, name), owner=f"ADNetConfig.{name}")
        require(
            isinstance(self.tie_word_embeddings, bool),
            "ADNetConfig.tie_word_embeddings",
            "a bool once constructed (None, the backbone's own setting, is resolved at construction)",
            self.tie_word_embeddings,
        )
        require(
            self.num_blocks % self.layers_per_step == 0,
            "ADNetConfig.layers_per_step",
            f"a divisor of the backbone's {self.num_blocks} blocks",
            self.layers_per_step,
        )
        require(
            self.num_fixed_steps < self.num_steps,
            "ADNetConfig.num_fixed_steps",
            f"an integer in [0, {self.num_steps - 1}] (at least one of the {self.num_steps} steps, the backbone's "
            f"{self.num_blocks} blocks in groups of layers_per_step={self.layers_per_step}, must carry a unit)",
            self.num_fixed_steps,
        )
        if self.exit_policy in EXIT_RULES:
            task_exit_rule(self.exit_policy, self, owner="ADNetConfig.exit_policy")
        if self.halting_evidence and self.per_token_units:
            raise ValueError(
                "ADNetConfig.halting_evidence must be False or None for per-token units (causal LMs), "
                "got True: their units read the hidden state only."
            )
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError(
                "ADNetConfig.num_labels must be >= 2 for problem_type='single_label_classification', "
                "got 1: use num_labels=2 for two classes, or problem_type='regression'."
            )


_UNSET = object()
# The fields a built model's modules depend on (with the backbone config itself and its depth).
ARCHITECTURE_FIELDS = (
    "num_fixed_steps",
    "layers_per_step",
    "unit_hidden_size",
    "share_output_layer",
    "classifier_dropout",
    "num_labels",
    "tie_word_embeddings",
    "per_token_units",
    "halting_evidence",
    "exit_adapters",
    "draft_unit",
    "draft_vocabulary_size",
)
# Not fields with a rule, but what the cross-field checks read: setting them re-runs `validate_adnet`.
_DEPENDED_ON = frozenset({"id2label", "num_hidden_layers"})

__all__ = ["ADNetConfig"]
