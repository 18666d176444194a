"""Exit rules as registered classes, chosen per call; the units each head builds, recorded in the config."""

import pytest
import torch
from conftest import bert_config, gpt2_config, resnet_config, spread_halting, token_batch
from transformers import AutoModel, AutoModelForCausalLM

from adnet_hf import (
    EXIT_RULES,
    ADNetConfig,
    ADNetForCausalLM,
    ADNetForImageClassification,
    ADNetForSequenceClassification,
    ADNetModel,
    ConfidenceExit,
    HaltingExit,
    PatienceExit,
)
from adnet_hf.exits_adnet import HaltingDistribution


def classifier():
    config = ADNetConfig(backbone_config=bert_config(), num_labels=3, unit_hidden_size=8, num_fixed_steps=0)
    model = ADNetForSequenceClassification(config).eval()
    spread_halting(model)
    return model


def test_registry_holds_each_rule_with_its_config_field():
    assert EXIT_RULES == {"halting": HaltingExit, "confidence": ConfidenceExit, "patience": PatienceExit}
    assert {rule.config_field for rule in EXIT_RULES.values()} == {
        "halting_epsilon",
        "confidence_threshold",
        "patience",
    }
    assert [rule.needs_predictions for rule in EXIT_RULES.values()] == [False, True, True]
    assert PatienceExit.candidates(4) == [3, 2, 1]


@pytest.mark.parametrize(
    "policy,values", [("halting", [0.02, 0.3, 0.9]), ("confidence", [0.34, 0.5, 0.9]), ("patience", [1, 2])]
)
def test_threshold_per_call_equals_the_config_setting_and_leaves_the_config_alone(policy, values):
    model = classifier()
    ids, mask = token_batch(batch=8, pad_lengths=(0, 2, 0, 3, 1, 0, 4, 0))
    field = EXIT_RULES[policy].config_field
    saved = model.config.to_dict()
    exits = []
    with torch.no_grad():
        for value in values:
            per_call = model(input_ids=ids, attention_mask=mask, exit_policy=policy, exit_threshold=value)
            assert model.config.to_dict() == saved
            setattr(model.config, field, value)
            configured = model(input_ids=ids, attention_mask=mask, exit_policy=policy)
            setattr(model.config, field, saved[field])
            assert torch.equal(per_call.exit_steps, configured.exit_steps)
            torch.testing.assert_close(per_call.logits, configured.logits)
            exits.append(per_call.exit_steps.float().mean().item())
    assert len(set(exits)) > 1, "every threshold gave the same exits: the test would prove nothing"


@pytest.mark.parametrize(
    "policy,value,field",
    [
        ("halting", 1.5, "halting_epsilon"),
        ("confidence", 0.0, "confidence_threshold"),
        ("patience", 0, "patience"),
        ("patience", 1.5, "patience"),
    ],
)
def test_bad_threshold_per_call_is_refused_by_name(policy, value, field):
    ids, mask = token_batch()
    with pytest.raises(ValueError, match=f"exit_threshold \\(the {field} of exit_policy='{policy}'\\) must be"):
        classifier()(input_ids=ids, attention_mask=mask, exit_policy=policy, exit_threshold=value)


def test_threshold_without_an_exiting_pass_is_refused():
    ids, mask = token_batch()
    with pytest.raises(ValueError, match="exit_threshold needs an exiting pass"):
        classifier()(input_ids=ids, attention_mask=mask, exit_policy="none", exit_threshold=0.5)


def test_config_fields_are_checked_by_their_rule():
    with pytest.raises(ValueError, match=r"ADNetConfig.confidence_threshold must be a number in \(0, 1\], got 2"):
        ADNetConfig(backbone_config=bert_config(), confidence_threshold=2)


def test_halting_distribution_step_by_step():
    """Each step's mass is lambda times what is not yet halted; an item that stops takes all that is left."""
    distribution = HaltingDistribution()
    first = distribution.step(torch.tensor([0.2, 0.6]))
    torch.testing.assert_close(first, torch.tensor([0.2, 0.6]))
    second = distribution.step(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(second, torch.tensor([0.4, 0.2]))
    torch.testing.assert_close(distribution.not_halted, torch.tensor([0.4, 0.2]))
    halted = distribution.halt(second, torch.tensor([True, False]))
    torch.testing.assert_close(halted, torch.tensor([0.8, 0.2]))


HEADS = {
    "sequence": (ADNetForSequenceClassification, bert_config, False),
    "image": (ADNetForImageClassification, resnet_config, False),
    "causal": (ADNetForCausalLM, gpt2_config, True),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_auto_model_loads_every_head_with_its_units(head, tmp_path):
    model_class, backbone, per_token = HEADS[head]
    model = model_class(ADNetConfig(backbone_config=backbone(), num_labels=3, unit_hidden_size=8))
    assert model.config.per_token_units is per_token
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is ADNetModel and base.config.per_token_units is per_token
    saved = model.base_model.state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in base.state_dict().items())


def test_causal_lm_saved_without_the_field_still_loads_through_auto_model(tmp_path):
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(), unit_hidden_size=8))
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(config_file.read_text().replace('"per_token_units": true,', ""))
    assert "per_token_units" not in config_file.read_text()
    assert AutoModel.from_pretrained(tmp_path).config.per_token_units is True


def test_a_head_refuses_the_other_kind_of_units(tmp_path):
    ADNetForSequenceClassification(ADNetConfig(backbone_config=gpt2_config(), unit_hidden_size=8)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="per_token_units=False.*pooled"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_registered_rule_with_its_own_field_works_per_call_and_in_the_config():
    from adnet_hf import ExitRule, register_exit_rule

    @register_exit_rule
    class FirstUnitExit(ExitRule):
        """Stops every item at the first variable step once `first_unit_exit` is set."""

        name, config_field, allowed = "first_unit", "first_unit_exit", "True"

        @classmethod
        def is_valid(cls, value) -> bool:
            return value is True

        def step(self, not_halted, logits):
            return torch.ones_like(not_halted, dtype=torch.bool)

    try:
        ADNetConfig(backbone_config=bert_config())  # a config without the new field still builds
        model = classifier()
        ids, mask = token_batch()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, exit_policy="first_unit", exit_threshold=True)
        assert (out.exit_steps == 1).all()
        with pytest.raises(ValueError, match="reads ADNetConfig.first_unit_exit, which this config lacks"):
            model(input_ids=ids, attention_mask=mask, exit_policy="first_unit")
        config = ADNetConfig(backbone_config=bert_config(), exit_policy="first_unit", first_unit_exit=True)
        assert ADNetForSequenceClassification(config).config.exit_policy == "first_unit"
        with pytest.raises(ValueError, match="ADNetConfig.first_unit_exit must be True"):
            ADNetConfig(backbone_config=bert_config(), first_unit_exit=False)
    finally:
        del EXIT_RULES["first_unit"]
