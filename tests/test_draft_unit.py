"""Draft units (`ADNetConfig.draft_unit`): EAGLE's one-layer draft on a frozen causal LM's top features, saved and
loaded with the model, added to a built one without touching its weights."""

import copy
import json
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import DECODER_BACKBONES, VOCAB, gpt2_config, lm_model, run_as_remote_code, seq_model
from safetensors.torch import load_file, save_file
from test_speculative import CHAT_TEMPLATE, NEW_TOKENS, PROMPTS, drafting_model, p_value, speculative
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, GPT2Tokenizer

from adnet_hf import ADNetConfig, ADNetForCausalLM, modeling_adnet
from adnet_hf.draft_adnet import DraftUnit
from adnet_hf.losses_adnet import draft_unit_loss
from adnet_hf.speculative_adnet import DraftUnitDecoder, frequent_tokens
from adnet_hf.trainer_adnet import TopFeatureShards, cache_top_features
from benchmarks.bench_speculative import plain_causal_lm
from examples import train_draft_unit


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


VOCABULARY = torch.tensor([61, 4, 56, 17, 90, 33, 8, 50])  # not the first ids, which a placeholder would hold


def test_a_vocabulary_is_saved_with_the_unit_and_loaded_back(backbone, tmp_path):
    model = drafting_model(backbone)
    unit = model.add_draft_unit(VOCABULARY)
    model.eval()
    assert model.config.draft_unit and model.config.draft_vocabulary_size == len(VOCABULARY)
    assert torch.equal(unit.vocabulary, VOCABULARY) and unit.vocabulary.dtype == torch.long
    model.save_pretrained(tmp_path)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["draft_unit.vocabulary"], VOCABULARY)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.draft_vocabulary_size == len(VOCABULARY)
    assert torch.equal(loaded.draft_unit.vocabulary, VOCABULARY)
    drafted = [speculative(m, PROMPTS[0], use_draft_unit=True) for m in (model, loaded)]
    assert torch.equal(drafted[0].sequences, drafted[1].sequences)
    assert drafted[0].accepted_tokens == drafted[1].accepted_tokens and drafted[0].drafted_tokens > 0
    assert loaded.add_draft_unit() is loaded.draft_unit
    with pytest.raises(ValueError, match="has a draft unit already: its vocabulary is fixed"):
        loaded.add_draft_unit(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="draft_vocabulary_size cannot change once a model is built"):
        loaded.config.draft_vocabulary_size = 3
    assert torch.equal(loaded.draft_unit.vocabulary, VOCABULARY)


def test_a_unit_drafts_over_its_vocabulary_unless_another_is_passed(backbone, monkeypatch):
    """The unit's own vocabulary by default, `draft_vocabulary=` instead where given (disjoint here): the draft reads
    only those rows of the head and proposes only those tokens; the output is the full model's either way."""
    model = drafting_model(backbone)
    ids = PROMPTS[2]
    reference = greedy_reference(model, ids)
    own = frequent_tokens(reference, 12, VOCAB)
    other = torch.tensor([token for token in range(3, VOCAB) if token not in own][:12])
    model.add_draft_unit(own)
    model.eval()
    drafted, finite = [], set()
    original_draft, original_head = DraftUnitDecoder.draft, DraftUnitDecoder.draft_head

    def draft(self, sequence, length):
        drafts, scores = original_draft(self, sequence, length)
        drafted.extend(int(token) for token in drafts)
        return drafts, scores

    def draft_head(self, hidden):
        logits = original_head(self, hidden)
        finite.update(logits.isfinite().nonzero()[:, 1].tolist())
        return logits

    monkeypatch.setattr(DraftUnitDecoder, "draft", draft)
    monkeypatch.setattr(DraftUnitDecoder, "draft_head", draft_head)
    for settings, vocabulary in [({}, own), ({"draft_vocabulary": other}, other)]:
        drafted.clear()
        finite.clear()
        out = speculative(model, ids, use_draft_unit=True, **settings)
        assert torch.equal(out.sequences, reference)
        assert finite == set(vocabulary.tolist())
        assert len(drafted) == out.drafted_tokens > 0 and set(drafted) <= set(vocabulary.tolist())


