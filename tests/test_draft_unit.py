"""Draft units (`ADNetConfig.draft_unit`): EAGLE's one-layer draft on a frozen causal LM's top features, saved and
loaded with the model, added to a built one without touching its weights."""

import textwrap

import pytest
import torch
import train_draft_unit
from conftest import DECODER_BACKBONES, gpt2_config, lm_model, run_as_remote_code, seq_model
from safetensors.torch import load_file, save_file
from test_speculative import NEW_TOKENS, PROMPTS, drafting_model, speculative
from transformers import AutoModelForCausalLM, GPT2Tokenizer

from adnet_hf import ADNetConfig, ADNetForCausalLM
from adnet_hf.draft_adnet import DraftUnit
from adnet_hf.speculative_adnet import DraftUnitDecoder, frequent_tokens
from adnet_hf.trainer_adnet import TopFeatureShards, cache_top_features
from benchmarks.bench_speculative import plain_causal_lm


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
    from transformers import AutoModelForCausalLM, GPT2Tokenizer
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


def drafting_unit_model(backbone: str):
    """A tiny causal LM whose blocks move its predictions (`drafting_model`), with a random draft unit whose layer
    moves its features too, so that its drafts are often wrong."""
    model = drafting_model(backbone, draft_unit=True)
    with torch.no_grad():
        for weight in model.draft_unit.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.3)
    return model


@pytest.fixture
def unit_model(backbone):
    return drafting_unit_model(backbone)


def greedy_reference(model, ids, **settings):
    return plain_causal_lm(model).generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0, **settings
    )


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_greedy_output_is_the_full_models(unit_model, prompt):
    ids = PROMPTS[prompt]
    reference = greedy_reference(unit_model, ids)
    rejected = 0
    for length, threshold in [(1, 0.0), (3, 0.0), (20, 0.0), (5, 0.3), (5, 1.0)]:
        out = speculative(
            unit_model, ids, use_draft_unit=True, num_assistant_tokens=length, assistant_confidence_threshold=threshold
        )
        assert torch.equal(out.sequences, reference), (length, threshold)
        assert out.draft_depth == 0 and out.drafted_tokens >= out.accepted_tokens
        rejected += out.drafted_tokens - out.accepted_tokens
    assert rejected > 0, "the test would not see a rollback of the draft unit's cache"


def test_each_round_verifies_in_one_pass_and_the_unit_runs_once_per_drafted_token(unit_model):
    """The backbone sees each fed token once, in one pass per round; the draft unit runs once per drafted token."""
    ids, seen = PROMPTS[0], []
    blocks = unit_model.adnet.adapter.blocks(unit_model.adnet.backbone)
    handle = blocks[-1].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    unit_seen = []
    unit_handle = unit_model.draft_unit.register_forward_hook(lambda m, args, out: unit_seen.append(args[0].shape[1]))
    try:
        out = speculative(unit_model, ids, use_draft_unit=True, num_assistant_tokens=4)
    finally:
        handle.remove()
        unit_handle.remove()
    assert len(seen) == 1 + out.verifications and sum(seen) == ids.shape[1] + out.drafted_tokens + out.verifications
    assert len(unit_seen) == out.drafted_tokens > 0
    assert out.cache.get_seq_length() == out.sequences.shape[1] - 1


def test_left_padding_a_draft_vocabulary_and_processors_keep_the_output(unit_model):
    ids, mask = torch.tensor([[0, 0, 5, 17, 33, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    settings = {"attention_mask": mask, "repetition_penalty": 1.3}
    reference = greedy_reference(unit_model, ids, **settings)
    vocabulary = frequent_tokens(reference, 20, unit_model.config.vocab_size)
    out = speculative(unit_model, ids, use_draft_unit=True, draft_vocabulary=vocabulary, **settings)
    assert torch.equal(out.sequences, reference)


def test_sampling_with_a_fixed_seed_runs_and_repeats(unit_model):
    def sample():
        torch.manual_seed(3)
        return unit_model.generate(
            PROMPTS[0], do_sample=True, max_new_tokens=8, use_draft_unit=True, eos_token_id=None, pad_token_id=0
        )

    first = sample()
    assert first.shape == (1, PROMPTS[0].shape[1] + 8) and torch.equal(first, sample())


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"use_draft_unit": 1}, ValueError, "use_draft_unit must be a bool"),
        ({"use_draft_unit": True, "assistant_early_exit": 2}, ValueError, "not both"),
        ({"use_draft_unit": True, "num_assistant_tokens": 0}, ValueError, "num_assistant_tokens"),
        ({"use_draft_unit": True, "assistant_confidence_threshold": 2.0}, ValueError, "assistant_confidence"),
        ({"use_draft_unit": True, "num_beams": 2}, ValueError, "use_draft_unit needs num_beams=1"),
    ],
)
def test_bad_generation_settings_are_refused(settings, error, message):
    with pytest.raises(error, match=message):
        lm_model("gpt2", draft_unit=True).generate(PROMPTS[0], max_new_tokens=3, **settings)


def test_a_batch_and_a_model_without_a_unit_are_refused():
    with pytest.raises(ValueError, match="use_draft_unit .* batch of 1"):
        lm_model("gpt2", draft_unit=True).generate(torch.cat(PROMPTS[:1] * 2), max_new_tokens=3, use_draft_unit=True)
    with pytest.raises(ValueError, match="add_draft_unit"):
        lm_model("gpt2").generate(PROMPTS[0], max_new_tokens=3, use_draft_unit=True)


