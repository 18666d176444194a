"""Draft units (`ADNetConfig.draft_unit`): EAGLE's one-layer draft on a frozen causal LM's top features, saved and
loaded with the model, added to a built one without touching its weights."""

import textwrap

import pytest
import torch
from conftest import DECODER_BACKBONES, lm_model, run_as_remote_code, seq_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adnet_hf import ADNetForCausalLM
from adnet_hf.draft_adnet import DraftUnit


@pytest.fixture(params=sorted(DECODER_BACKBONES))
def backbone(request):
    return request.param


def test_off_by_default_and_built_from_the_backbones_own_layer(backbone):
    assert lm_model(backbone).draft_unit is None
    model = lm_model(backbone, draft_unit=True)
    blocks = model.adnet.adapter.blocks(model.adnet.backbone)
    assert isinstance(model.draft_unit, DraftUnit) and type(model.draft_unit.layer) is type(blocks[0])
    assert model.draft_unit.fc.in_features == 2 * model.config.hidden_size
    assert not any(p is q for p in model.draft_unit.parameters() for q in model.lm_head.parameters())


def test_saved_and_loaded_through_the_auto_class(backbone, tmp_path):
    model = lm_model(backbone, draft_unit=True).eval()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert (tmp_path / "draft_adnet.py").is_file()
    unit = {f"draft_unit.{name}": value for name, value in model.draft_unit.state_dict().items()}
    assert unit and all(torch.equal(saved[name], value) for name, value in unit.items())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.draft_unit
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    features, ids = torch.randn(2, 5, 32), torch.randint(3, 99, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded.draft_unit_features(features, ids), model.draft_unit_features(features, ids))


def test_added_to_a_built_or_loaded_model_leaving_its_weights_unchanged(backbone, tmp_path):
    model = lm_model(backbone).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    unit = model.add_draft_unit()
    assert model.add_draft_unit() is unit and model.config.draft_unit
    after = model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert set(after) - set(before) == {f"draft_unit.{name}" for name in unit.state_dict()}
    model.save_pretrained(tmp_path / "added")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "added").draft_unit is not None

    lm_model(backbone).save_pretrained(tmp_path / "plain")
    loaded = ADNetForCausalLM.from_pretrained(tmp_path / "plain", draft_unit=True)
    for name, value in loaded.draft_unit.named_parameters():  # initialised, norms at one: nothing left unset
        assert value.isfinite().all() and value.abs().max() < 10, name
        if value.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
            assert torch.equal(value, torch.ones_like(value)), name


def test_bad_values_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="ADNetConfig.draft_unit.*a bool"):
        lm_model("gpt2", draft_unit=1)
    model = lm_model("gpt2")
    with pytest.raises(ValueError, match="ADNetConfig.draft_unit cannot change once a model is built"):
        model.config.draft_unit = True
    assert model.config.draft_unit is False and model.draft_unit is None
    with pytest.raises(ValueError, match="draft_unit"):
        seq_model("gpt2", draft_unit=True)
    with pytest.raises(ValueError, match="add_draft_unit"):
        model.freeze_all_but_draft_unit()


REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["adnet_hf"] = None  # only the checkpoint's own code may load
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    path = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("adnet_hf"), type(model).__module__
    data = load_file(path + "/expected.safetensors")
    with torch.no_grad():
        predicted = model.draft_unit_features(data["features"], data["input_ids"])
    torch.testing.assert_close(predicted, data["predicted"])
    print("remote ok")
""")


@pytest.mark.slow
def test_loads_as_remote_code_without_the_package(tmp_path):
    model = lm_model("llama", draft_unit=True).eval()
    model.save_pretrained(tmp_path)
    features, ids = torch.randn(1, 6, 32), torch.randint(3, 99, (1, 6))
    with torch.no_grad():
        predicted = model.draft_unit_features(features, ids)
    save_file({"features": features, "input_ids": ids, "predicted": predicted}, str(tmp_path / "expected.safetensors"))
    run_as_remote_code(REMOTE_SCRIPT, tmp_path)
