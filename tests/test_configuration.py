import pytest
from conftest import bert_config, gpt2_config, resnet_config
from huggingface_hub.errors import StrictDataclassClassValidationError
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
    config = ADNetConfig(
        backbone_config=resnet_config(),
        num_labels=10,
        exit_policy="patience",
        patience=3,
        gpsl_alpha=0.7,
        max_weight_norm=2.5,
    )
    restored = ADNetConfig.from_dict(config.to_dict())
    assert restored.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ADNetConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert loaded.backbone_config.depths == [2, 2] and loaded.num_labels == 10


def test_auto_map_names_every_head():
    auto_map = ADNetConfig(backbone_config=gpt2_config()).auto_map
    assert set(auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForSequenceClassification",
        "AutoModelForCausalLM",
        "AutoModelForImageClassification",
    }


INVALID = [
    ("layers_per_step", 0),
    ("layers_per_step", 3),
    ("layers_per_step", 1.5),
    ("num_fixed_steps", -1),
    ("num_fixed_steps", 4),
    ("num_fixed_steps", True),
    ("unit_hidden_size", 0),
    ("share_output_layer", "yes"),
    ("exit_policy", "entropy"),
    ("halting_epsilon", 0.0),
    ("halting_epsilon", 1.0),
    ("confidence_threshold", 0.0),
    ("confidence_threshold", 1.5),
    ("patience", 0),
    ("loss_type", "ce"),
    ("gpsl_alpha", -0.1),
    ("gpsl_beta", -1),
    ("gpsl_step_cost", -0.5),
    ("gpsl_temperature", 0.0),
    ("gpsl_growth_rate", -1.0),
    ("gpsl_growth_midpoint", "middle"),
    ("pondernet_prior", 0.0),
    ("pondernet_prior", 1.5),
    ("pondernet_beta", -0.01),
    ("max_weight_norm", 0.0),
    ("classifier_dropout", 1.0),
    ("num_labels", 0),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"ADNetConfig\.{field} must be"):
        ADNetConfig(backbone_config=bert_config(), **{field: value})


def test_invalid_problem_type_is_rejected():
    with pytest.raises(ValueError, match="problem_type"):
        ADNetConfig(backbone_config=bert_config(), problem_type="ranking")


def test_unsupported_backbone_names_the_supported_ones():
    with pytest.raises(
        ValueError,
        match=r"backbone_config must be a config \(or a dict with a model_type\) of one of "
        r".*'bert'.*got \{'model_type': 't5'\}",
    ):
        ADNetConfig(backbone_config={"model_type": "t5"})


NON_FINITE = [
    (field, value)
    for field in (
        "gpsl_alpha",
        "gpsl_beta",
        "gpsl_step_cost",
        "gpsl_temperature",
        "gpsl_growth_rate",
        "gpsl_growth_midpoint",
        "pondernet_beta",
        "pondernet_prior",
        "max_weight_norm",
        "classifier_dropout",
        "halting_epsilon",
        "confidence_threshold",
    )
    for value in (float("nan"), float("inf"), float("-inf"))
]


@pytest.mark.parametrize("field,value", NON_FINITE)
def test_nan_and_infinities_are_refused_for_every_float_field(field, value):
    with pytest.raises(ValueError, match=rf"ADNetConfig\.{field} must be .*number in"):
        ADNetConfig(backbone_config=bert_config(), **{field: value})


def test_a_typo_in_loss_type_lists_the_losses():
    with pytest.raises(
        ValueError,
        match=r"ADNetConfig\.loss_type must be one of \('gpsl', 'pondernet', "
        r"'deep_supervision', 'last', 'layerskip'\), got 'gpls'",
    ):
        ADNetConfig(backbone_config=bert_config(), loss_type="gpls")


@pytest.mark.parametrize("how", ["construct", "assign"])
def test_absurd_num_labels_is_refused_before_any_label_table_is_built(how):
    config = ADNetConfig(backbone_config=bert_config())
    with pytest.raises(ValueError, match=r"ADNetConfig\.num_labels must be an integer in \[1, 100000\]"):
        if how == "construct":
            ADNetConfig(backbone_config=bert_config(), num_labels=10**9)
        else:
            config.num_labels = 10**9
    assert config.num_labels == 2 and len(config.id2label) == 2


@pytest.mark.parametrize(
    "task",
    [dict(num_labels=1), dict(problem_type="regression", num_labels=1), dict(problem_type="regression", num_labels=3)],
)
@pytest.mark.parametrize("policy", ["confidence", "patience"])
def test_regression_with_a_prediction_based_exit_is_refused_at_configuration_time(task, policy):
    with pytest.raises(
        ValueError,
        match=rf"ADNetConfig\.exit_policy='{policy}' needs class predictions.*"
        r"\('halting', 'none'\)",
    ):
        ADNetConfig(backbone_config=bert_config(), exit_policy=policy, **task)