def test_the_units_cache_gives_what_a_pass_from_scratch_gives(unit_model, monkeypatch):
    """Each drafted token's predicted feature, made with the unit's cache (cropped after every verification), is
    the one a pass without cache over the verified features and the round's own predictions makes."""
    original, predictions, checked = DraftUnitDecoder.next_draft_logits, [], []

    def next_draft_logits(self, sequence):
        if self.predicted is None:  # a new round
            predictions.clear()
        logits = original(self, sequence)
        predictions.append(self.predicted)
        features = torch.cat([self.features, *predictions[:-1]], dim=1)
        scratch = self.model.draft_unit_features(features, sequence[:, 1:], self.mask[:, : features.shape[1]])
        torch.testing.assert_close(scratch[:, -1:], self.predicted, rtol=1e-4, atol=1e-5)
        checked.append(len(predictions))
        return logits

    monkeypatch.setattr(DraftUnitDecoder, "next_draft_logits", next_draft_logits)
    ids = torch.tensor([[0, 0, 5, 17, 33, 8]])
    out = speculative(unit_model, ids, attention_mask=(ids != 0).long(), use_draft_unit=True, num_assistant_tokens=3)
    assert len(checked) == out.drafted_tokens and max(checked) == 3 and out.verifications > 2


def cached_batch(model, folder, blocks):
    """`blocks` through `cache_top_features` into `folder`, read back as one batch of `TopFeatureShards`."""
    cache_top_features(model, blocks, folder, shard_size=3)
    data = TopFeatureShards(folder)
    return {name: torch.stack([data[i][name] for i in range(len(data))]) for name in ("features", "input_ids")}


def train_unit(model, batch, steps: int, lr: float = 1e-2) -> list[float]:
    """A plain loop over one batch: the losses before each step, then after the last."""
    model.freeze_all_but_draft_unit()
    optimizer = torch.optim.Adam(model.draft_unit.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.train().draft_loss(**batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model.eval().draft_loss(**batch).item())
    return losses


def test_feature_cache_is_the_models_top_features_and_resumes(tmp_path):
    model = lm_model("llama", draft_unit=True).train()
    blocks = torch.randint(3, 99, (7, 9))
    batch = cached_batch(model, tmp_path, blocks)
    assert model.training and sorted(p.name for p in tmp_path.iterdir()) == [
        f"features-0000{i}.safetensors" for i in range(3)
    ]
    with torch.no_grad():
        top = model.eval()(input_ids=blocks, exit_policy="none", output_hidden_states=True).hidden_states[-1]
    assert torch.equal(batch["input_ids"], blocks) and torch.allclose(batch["features"], top, atol=1e-6)
    (tmp_path / "features-00001.safetensors").unlink()
    written = (tmp_path / "features-00000.safetensors").stat().st_mtime_ns
    cache_top_features(model, blocks, tmp_path, shard_size=3)
    assert (tmp_path / "features-00001.safetensors").exists()
    assert (tmp_path / "features-00000.safetensors").stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="other tokens"):
        cache_top_features(model, blocks.flip(0), tmp_path, shard_size=3)


def test_training_lowers_the_loss_and_leaves_the_model_bit_identical(backbone, tmp_path):
    model = drafting_model(backbone, draft_unit=True)
    batch = cached_batch(model, tmp_path, torch.randint(3, 99, (6, 12)))
    frozen = {name: value.clone() for name, value in model.state_dict().items() if not name.startswith("draft_unit")}
    losses = train_unit(model, batch, steps=15)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(model.state_dict()[name], value) for name, value in frozen.items())
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("draft_unit"))
    assert not model.adnet.backbone.training  # frozen modules stay in eval mode (no dropout) while the unit trains


def test_a_trained_unit_drafts_tokens_the_model_keeps(tmp_path):
    """On the tiny model (whose top feature is close to its token's embedding), a few steps teach the unit drafts
    the model accepts; the output stays the full model's."""
    model = lm_model("llama", draft_unit=True).eval()
    untrained = [speculative(model, ids, use_draft_unit=True, num_assistant_tokens=4) for ids in PROMPTS]
    train_unit(model, cached_batch(model, tmp_path, torch.randint(3, 99, (8, 16))), steps=30)
    for ids, before in zip(PROMPTS, untrained):
        reference = greedy_reference(model, ids)
        for length, threshold in [(4, 0.0), (2, 0.0), (6, 0.05)]:
            out = speculative(
                model, ids, use_draft_unit=True, num_assistant_tokens=length, assistant_confidence_threshold=threshold
            )
            assert torch.equal(out.sequences, reference), (length, threshold)
        assert torch.equal(before.sequences, reference)
    trained = [speculative(model, ids, use_draft_unit=True, num_assistant_tokens=4) for ids in PROMPTS]
    accepted = [sum(out.accepted_tokens for out in outs) for outs in (untrained, trained)]
    assert accepted[0] == 0 and accepted[1] >= 5, accepted


def test_example_script_caches_trains_and_saves_the_unit(tmp_path, shared_data):
    tokenizer = GPT2Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    model = ADNetForCausalLM(
        ADNetConfig(backbone_config=gpt2_config(vocab_size=len(tokenizer)), unit_hidden_size=8, exit_policy="none")
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text(" ".join(f"word{i % 37} and more" for i in range(400)))
    arguments = [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--train_file",
        str(tmp_path / "train.txt"),
        "--feature_cache_dir",
        str(tmp_path / "features"),
        "--block_size",
        "16",
        "--max_train_samples",
        "12",
        "--shard_size",
        "5",
        "--output_dir",
        str(tmp_path / "out"),
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "3",
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
    ]
    metrics = train_draft_unit.main(arguments)
    assert metrics["train_loss"] > 0 and len(list((tmp_path / "features").iterdir())) == 3
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert trained.config.draft_unit
    for name, value in model.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name
    ids = torch.tensor([[5, 17, 33]])
    assert torch.equal(speculative(trained, ids, use_draft_unit=True).sequences, greedy_reference(trained, ids))
