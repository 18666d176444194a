import pytest
from conftest import bert_config, gpt2_config, resnet_config
from transformers import AutoConfig, BertConfig

from adnet_hf import ADNetConfig


def test_defaults_and_derived_step_counts():
    config = ADNetConfig(backbone_config=bert_config(), layers_per_step=2, num_fixed_steps=0)
    assert config.model_type == "adnet"
    assert (config.num_blocks, config.num_steps, config.num_variable_steps) == (4, 2, 2)
    assert config.exit_policy == "halting" and config.loss_type == "gpsl"


def test_default_backbone_is_bert():
    assert isinstance(ADNetConfig().backbone_config, BertConfig)


def test_backbone_from_dict_with_model_type():
    config = ADNetConfig(backbone_config={"model_type": "gpt2", "n_layer": 3, "n_embd": 16, "n_head": 2})
    assert config.backbone_config.model_type == "gpt2" and config.num_blocks == 3


def test_round_trip_to_dict_and_save_pretrained(tmp_path):
    config = ADNetConfig(backbone_config=resnet_config(), num_labels=10, exit_policy="patience", patience=3,
                         gpsl_alpha=0.7, max_weight_norm=2.5)
    restored = ADNetConfig.from_dict(config.to_dict())
    assert restored.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ADNetConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert loaded.backbone_config.depths == [2, 2] and loaded.num_labels == 10


def test_auto_map_names_every_head():
    auto_map = ADNetConfig(backbone_config=gpt2_config()).auto_map
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification",
                             "AutoModelForCausalLM", "AutoModelForImageClassification"}


INVALID = [
    ("layers_per_step", 0), ("layers_per_step", 3), ("layers_per_step", 1.5),
    ("num_fixed_steps", -1), ("num_fixed_steps", 4), ("num_fixed_steps", True),
    ("unit_hidden_size", 0), ("share_output_layer", "yes"),
    ("exit_policy", "entropy"), ("halting_epsilon", 0.0), ("halting_epsilon", 1.0),
    ("confidence_threshold", 0.0), ("confidence_threshold", 1.5), ("patience", 0),
    ("loss_type", "ce"), ("gpsl_alpha", -0.1), ("gpsl_beta", -1), ("gpsl_step_cost", -0.5),
    ("gpsl_temperature", 0.0), ("gpsl_growth_rate", -1.0), ("gpsl_growth_midpoint", "middle"),
    ("pondernet_prior", 0.0), ("pondernet_prior", 1.5), ("pondernet_beta", -0.01),
    ("max_weight_norm", 0.0), ("classifier_dropout", 1.0), ("num_labels", 0),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"ADNetConfig\.{field} must be"):
        ADNetConfig(backbone_config=bert_config(), **{field: value})


def test_invalid_problem_type_is_rejected():
    with pytest.raises(ValueError, match="problem_type"):
        ADNetConfig(backbone_config=bert_config(), problem_type="ranking")


def test_unsupported_backbone_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"backbone_config must be a config of one of .*'bert'.*got 't5'"):
        ADNetConfig(backbone_config={"model_type": "t5"})