def test_regression_keeps_halting_and_full_depth_and_multi_label_keeps_every_policy():
    for policy in ("halting", "none"):
        assert ADNetConfig(backbone_config=bert_config(), num_labels=1, exit_policy=policy).is_regression
    config = ADNetConfig(
        backbone_config=bert_config(), num_labels=1, exit_policy="confidence", problem_type="multi_label_classification"
    )
    assert not config.is_regression


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("halting_epsilon", 5, r"a number in \(0, 1\)"),
        ("loss_type", "gpls", "one of"),
        ("gpsl_alpha", float("inf"), "a number in"),
        ("layers_per_step", 3, "a divisor of the backbone's 4 blocks"),
        ("num_fixed_steps", 4, r"an integer in \[0, 3\]"),
        ("exit_policy", "entropy", "one of"),
    ],
)
def test_assignment_after_construction_is_checked_and_a_refused_value_is_not_kept(field, value, allowed):
    config = ADNetConfig(backbone_config=bert_config())
    before = config.to_dict()
    with pytest.raises(ValueError, match=rf"ADNetConfig\.{field} must be {allowed}"):
        setattr(config, field, value)
    assert config.to_dict() == before


def test_assignment_that_breaks_another_field_names_it_and_is_undone():
    config = ADNetConfig(backbone_config=bert_config(), exit_policy="confidence")
    with pytest.raises(ValueError, match=r"ADNetConfig\.exit_policy='confidence' needs class predictions"):
        config.problem_type = "regression"
    assert config.problem_type is None
    config.exit_policy = "halting"
    config.problem_type = "regression"  # in an order that stays valid, both changes go through
    assert config.is_regression


def test_overrides_through_from_pretrained_are_validated_and_applied_together(tmp_path):
    ADNetConfig(backbone_config=bert_config(), exit_policy="confidence").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"ADNetConfig\.loss_type must be one of"):
        AutoConfig.from_pretrained(tmp_path, loss_type="gpls")
    with pytest.raises(ValueError, match=r"ADNetConfig\.gpsl_beta must be a number in"):
        ADNetConfig.from_pretrained(tmp_path, gpsl_beta=float("inf"))
    # regression needs another exit policy: given together, in either order, they are accepted
    for overrides in (
        {"problem_type": "regression", "exit_policy": "halting"},
        {"exit_policy": "halting", "problem_type": "regression"},
    ):
        assert AutoConfig.from_pretrained(tmp_path, **overrides).is_regression


def test_a_saved_config_with_a_bad_value_refuses_to_load_naming_it(tmp_path):
    ADNetConfig(backbone_config=bert_config()).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"loss_type": "gpsl"', '"loss_type": "gpls"'))
    with pytest.raises(ValueError, match=r"ADNetConfig\.loss_type must be one of"):
        AutoConfig.from_pretrained(tmp_path)


def test_save_refuses_a_config_made_invalid_behind_its_back(tmp_path):
    config = ADNetConfig(backbone_config=bert_config())
    config.backbone_config.num_hidden_layers = 1  # leaves no step for a unit after the fixed one
    with pytest.raises(
        StrictDataclassClassValidationError, match=r"ADNetConfig\.num_fixed_steps must be an integer in \[0, 0\]"
    ):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_script_flags_on_an_adnet_checkpoint_go_through_validation(tmp_path):
    from adnet_examples.arguments import ADNetArguments, build_model
    from adnet_hf import ADNetForSequenceClassification

    ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=r"ADNetConfig\.loss_type must be one of"):
        build_model(ADNetForSequenceClassification, str(tmp_path), None, ADNetArguments(loss_type="gpls").overrides())
    with pytest.raises(ValueError, match=r"ADNetConfig\.halting_epsilon must be"):
        build_model(
            ADNetForSequenceClassification, str(tmp_path), None, ADNetArguments(halting_epsilon=5.0).overrides()
        )


@pytest.mark.parametrize(
    "field,value",
    [
        ("unit_hidden_size", 16),
        ("num_labels", 5),
        ("layers_per_step", 2),
        ("num_fixed_steps", 0),
        ("share_output_layer", False),
        ("classifier_dropout", 0.3),
        ("backbone_config", None),
    ],
)
def test_a_built_model_fixes_the_fields_its_modules_depend_on(field, value, tmp_path):
    from adnet_hf import ADNetForSequenceClassification

    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    value = bert_config() if field == "backbone_config" else value
    with pytest.raises(ValueError, match=rf"ADNetConfig\.{field} cannot change once a model is built"):
        setattr(model.config, field, value)
    model.config.halting_epsilon = 0.3  # the other settings still change
    model.config.id2label = {0: "no", 1: "yes"}  # and so do the label names
    model.save_pretrained(tmp_path)
    config = ADNetConfig.from_pretrained(tmp_path, **{field: value})  # a new model takes it
    assert ADNetForSequenceClassification(config).config is config and config.halting_epsilon == 0.3
    assert getattr(config, field) == value or field == "backbone_config"
