import json

import pytest
import torch
from conftest import assert_loads_as_remote_code, bert_config, gpt2_config, resnet_config, token_batch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from adnet_hf import (
    ADNetConfig,
    ADNetForCausalLM,
    ADNetForImageClassification,
    ADNetForSequenceClassification,
    ADNetModel,
)

HEADS = {
    "sequence": (ADNetForSequenceClassification, AutoModelForSequenceClassification, bert_config),
    "image": (ADNetForImageClassification, AutoModelForImageClassification, resnet_config),
    "causal": (ADNetForCausalLM, AutoModelForCausalLM, gpt2_config),
}


def build(head: str):
    """A model of `head` and inputs for it."""
    model_class, _, backbone = HEADS[head]
    config = ADNetConfig(
        backbone_config=backbone(), num_labels=3, unit_hidden_size=8, halting_epsilon=0.3, exit_policy="halting"
    )
    if head == "image":
        inputs = {"pixel_values": torch.randn(2, 1, 28, 28)}
    else:
        ids, mask = token_batch(batch=2, pad_lengths=(0, 2))
        inputs = {"input_ids": ids, "attention_mask": mask}
    return model_class(config).eval(), inputs


@pytest.mark.parametrize("head", sorted(HEADS))
def test_save_and_load_through_the_auto_class(head, tmp_path):
    model, inputs = build(head)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = HEADS[head][1].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    reference, restored = model.state_dict(), loaded.state_dict()
    assert reference.keys() == restored.keys()
    assert all(torch.equal(reference[key], restored[key]) for key in reference)
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(actual.logits, expected.logits)
    assert torch.equal(actual.exit_steps, expected.exit_steps)


def test_base_model_loads_through_auto_model(tmp_path):
    model = ADNetModel(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is ADNetModel


def test_saved_checkpoint_carries_code_and_auto_map(tmp_path):
    model, _ = build("sequence")
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_adnet.ADNetForCausalLM"
    for name in (
        "configuration_adnet.py",
        "modeling_adnet.py",
        "backbones_adnet.py",
        "units_adnet.py",
        "losses_adnet.py",
        "generation_adnet.py",
        "engine_adnet.py",
        "exits_adnet.py",
        "sharding_adnet.py",
        "speculative_adnet.py",
        "inputs_adnet.py",
    ):
        assert (tmp_path / name).exists(), name


@pytest.mark.slow
@pytest.mark.parametrize("head", sorted(HEADS))
def test_loads_as_remote_code_without_the_package(head, tmp_path):
    model, inputs = build(head)
    model.save_pretrained(tmp_path)
    assert_loads_as_remote_code(model, inputs, tmp_path, HEADS[head][1].__name__)