@pytest.mark.parametrize(
    "vocabulary, error, message",
    [
        (torch.tensor([4, 9, 4]), ValueError, r"distinct token ids in \[0, 99\)"),
        (torch.tensor([5, 99]), ValueError, r"distinct token ids in \[0, 99\)"),
        (torch.tensor([-1, 5]), ValueError, r"distinct token ids in \[0, 99\)"),
        ([4, 5], TypeError, "1-D integer tensor"),
        (torch.tensor([4.0, 5.0]), TypeError, "1-D integer tensor"),
        (torch.tensor([], dtype=torch.long), TypeError, "non-empty"),
    ],
)
def test_a_bad_vocabulary_is_refused_and_no_unit_added(vocabulary, error, message):
    model = lm_model("gpt2")
    with pytest.raises(error, match=message):
        model.add_draft_unit(vocabulary)
    assert model.draft_unit is None and not model.config.draft_unit and model.config.draft_vocabulary_size is None


def test_a_vocabulary_size_needs_a_unit_a_causal_lm_and_at_most_the_vocabulary():
    with pytest.raises(ValueError, match="draft_vocabulary_size is the draft unit's .* got 5 with draft_unit=False"):
        lm_model("gpt2", draft_vocabulary_size=5)
    with pytest.raises(ValueError, match="at most the vocabulary's 99 tokens; got 100"):
        lm_model("gpt2", draft_unit=True, draft_vocabulary_size=100)
    with pytest.raises(ValueError, match="draft_vocabulary_size.*integer >= 1"):
        lm_model("gpt2", draft_unit=True, draft_vocabulary_size=0)
    assert lm_model("gpt2", draft_unit=True, draft_vocabulary_size=VOCAB).draft_unit.vocabulary.shape == (VOCAB,)
    with pytest.raises(ValueError, match="draft_vocabulary_size is a causal LM's"):
        seq_model("gpt2", draft_vocabulary_size=5)


def test_a_vocabulary_never_set_is_refused(tmp_path):
    """A unit built from the config alone, or loaded from a checkpoint without one, has a vocabulary of the right
    size but no tokens: drafting and training refuse it instead of reading arbitrary rows of the head."""
    built = lm_model("llama", draft_unit=True, draft_vocabulary_size=5)
    lm_model("llama").save_pretrained(tmp_path)
    loaded = ADNetForCausalLM.from_pretrained(tmp_path, draft_unit=True, draft_vocabulary_size=5)
    for model in (built, loaded):
        with pytest.raises(ValueError, match="vocabulary .* was never set"):
            model.generate(PROMPTS[0], max_new_tokens=3, use_draft_unit=True)
        with pytest.raises(ValueError, match="vocabulary .* was never set"):
            model.draft_loss(draft_features(model, PROMPTS[0]), PROMPTS[0])


def draft_features(model, ids):
    """The frozen model's top features of `ids`, as `cache_top_features` caches them."""
    with torch.no_grad():
        return model.top_features(model.adnet(input_ids=ids, exit_policy="none").last_hidden_state)


def test_draft_loss_reads_the_vocabularys_rows_of_the_head(backbone):
    """`draft_loss` is `draft_unit_loss` on the unit's predictions, with both next-token distributions read from
    the vocabulary's rows of the LM head (not from the whole head)."""
    model = drafting_model(backbone)
    model.add_draft_unit(VOCABULARY)
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    features = draft_features(model, ids)
    with torch.no_grad():
        predicted = model.draft_unit_features(features[:, :-1], ids[:, 1:]).flatten(0, 1)
        target = features[:, 1:].flatten(0, 1)
        loss = model.draft_loss(features, ids, feature_weight=0.7, token_weight=0.5)

        def by_hand(rows):
            def logits(x):
                return F.linear(x, model.lm_head.weight[rows])

            return draft_unit_loss(predicted, target, logits(predicted), logits(target), 0.7, 0.5)

        torch.testing.assert_close(loss, by_hand(VOCABULARY))
        assert not torch.allclose(loss, by_hand(torch.arange(VOCAB)), rtol=1e-3)


