import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import bert_config, gpt2_config, resnet_config, token_batch
from safetensors.torch import save_file
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

IMAGES = torch.randn(2, 1, 28, 28)
IDS, MASK = token_batch(batch=2, pad_lengths=(0, 2))

HEADS = {
    "sequence": (ADNetForSequenceClassification, AutoModelForSequenceClassification, bert_config,
                 {"input_ids": IDS, "attention_mask": MASK}),
    "image": (ADNetForImageClassification, AutoModelForImageClassification, resnet_config,
              {"pixel_values": IMAGES}),
    "causal": (ADNetForCausalLM, AutoModelForCausalLM, gpt2_config, {"input_ids": IDS, "attention_mask": MASK}),
}


def build(head: str):
    model_class, _, backbone, inputs = HEADS[head]
    config = ADNetConfig(backbone_config=backbone(), num_labels=3, unit_hidden_size=8, halting_epsilon=0.3,
                         exit_policy="halting")
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
    for name in ("configuration_adnet.py", "modeling_adnet.py", "backbones_adnet.py", "units_adnet.py",
                 "losses_adnet.py", "generation_adnet.py", "engine_adnet.py", "exits_adnet.py"):
        assert (tmp_path / name).exists(), name


REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["adnet_hf"] = None  # the package must not be importable: only the checkpoint's own code loads
    import torch, transformers
    from safetensors.torch import load_file
    path, auto_name = sys.argv[1], sys.argv[2]
    model = getattr(transformers, auto_name).from_pretrained(path, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("adnet_hf"), type(model).__module__
    data = load_file(path + "/expected.safetensors")
    inputs = {k: v for k, v in data.items() if not k.startswith("expected_")}
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out.logits, data["expected_logits"])
    assert torch.equal(out.exit_steps, data["expected_exit_steps"])
    print("remote ok", type(model).__name__)
""")


@pytest.mark.parametrize("head", sorted(HEADS))
def test_loads_as_remote_code_without_the_package(head, tmp_path):
    model, inputs = build(head)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        out = model(**inputs)
    save_file({**inputs, "expected_logits": out.logits, "expected_exit_steps": out.exit_steps},
              str(tmp_path / "expected.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path), HEADS[head][1].__name__],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout
