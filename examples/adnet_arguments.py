"""The ADNet settings every example script takes on its command line (each maps to an `ADNetConfig` field)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import AutoConfig, HfArgumentParser, PretrainedConfig


def plain_baseline_field(head: str):
    """The `--plain_baseline` flag of a script whose backbone has its own `head` model."""
    return field(
        default=False,
        metadata={"help": f"Train the backbone plainly instead (its own {head} at full depth, no units, Trainer's "
                          "single learning rate): the reference ADNet is measured against. ADNet arguments are then "
                          "ignored."},
    )


def freeze_full_depth_field():
    """The `--freeze_full_depth` flag: train the exits only (`ADNetPreTrainedModel.freeze_full_depth`)."""
    return field(
        default=False,
        metadata={"help": "Train the exits only: the backbone and everything the last step's prediction reads stay "
                          "as loaded, so full-depth outputs do not change. DeeBERT's second stage, on an ADNet "
                          "checkpoint fine-tuned with --loss_type last."},
    )


def _adnet_field(help_text: str):
    return field(default=None, metadata={"help": f"ADNetConfig.{help_text} (default: keep the config's value)."})


@dataclass
class ADNetArguments:
    """ADNet config fields to set; unset ones keep the checkpoint's (or the config's default) value."""

    num_fixed_steps: int | None = _adnet_field("num_fixed_steps: leading steps without a unit")
    layers_per_step: int | None = _adnet_field("layers_per_step: backbone blocks per step")
    unit_hidden_size: int | None = _adnet_field("unit_hidden_size: width of each calculation unit")
    exit_policy: str | None = field(default=None, metadata={
        "help": "ADNetConfig.exit_policy: halting, confidence, patience or none (default: keep the config's value; "
                "`none` when --loss_type last trains no exits, `halting` when --freeze_full_depth trains only them)."})
    halting_epsilon: float | None = _adnet_field("halting_epsilon")
    confidence_threshold: float | None = _adnet_field("confidence_threshold")
    patience: int | None = _adnet_field("patience")
    loss_type: str | None = _adnet_field("loss_type: gpsl, pondernet, deep_supervision or last")
    gpsl_alpha: float | None = _adnet_field("gpsl_alpha: weight of the growing deep supervision")
    gpsl_beta: float | None = _adnet_field("gpsl_beta: weight of the plateau term")
    gpsl_step_cost: float | None = _adnet_field("gpsl_step_cost")
    gpsl_temperature: float | None = _adnet_field("gpsl_temperature: sharpness of the plateau target")
    max_weight_norm: float | None = _adnet_field("max_weight_norm: max-norm of unit and output-layer rows")
    classifier_dropout: float | None = _adnet_field("classifier_dropout")

    def overrides(self) -> dict:
        """The fields given on the command line, as `ADNetConfig` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def is_adnet_checkpoint(path: str) -> bool:
        """Whether `path` is a saved ADNet checkpoint (rather than a backbone to wrap)."""
        config = Path(path) / "config.json"
        return config.exists() and json.loads(config.read_text()).get("model_type") == "adnet"


def parse_arguments(dataclass_types: tuple, argv: list[str]) -> tuple:
    """The script's argument dataclasses from the command line, or from a single JSON file."""
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    if any(getattr(args, "plain_baseline", False) and getattr(args, "freeze_full_depth", False) for args in parsed):
        raise ValueError("--freeze_full_depth trains ADNet's exits only; a --plain_baseline model has none to train.")
    return parsed


def read_json_argument(value: str) -> dict:
    """A JSON object given inline or as the path of a .json file."""
    return json.loads(Path(value).read_text() if value.endswith(".json") else value)


def build_model(model_class, name_or_path: str | None, backbone_config, overrides: dict,
                backbone_kwargs: dict | None = None, freeze_full_depth: bool = False):
    """A model of `model_class` from a backbone config (a config or a dict with `model_type`: random weights, to
    train from scratch), a saved ADNet checkpoint, or a backbone checkpoint to wrap (its weights loaded unchanged).
    With `freeze_full_depth`, only its exits are left to train (`ADNetPreTrainedModel.freeze_full_depth`)."""
    overrides = {**_trained_exit_policy(overrides.get("loss_type"), freeze_full_depth), **overrides}
    model = _load_adnet(model_class, name_or_path, backbone_config, overrides, backbone_kwargs)
    if freeze_full_depth:
        model.freeze_full_depth()
    return model


def _trained_exit_policy(loss_type: str | None, freeze_full_depth: bool) -> dict:
    """The exit policy to save where none is given: `loss_type="last"` leaves the halting units and earlier output
    layers untrained, so exits would follow random units; training only the exits makes them the point."""
    from adnet_hf import ADNetConfig

    if loss_type == "last":
        return {"exit_policy": "none"}
    return {"exit_policy": ADNetConfig.exit_policy} if freeze_full_depth else {}


def _load_adnet(model_class, name_or_path: str | None, backbone_config, overrides: dict,
                backbone_kwargs: dict | None):
    from adnet_hf import ADNetConfig

    if backbone_config is not None:
        return model_class(ADNetConfig(backbone_config=backbone_config, **overrides))
    if name_or_path is None:
        raise ValueError("Pass --model_name_or_path (a checkpoint) or --backbone_config (train from scratch).")
    if ADNetArguments.is_adnet_checkpoint(name_or_path):
        return model_class.from_pretrained(name_or_path, **overrides)
    return model_class.from_backbone(name_or_path, backbone_kwargs=backbone_kwargs, **overrides)


def build_plain_model(auto_class, name_or_path: str | None, backbone_config, config_kwargs: dict,
                      backbone_kwargs: dict | None = None):
    """The backbone's own `auto_class` model, full depth and no units: random from `backbone_config` (a config or a
    dict with `model_type`), or from the checkpoint `name_or_path`."""
    if backbone_config is not None:
        if not isinstance(backbone_config, PretrainedConfig):
            settings = dict(backbone_config)
            backbone_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        for key, value in config_kwargs.items():
            setattr(backbone_config, key, value)
        return auto_class.from_config(backbone_config)
    if name_or_path is None:
        raise ValueError("Pass --model_name_or_path (a checkpoint) or --backbone_config (train from scratch).")
    return auto_class.from_pretrained(name_or_path, **(backbone_kwargs or {}), **config_kwargs)


def total_layers(model) -> int:
    """The backbone blocks a full-depth pass runs (every input's cost in a plain model)."""
    config = model.config
    if config.model_type == "adnet":
        return config.num_blocks
    return sum(config.depths) if hasattr(config, "depths") else config.num_hidden_layers