def test_feature_noise_is_uniform_on_what_the_unit_reads_and_only_while_it_trains(backbone, monkeypatch):
    """`feature_noise=w`: uniform noise in +-w/2 times the features' root mean square on the features the unit
    reads, none on the targets, and none in eval mode."""
    model = drafting_model(backbone, draft_unit=True)
    for module in model.draft_unit.modules():  # the unit's own dropout would change a loss in training mode too
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ids = torch.randint(3, VOCAB, (2, 9))
    features = draft_features(model, ids)
    read, targets = [], []
    original_features, original_loss = ADNetForCausalLM.draft_unit_features, modeling_adnet.draft_unit_loss

    def draft_unit_features(self, inputs, *args, **kwargs):
        read.append(inputs.detach())
        return original_features(self, inputs, *args, **kwargs)

    def draft_unit_loss_(predicted, target, *args):
        targets.append(target)
        return original_loss(predicted, target, *args)

    monkeypatch.setattr(ADNetForCausalLM, "draft_unit_features", draft_unit_features)
    monkeypatch.setattr(modeling_adnet, "draft_unit_loss", draft_unit_loss_)
    with torch.no_grad():
        losses = {
            "eval": model.draft_loss(features, ids),
            "eval, noise": model.draft_loss(features, ids, feature_noise=0.5),
        }
        model.draft_unit.train()
        losses["train"] = model.draft_loss(features, ids)
        losses["train, noise"] = model.draft_loss(features, ids, feature_noise=0.5)
    assert torch.equal(losses["eval, noise"], losses["eval"]) and torch.equal(losses["train"], losses["eval"])
    assert not torch.allclose(losses["train, noise"], losses["train"])
    clean = features[:, :-1]
    assert all(torch.equal(inputs, clean) for inputs in read[:3])
    assert all(torch.equal(target, features[:, 1:].flatten(0, 1)) for target in targets)
    noise, width = read[3] - clean, 0.5 * clean.pow(2).mean().sqrt()
    assert 0.45 * width < noise.abs().max() <= 0.5 * width  # fills +-width/2 (the max of 512 uniform draws)
    assert noise.mean().abs() < 0.05 * width  # centred (5 standard errors)


REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["adnet_hf"] = None  # only the checkpoint's own code may load
    import json
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, GPT2Tokenizer
    path = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("adnet_hf"), type(model).__module__
    data = load_file(path + "/expected.safetensors")
    settings = json.loads(sys.argv[2])
    assert torch.equal(model.draft_unit.vocabulary, data["vocabulary"])
    with torch.no_grad():
        predicted = model.draft_unit_features(data["features"], data["input_ids"])
    torch.testing.assert_close(predicted, data["predicted"])
    out = model.generate(data["prompt"], use_draft_unit=True, return_dict_in_generate=True, **settings)
    assert torch.equal(out.sequences, data["sequence"]) and out.drafted_tokens > 0
    print("remote ok")
""")


@pytest.mark.slow
def test_loads_as_remote_code_without_the_package(backbone, tmp_path):
    """The checkpoint's own code runs the unit, keeps its vocabulary and drafts with it (`speculative_adnet.py`)."""
    model = drafting_model(backbone)
    vocabulary = torch.tensor([61, 4, 56, 17, 90, 33, 8, 50])
    model.add_draft_unit(vocabulary)
    model.eval().save_pretrained(tmp_path)
    features, ids = torch.randn(1, 6, 32), torch.randint(3, 99, (1, 6))
    with torch.no_grad():
        predicted = model.draft_unit_features(features, ids)
    settings = dict(
        max_new_tokens=8,
        do_sample=False,
        num_assistant_tokens=3,
        assistant_confidence_threshold=0.0,
        eos_token_id=None,
        pad_token_id=0,
    )
    out = model.generate(PROMPTS[0], use_draft_unit=True, return_dict_in_generate=True, **settings)
    assert out.drafted_tokens > 0
    expected = {"features": features, "input_ids": ids, "predicted": predicted, "vocabulary": vocabulary}
    expected |= {"prompt": PROMPTS[0], "sequence": out.sequences}
    save_file(expected, str(tmp_path / "expected.safetensors"))
    run_as_remote_code(REMOTE_SCRIPT, tmp_path, json.dumps(settings))


def drafting_unit_model(backbone: str):
    """A tiny causal LM whose blocks move its predictions (`drafting_model`), with a random draft unit whose layer
    moves its features too, so that its drafts are often wrong."""
    model = drafting_model(backbone, draft_unit=True)
    with torch.no_grad():
        for weight in model.draft_unit.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.1)
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
    keep, verified = DraftUnitDecoder.keep_features, []

    def keep_features(self, hidden):
        verified.append(self.model.top_features(hidden))
        keep(self, hidden)

    def next_draft_logits(self, sequence):
        if self.predicted is None:  # a new round
            predictions.clear()
        logits = original(self, sequence)
        predictions.append(self.predicted)
        features = torch.cat([*verified, *predictions[:-1]], dim=1)
        scratch = self.model.draft_unit_features(features, sequence[:, 1:], self.mask[:, : features.shape[1]])
        torch.testing.assert_close(scratch[:, -1:], self.predicted, rtol=1e-4, atol=1e-5)
        checked.append(len(predictions))
        return logits

    monkeypatch.setattr(DraftUnitDecoder, "next_draft_logits", next_draft_logits)
    monkeypatch.setattr(DraftUnitDecoder, "keep_features", keep_features)
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
        *(f"features-0000{i}.safetensors" for i in range(3)),
        "shards.json",
    ]
    with torch.no_grad():
        out = model.eval()(input_ids=blocks, exit_policy="none", output_hidden_states=True)
    # ADNet's hidden_states[-1] is the last block's output before the final norm; the cache holds what the LM head
    # reads, after it
    top = model.exit_states(out.hidden_states[-1], model.config.num_blocks)
    assert torch.equal(batch["input_ids"], blocks) and torch.allclose(batch["features"], top, atol=1e-6)
    torch.testing.assert_close(model.lm_head(batch["features"]), out.logits)
    (tmp_path / "features-00001.safetensors").unlink()
    written = (tmp_path / "features-00000.safetensors").stat().st_mtime_ns
    cache_top_features(model, blocks, tmp_path, shard_size=3)
    assert (tmp_path / "features-00001.safetensors").exists()
    assert (tmp_path / "features-00000.safetensors").stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="other tokens"):
        cache_top_features(model, blocks.flip(0), tmp_path, shard_size=3)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_input_embeddings().weight.add_(0.1)
    with pytest.raises(ValueError, match="another model"):
        cache_top_features(other, blocks, tmp_path, shard_size=3)
    cache_top_features(model, blocks[:3], tmp_path, shard_size=3)  # a shorter run: its index lists its own shard
    assert len(TopFeatureShards(tmp_path)) == 3


def test_training_lowers_the_loss_and_leaves_the_model_bit_identical(backbone, tmp_path):
    model = drafting_model(backbone, draft_unit=True)
    batch = cached_batch(model, tmp_path, torch.randint(3, 99, (6, 12)))
    frozen = {name: value.clone() for name, value in model.state_dict().items() if not name.startswith("draft_unit")}
    losses = train_unit(model, batch, steps=15)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(model.state_dict()[name], value) for name, value in frozen.items())
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("draft_unit"))
    assert not model.adnet.backbone.training  # frozen modules stay in eval mode (no dropout) while the unit trains


def test_a_trained_unit_drafts_tokens_the_model_keeps(backbone, tmp_path):
    """A unit trained on the model's own greedy text (as the example script trains it) drafts tokens the model keeps,
    and the output stays the full model's. On a model whose blocks move its predictions: the plain tiny model's
    greedy text repeats one token, which a draft of the wrong position, or an untrained unit, would guess as well.
    (`test_the_first_draft_after_a_prefill_is_the_units_prediction_at_its_last_token` pins the alignment exactly.)"""
    model = drafting_model(backbone, draft_unit=True)
    texts = greedy_reference(model, torch.randint(3, 99, (4, 5)))  # its own greedy continuations of 4 prompts
    assert all(len(set(text.tolist())) > 8 for text in texts), "the greedy text repeats a token"
    train_unit(model, cached_batch(model, tmp_path, texts), steps=60)
    accepted = []
    for text in texts:
        prompt = text[None, :5]
        reference = greedy_reference(model, prompt)
        for length, threshold in [(4, 0.0), (2, 0.0), (6, 0.05)]:
            out = speculative(
                model,
                prompt,
                use_draft_unit=True,
                num_assistant_tokens=length,
                assistant_confidence_threshold=threshold,
            )
            assert torch.equal(out.sequences, reference), (length, threshold)
            accepted.append(out.accepted_tokens)
    assert sum(accepted) >= 10, accepted
    # The count is of drafts the model keeps: over one token the text never holds, the same unit gets none kept.
    outside = next(token for token in range(3, VOCAB) if token not in texts[0])
    out = speculative(model, texts[:1, :5], use_draft_unit=True, draft_vocabulary=torch.tensor([outside]))
    assert out.drafted_tokens > 0 and out.accepted_tokens == 0 and torch.equal(out.sequences, texts[:1])


def test_the_first_draft_after_a_prefill_is_the_units_prediction_at_its_last_token(unit_model, monkeypatch):
    """After a prefill of `ids[:, :t+1]` the full model emits `ids[t+1]` (`ids` is its own greedy text), and the
    unit's first drafted feature is the one `draft_unit_features(features[:, :-1], ids[:, 1:])` predicts at t (from
    the top feature at t with the token at t+1), and the draft's logits are the head's on it. A draft made one
    position off (features paired with the tokens before or after their own, the last verified feature left out,
    the head reading the unit's input instead of its prediction) fails here."""
    ids = greedy_reference(unit_model, PROMPTS[0])
    with torch.no_grad():
        features = draft_features(unit_model, ids)
        expected = unit_model.draft_unit_features(features[:, :-1], ids[:, 1:])
        heads = unit_model.lm_head(expected)[0].float()
    original, firsts = DraftUnitDecoder.next_draft_logits, []

    def next_draft_logits(self, sequence):
        first = self.predicted is None  # the round's first draft
        logits = original(self, sequence)
        if first:
            firsts.append((sequence.shape[1], self.predicted, logits))
        return logits

    monkeypatch.setattr(DraftUnitDecoder, "next_draft_logits", next_draft_logits)
    settings = {"max_new_tokens": 3, "num_assistant_tokens": 1, "eos_token_id": None, "pad_token_id": 0}
    for t in range(PROMPTS[0].shape[1] - 1, ids.shape[1] - 1):
        firsts.clear()
        prefix = ids[:, : t + 1]  # a mask of ones: the text may hold the pad token, which would be masked
        out = unit_model.generate(
            prefix, attention_mask=torch.ones_like(prefix), do_sample=False, use_draft_unit=True, **settings
        )
        assert out[0, t + 1] == ids[0, t + 1]
        length, predicted, logits = firsts[0]
        assert length == t + 2, (t, length)
        torch.testing.assert_close(predicted[0, 0], expected[0, t], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, heads[t], rtol=1e-4, atol=1e-4)  # the draft reads that prediction


def draft_rounds(monkeypatch) -> list[tuple[int, list[float]]]:
    """Each round's drafting as `DraftUnitDecoder.draft` does it, recorded: the length asked for and the top
    probability of each drafted token."""
    original, rounds = DraftUnitDecoder.draft, []

    def draft(self, sequence, length):
        drafts, scores = original(self, sequence, length)
        rounds.append((length, [torch.softmax(score, -1).max().item() for score in scores]))
        return drafts, scores

    monkeypatch.setattr(DraftUnitDecoder, "draft", draft)
    return rounds


def test_confidence_threshold_stops_a_draft_after_its_first_unsure_token(unit_model, monkeypatch):
    """Threshold 1 drafts one token a round, 0 the full `num_assistant_tokens` (bar where `max_new_tokens` asks
    for fewer); in between, a draft goes on while its tokens are sure and stops after the first that is not."""
    rounds, ids = draft_rounds(monkeypatch), PROMPTS[0]
    reference = greedy_reference(unit_model, ids)
    outputs = {}
    for threshold in (1.0, 0.0):
        rounds.clear()
        out = speculative(
            unit_model, ids, use_draft_unit=True, num_assistant_tokens=4, assistant_confidence_threshold=threshold
        )
        asked, drafted = [length for length, _ in rounds], [len(sure) for _, sure in rounds]
        assert torch.equal(out.sequences, reference)
        assert len(rounds) == out.verifications and sum(drafted) == out.drafted_tokens
        assert drafted == [min(1 if threshold else 4, length) for length in asked], (threshold, asked, drafted)
        if threshold:  # one token a round, bar a last round asked for none
            assert out.verifications - 1 <= out.drafted_tokens <= out.verifications
        outputs[threshold] = (asked, [top for _, sure in rounds for top in sure])
    asked = outputs[1.0][0]
    assert sum(length > 1 for length in asked) >= 3  # one token where more were asked for: the threshold cut it
    assert outputs[0.0][0].count(4) >= 3

    threshold = sorted(outputs[0.0][1])[len(outputs[0.0][1]) // 4]  # a quarter of the drafted tokens are below it
    rounds.clear()
    out = speculative(
        unit_model, ids, use_draft_unit=True, num_assistant_tokens=4, assistant_confidence_threshold=threshold
    )
    assert torch.equal(out.sequences, reference)
    for length, sure in rounds:
        assert all(top >= threshold for top in sure[:-1]), (threshold, sure)
        assert not sure or sure[-1] < threshold or len(sure) == length, (threshold, length, sure)
    assert any(len(sure) < length for length, sure in rounds)  # cut short
    assert any(len(sure) > 1 for _, sure in rounds)  # and kept going


def joint_of_two_tokens(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """`P(a, b) = first[a] * second[a, b]`, flattened to `a * vocab + b`."""
    return (first[:, None] * second).flatten()


@pytest.mark.parametrize(
    "with_vocabulary, samples, temperature",
    [
        (False, 400, 0.05),
        (True, 400, 0.05),
        # With more samples and half the draft's tokens kept, a residual other than max(0, p - q) shows too.
        pytest.param(False, 2000, 0.1, marks=pytest.mark.slow),
        pytest.param(True, 2000, 0.1, marks=pytest.mark.slow),
    ],
)
def test_sampling_with_the_unit_keeps_the_full_models_distribution(with_vocabulary, samples, temperature):
    """The first two new tokens under `do_sample=True` follow the full model's joint distribution
    `p(a | prompt) p(b | prompt, a)`, computed exactly over the vocabulary, and not the draft's
    `p(a | prompt) q(b | prompt, a)`: the second token is drafted (kept with probability min(1, p/q), else drawn
    from max(0, p - q)). A low temperature sharpens the tiny model's distributions enough to tell p from q. With a
    draft vocabulary that leaves out the second token's likeliest values, those come from the residual alone."""
    model = drafting_unit_model("gpt2")
    ids = PROMPTS[0]
    continued = torch.cat([ids.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
    with torch.no_grad():
        first = torch.softmax(model(input_ids=ids, exit_policy="none").logits[0, -1] / temperature, -1)
        out = model(input_ids=continued, exit_policy="none", output_hidden_states=True)
        second = torch.softmax(out.logits[:, -1] / temperature, -1)
        top = model.top_features(out.hidden_states[-1])
        predicted = model.draft_unit_features(top[:, :-1], continued[:, 1:])[:, -1:]
        draft_logits = model.lm_head(predicted)[:, 0]
    settings = {}
    if with_vocabulary:
        left_out = (first @ second).topk(5).indices  # the second token's five likeliest values
        vocabulary = torch.tensor([t for t in range(VOCAB) if t not in left_out])
        outside = torch.full_like(draft_logits, float("-inf"))
        draft_logits = outside.index_copy(1, vocabulary, draft_logits[:, vocabulary])
        settings["draft_vocabulary"] = vocabulary
    draft_second = torch.softmax(draft_logits / temperature, -1)
    torch.manual_seed(0)
    pairs, drafted, accepted = [], 0, 0
    for _ in range(samples):
        out = model.generate(
            ids,
            use_draft_unit=True,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=3,  # with 2, the second token would be the last, and no round drafts a last token
            num_assistant_tokens=1,
            assistant_confidence_threshold=0.0,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            **settings,
        )
        a, b = out.sequences[0, ids.shape[1] : ids.shape[1] + 2].tolist()
        pairs.append(a * VOCAB + b)
        drafted, accepted = drafted + out.drafted_tokens, accepted + out.accepted_tokens
    counts = torch.bincount(torch.tensor(pairs), minlength=VOCAB * VOCAB)
    seconds = counts.view(VOCAB, VOCAB).sum(0)
    assert drafted == samples and 0.05 * samples < accepted < 0.95 * samples  # both ways of the rule are taken
    assert p_value(counts, joint_of_two_tokens(first, second)) > 1e-3
    assert p_value(seconds, first @ second) > 1e-3
    assert p_value(seconds, first @ draft_second) < 1e-6
    if with_vocabulary:
        assert seconds[left_out].sum() > 0.5 * samples * (first @ second)[left_out].sum()


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
    assert metrics["train_loss"] > 0
    shards = [f"features-0000{i}.safetensors" for i in range(3)]
    assert sorted(path.name for path in (tmp_path / "features").iterdir()) == [*shards, "shards.json"]
    assert json.loads((tmp_path / "features" / "shards.json").read_text()) == shards
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert trained.config.draft_unit
    for name, value in model.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name
    ids = torch.tensor([[5, 17, 33]])
    assert torch.equal(speculative(trained, ids, use_draft_unit=True).sequences, greedy_reference(trained, ids))


def shuffled_plain_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    """A tiny plain GPT-2 LM whose blocks move its predictions (as `drafting_model`'s), so that its greedy text
    varies and a wrapped copy that exits early or lost a weight would write another."""
    model = GPT2LMHeadModel(gpt2_config(vocab_size=vocab_size, bos_token_id=50256, eos_token_id=50256)).eval()
    with torch.no_grad():
        for name, weight in model.transformer.h.named_parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.3)
    return model


@pytest.mark.slow
def test_example_script_wraps_a_plain_lm_answers_instructions_and_saves_a_vocabulary(
    tmp_path, shared_data, monkeypatch
):
    """A plain GPT-2 checkpoint is wrapped with `exit_policy="none"`, so the saved model's plain `generate()` is the
    plain model's; it answers `--prompts_file`'s instructions through the chat template (greedily, once: a rerun
    reads `answers.jsonl`), and the unit's vocabulary (`--draft_vocabulary_size`) is the training text's most
    frequent tokens, saved with it."""
    tokenizer = GPT2Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    tokenizer.chat_template = CHAT_TEMPLATE
    plain = shuffled_plain_gpt2(len(tokenizer))
    plain.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    instructions = ["Say hi.", "Count to three.", "Name a colour."]
    (tmp_path / "instructions.json").write_text(json.dumps(instructions))
    text = " ".join(f"word{i % 37} and more" for i in range(200))
    (tmp_path / "train.txt").write_text(text)
    features = tmp_path / "features"

    def arguments(output_dir: str) -> list[str]:
        return [
            *("--model_name_or_path", str(tmp_path / "plain")),
            *("--prompts_file", str(tmp_path / "instructions.json")),
            *("--train_file", str(tmp_path / "train.txt")),
            *("--max_answer_tokens", "6", "--answer_batch_size", "2"),
            *("--draft_vocabulary_size", "16", "--feature_noise", "0.2"),
            *("--feature_cache_dir", str(features), "--block_size", "8", "--max_train_samples", "6"),
            *("--shard_size", "4", "--output_dir", str(tmp_path / output_dir)),
            *("--per_device_train_batch_size", "4", "--max_steps", "2", "--save_strategy", "no"),
            *("--use_cpu", "true", "--report_to", "none"),
        ]

    train_draft_unit.main(arguments("out"))
    answers = (features / "answers.jsonl").read_text().splitlines()
    assert len(answers) == len(instructions)
    seen = set(tokenizer(text).input_ids)  # every token of the training text
    for instruction, line in zip(instructions, answers):  # each the plain model's own greedy answer
        chat = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True)
        prompt = torch.tensor([chat["input_ids"]])
        reply = plain.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=50256)[0, prompt.shape[1] :]
        assert json.loads(line) == reply.tolist()
        seen |= {*chat["input_ids"], *reply.tolist()}

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert saved.config.exit_policy == "none" and saved.config.draft_vocabulary_size == 16
    vocabulary = saved.draft_unit.vocabulary
    assert vocabulary.shape == (16,) and len(vocabulary.unique()) == 16
    assert set(vocabulary.tolist()) <= seen  # the training text's tokens, not a placeholder
    ids = torch.tensor([[5, 17, 33, 8]])
    settings = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    reference = plain.generate(ids, **settings)
    assert len(set(reference[0, 4:].tolist())) > 3, "the plain model's greedy text repeats a token"
    assert torch.equal(saved.generate(ids, **settings), reference)
    drafted = saved.generate(ids, use_draft_unit=True, return_dict_in_generate=True, **settings)
    assert torch.equal(drafted.sequences, reference) and drafted.drafted_tokens > 0

    written = (features / "answers.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(train_draft_unit, "answer", lambda *args: pytest.fail("a rerun answered again"))
    train_draft_unit.main(arguments("rerun"))
    assert (features / "answers.jsonl").read_text().splitlines() == answers
    assert (features / "answers.jsonl").stat().st_mtime_ns == written
    rerun = AutoModelForCausalLM.from_pretrained(tmp_path / "rerun")
    assert torch.equal(rerun.draft_unit.vocabulary, vocabulary)


def test_saved_answers_resume_only_the_same_run(tmp_path):
    """A stopped run's answers are kept (a last line cut short by the stop dropped) only for the same prompts,
    model and answer length."""
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path="models/tiny"))
    prompts = [[1, 2], [3]]
    assert train_draft_unit.saved_answers(tmp_path, prompts, model, 8) == []
    (tmp_path / "answers.jsonl").write_text("[5, 6]\n[7, 8")
    assert train_draft_unit.saved_answers(tmp_path, prompts, model, 8) == [[5, 6]]
    assert (tmp_path / "answers.jsonl").read_text() == "[5, 6]\n"
    for changed in (
        [prompts[::-1], model, 8],
        [prompts, SimpleNamespace(config=SimpleNamespace(_name_or_path="b")), 8],
    ):
        with pytest.raises(ValueError, match="answers to other instructions, by another model"):
            train_draft_unit.saved_answers(tmp_path, *changed)
    with pytest.raises(ValueError, match="of another length"):
        train_draft_unit.saved_answers(tmp_path, prompts, model, 16)
