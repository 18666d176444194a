import pytest
import torch
from conftest import (
    DECODER_BACKBONES,
    TEXT_BACKBONES,
    VOCAB,
    bert_config,
    gpt2_config,
    image_model,
    llama_config,
    lm_model,
    midpoint_threshold,
    seq_model,
    spread_halting,
    token_batch,
)

from adnet_hf import (
    ADNetConfig,
    ADNetForCausalLM,
    ADNetForSequenceClassification,
    ADNetModel,
)


def assert_every_unit_has_gradient(model):
    for index, unit in enumerate(model.base_model.units):
        for name, param in unit.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"unit {index} {name} got no gradient"


@pytest.mark.parametrize("backbone", sorted(TEXT_BACKBONES))
def test_sequence_classification_forward_backward(backbone):
    # the loss-curve plateau trains every unit on every sample (the `settled` one only up to where each settles)
    model = seq_model(backbone, gpsl_plateau="loss")
    ids, mask = token_batch(pad_id=1 if backbone == "roberta" else 0)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1]))
    n = model.config.num_variable_steps
    assert out.logits.shape == (4, 3) and out.step_logits.shape == (n, 4, 3)
    assert out.halting_probs.shape == (4, n)
    torch.testing.assert_close(out.halting_probs.sum(-1), torch.ones(4))
    assert out.exit_steps.tolist() == [4] * 4
    out.loss.backward()
    assert_every_unit_has_gradient(model)
    assert all(p.grad is not None for p in model.output_layers.parameters())


def test_image_classification_forward_backward():
    model = image_model()
    out = model(pixel_values=torch.randn(3, 1, 28, 28), labels=torch.tensor([1, 5, 9]))
    assert out.logits.shape == (3, 10) and out.step_logits.shape == (3, 3, 10)
    out.loss.backward()
    assert_every_unit_has_gradient(model)


@pytest.mark.parametrize("backbone", sorted(DECODER_BACKBONES))
def test_causal_lm_forward_backward(backbone):
    model = lm_model(backbone)
    ids, mask = token_batch(batch=2, length=6, pad_lengths=(0, 2))
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_step_logits=True)
    n = model.config.num_variable_steps
    assert out.logits.shape == (2, 6, VOCAB) and out.step_logits.shape == (n, 2, 6, VOCAB)
    assert out.halting_probs.shape == (2, 6, n)
    torch.testing.assert_close(out.halting_probs[mask.bool()].sum(-1), torch.ones(int(mask.sum())))
    assert (out.exit_steps[mask == 0] == 0).all() and (out.exit_steps[mask == 1] == 4).all()
    out.loss.backward()
    assert_every_unit_has_gradient(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_halting_probs_sum_to_one_at_inference_with_exits():
    model = seq_model(halting_epsilon=0.3).eval()
    spread_halting(model)
    ids, mask = token_batch(batch=8, pad_lengths=(0, 2, 0, 3, 1, 0, 0, 4))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.halting_probs.sum(-1), torch.ones(8))
    exit_index = out.exit_steps - model.config.num_fixed_steps - 1
    steps = torch.arange(model.config.num_variable_steps)
    assert (out.halting_probs[steps > exit_index.unsqueeze(1)] == 0).all()


def count_block_inputs(model):
    """Forward hooks recording how many samples each backbone block processed."""
    counts = {}
    blocks = model.base_model.adapter.blocks(model.base_model.backbone)
    for index, block in enumerate(blocks):
        counts[index] = 0

        def hook(_module, args, _output, index=index):
            counts[index] += args[0].shape[0]

        block.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("layers_per_step", [1, 2])
def test_early_exit_skips_the_later_blocks(layers_per_step):
    model = seq_model(halting_epsilon=0.3, layers_per_step=layers_per_step, num_fixed_steps=0).eval()
    spread_halting(model)
    counts = count_block_inputs(model)
    ids, mask = token_batch(batch=8, pad_lengths=(0, 2, 0, 3, 1, 0, 0, 4))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    executed_blocks = out.exit_steps * layers_per_step
    assert executed_blocks.min() < 4, "no sample exited early: the test would prove nothing"
    for block, count in counts.items():
        assert count == int((executed_blocks > block).sum()), f"block {block} ran for samples that had exited"


def test_image_early_exit_skips_the_later_blocks():
    model = image_model(halting_epsilon=0.3, num_fixed_steps=0).eval()
    spread_halting(model, scale=200.0)
    counts = count_block_inputs(model)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(8, 1, 28, 28))
    assert out.exit_steps.min() < 4
    for block, count in counts.items():
        assert count == int((out.exit_steps > block).sum())


def test_image_exits_in_stages_of_different_shapes():
    model = image_model(num_fixed_steps=0).eval()
    pixels = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        full = model(pixel_values=pixels, exit_policy="none", output_step_logits=True)
        model.config.confidence_threshold = midpoint_threshold(torch.softmax(full.step_logits[0], -1).amax(-1))
        out = model(pixel_values=pixels, exit_policy="confidence")
    # blocks 0-1 (8 channels) make stage 1, blocks 2-3 (16 channels, half the side) stage 2
    assert (out.exit_steps <= 2).any() and (out.exit_steps > 2).any()
    for row in range(8):
        with torch.no_grad():
            single = model(pixel_values=pixels[row : row + 1], exit_policy="confidence")
        assert single.exit_steps.item() == out.exit_steps[row].item()
        torch.testing.assert_close(single.logits[0], out.logits[row], rtol=1e-4, atol=1e-5)


def thresholds_that_split_the_batch(model, ids, mask) -> dict:
    """Exit settings under which some samples exit at the first variable step and others go on."""
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True)
    first_lambda = full.halting_probs[:, 0]
    first_confidence = torch.softmax(full.step_logits[0], -1).amax(-1)
    return {
        "halting_epsilon": midpoint_threshold(1 - first_lambda),
        "confidence_threshold": midpoint_threshold(first_confidence),
        "patience": 1,
    }


@pytest.mark.parametrize("backbone", ["bert", "gpt2"])
@pytest.mark.parametrize("policy", ["halting", "confidence", "patience", "none"])
def test_batched_equals_one_by_one_with_padding(backbone, policy):
    model = seq_model(backbone, num_fixed_steps=0).eval()
    spread_halting(model)
    # a head reading unit features that differ between these random inputs, so predictions differ too
    model.step_head = lambda n, summary, hidden: summary[:, 5:8] * 30.0
    ids, mask = token_batch(batch=6, pad_lengths=(0, 2, 0, 3, 1, 4))
    for field, value in thresholds_that_split_the_batch(model, ids, mask).items():
        setattr(model.config, field, value)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, exit_policy=policy, output_step_logits=True)
        for row in range(6):
            length = int(mask[row].sum())
            single = model(input_ids=ids[row : row + 1, :length], exit_policy=policy, output_step_logits=True)
            assert single.exit_steps.item() == batched.exit_steps[row].item()
            torch.testing.assert_close(single.logits[0], batched.logits[row], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(single.halting_probs[0], batched.halting_probs[row], rtol=1e-4, atol=1e-5)
            assert single.flops.item() == pytest.approx(batched.flops[row].item(), rel=1e-9)
    if policy != "none":
        assert len(set(batched.exit_steps.tolist())) > 1, "every sample exited at the same step"


def lm_with_split_exits(ids, mask=None):
    """A causal LM whose halting threshold lets some tokens exit at the first variable step and not others."""
    model = lm_model(num_fixed_steps=0).eval()
    spread_halting(model, scale=5.0)
    with torch.no_grad():
        first_lambda = model(
            input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True
        ).halting_probs[..., 0]
    real = first_lambda if mask is None else first_lambda[mask.bool()]
    model.config.halting_epsilon = midpoint_threshold(1 - real.flatten())
    return model


def test_causal_lm_per_token_exit_is_batch_independent():
    ids, mask = token_batch(batch=3, length=6, pad_lengths=(0, 2, 3))
    model = lm_with_split_exits(ids, mask)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask)
        for row in range(3):
            length = int(mask[row].sum())
            single = model(input_ids=ids[row : row + 1, :length])
            assert torch.equal(single.exit_steps[0], batched.exit_steps[row, :length])
            torch.testing.assert_close(single.logits[0], batched.logits[row, :length], rtol=1e-4, atol=1e-5)
    real = batched.exit_steps[mask.bool()]
    assert real.min() < 4 and len(set(real.tolist())) > 1


def test_causal_lm_exited_tokens_keep_their_exit_state():
    """A token that exits keeps its hidden state in the deeper blocks (CALM's state propagation)."""
    ids = torch.randint(3, VOCAB, (1, 8))
    model = lm_with_split_exits(ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    states = out.hidden_states
    assert len(set(out.exit_steps[0].tolist())) > 1
    for token, exit_step in enumerate(out.exit_steps[0].tolist()):
        for deeper in range(exit_step + 1, len(states)):
            assert torch.equal(states[deeper][0, token], states[exit_step][0, token])


def test_exit_policy_none_matches_the_backbone_lm():
    from transformers import GPT2LMHeadModel

    model = lm_model().eval()
    reference = GPT2LMHeadModel(model.config.backbone_config).eval()
    reference.transformer.load_state_dict(model.adnet.backbone.state_dict())
    reference.tie_weights()
    ids, mask = token_batch(batch=2, length=6, pad_lengths=(0, 2))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, exit_policy="none").logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()])


@pytest.mark.parametrize("backbone", sorted(DECODER_BACKBONES))
@pytest.mark.parametrize("left_padding", [False, True])
def test_generate_equals_backbone_greedy(backbone, left_padding):
    from transformers import AutoModelForCausalLM

    model = lm_model(backbone, exit_policy="none").eval()
    reference = AutoModelForCausalLM.from_config(model.config.backbone_config).eval()
    reference.base_model.load_state_dict(model.adnet.backbone.state_dict())
    reference.tie_weights()
    ids, mask = token_batch(batch=2, length=5, pad_lengths=(0, 2), left_padding=left_padding)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        theirs = reference.generate(ids, **kwargs)
    assert torch.equal(ours, theirs)


def test_hidden_states_and_attentions_on_request():
    config = ADNetConfig(
        backbone_config=bert_config(), num_labels=2, unit_hidden_size=8, halting_epsilon=0.3, num_fixed_steps=0
    )
    config.backbone_config._attn_implementation = "eager"
    model = ADNetForSequenceClassification(config).eval()
    spread_halting(model)
    ids, mask = token_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert int(out.exit_steps.min()) < 4, "no sample exited early: the test would prove nothing"
    # the backbone's own length: embeddings + every block, one attention entry per block
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    assert out.hidden_states[1].shape == (4, 7, 32) and out.attentions[0].shape == (4, 4, 7, 7)
    with torch.no_grad():
        full = model(
            input_ids=ids, attention_mask=mask, exit_policy="none", output_hidden_states=True, output_attentions=True
        )
    for row, exit_step in enumerate(out.exit_steps.tolist()):
        for block in range(1, 5):
            if block <= exit_step:  # computed: what the full-depth pass computes
                torch.testing.assert_close(out.hidden_states[block][row], full.hidden_states[block][row])
                torch.testing.assert_close(out.attentions[block - 1][row], full.attentions[block - 1][row])
            else:  # skipped: the sample's exit state, and no attention
                assert torch.equal(out.hidden_states[block][row], out.hidden_states[exit_step][row])
                assert (out.attentions[block - 1][row] == 0).all()


def test_attentions_need_eager_attention():
    model = seq_model().eval()
    model.config.backbone_config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        model(input_ids=torch.randint(3, VOCAB, (1, 5)), output_attentions=True)


def test_per_call_policy_is_validated():
    model = seq_model().eval()
    with pytest.raises(ValueError, match="exit_policy must be one of"):
        model(input_ids=torch.randint(3, VOCAB, (1, 5)), exit_policy="fastest")


def test_confidence_policy_needs_class_predictions():
    config = ADNetConfig(backbone_config=bert_config(), num_labels=1, unit_hidden_size=8)
    model = ADNetForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="regression"):
        model(input_ids=torch.randint(3, VOCAB, (1, 5)), labels=torch.tensor([0.5]), exit_policy="confidence")


def test_base_model_alone_runs_the_halting_policy():
    model = ADNetModel(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8, halting_epsilon=0.3)).eval()
    spread_halting(model)
    ids, mask = token_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert out.logits is None and out.exit_steps.shape == (4,)
    with pytest.raises(ValueError, match="needs step predictions"):
        model(input_ids=ids, attention_mask=mask, exit_policy="confidence")


def test_separate_output_layers_per_step():
    model = seq_model(share_output_layer=False)
    assert len(model.output_layers) == model.config.num_variable_steps
    ids, mask = token_batch()
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    assert all(layer[1].weight.grad is not None for layer in model.output_layers)


def test_pretrained_backbone_weights_are_loaded_unchanged(tmp_path):
    from transformers import BertModel, GPT2LMHeadModel

    BertModel(bert_config()).save_pretrained(tmp_path / "bert")
    reference = BertModel.from_pretrained(tmp_path / "bert")
    model = ADNetForSequenceClassification.from_backbone(str(tmp_path / "bert"), num_labels=2, exit_policy="none")
    backbone_state = model.adnet.backbone.state_dict()
    for name, tensor in reference.state_dict().items():
        if not name.startswith("pooler"):
            assert torch.equal(backbone_state[name], tensor), name
    assert model.config.num_labels == 2 and model.config.exit_policy == "none"

    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "gpt2")
    lm_reference = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    lm = ADNetForCausalLM.from_backbone(str(tmp_path / "gpt2"))
    for name, tensor in lm_reference.transformer.state_dict().items():
        assert torch.equal(lm.adnet.backbone.state_dict()[name], tensor), name
    assert lm.lm_head.weight is lm.adnet.backbone.wte.weight
    assert not any(module.training for module in (*model.modules(), *lm.modules()))  # as from_pretrained gives it


def test_pretrained_untied_lm_head_is_loaded(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(llama_config(tie_word_embeddings=False)).save_pretrained(tmp_path / "llama")
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    lm = ADNetForCausalLM.from_backbone(str(tmp_path / "llama"))
    assert lm.lm_head.weight is not lm.adnet.backbone.embed_tokens.weight
    assert torch.equal(lm.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(lm.adnet.backbone.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_causal_lm_needs_a_decoder_backbone():
    with pytest.raises(ValueError, match="decoder backbone"):
        ADNetForCausalLM(ADNetConfig(backbone_config=bert_config()))


@pytest.mark.parametrize(
    "backbone,policy", [("bert", "none"), ("bert", "halting"), ("gpt2", "none"), ("gpt2", "halting")]
)
def test_flops_estimate_matches_a_flop_counter(backbone, policy):
    """For one sample alone, the reported FLOPs are what torch's FLOP counter sees (matrix products, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = ADNetConfig(
        backbone_config=TEXT_BACKBONES[backbone](),
        num_labels=3,
        unit_hidden_size=8,
        halting_epsilon=0.3,
        num_fixed_steps=0,
        attn_implementation="eager",
    )
    model = ADNetForSequenceClassification(config).eval()
    spread_halting(model)
    length, hidden = 6, 32
    ids = torch.randint(3, VOCAB, (1, length))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, exit_policy=policy)
    layers = out.executed_layers.item()
    assert layers == out.exit_steps.item()
    counted = counter.get_total_flops()
    if backbone == "gpt2":  # eager attention computes the full square; a causal token needs its past only
        counted -= 4 * hidden * (length * length - length * (length + 1) // 2) * layers
    assert out.flops.item() == pytest.approx(counted, rel=1e-6)


def test_flops_follow_the_exits_in_a_batch():
    model = seq_model(num_fixed_steps=0).eval()
    spread_halting(model)
    ids, mask = token_batch(batch=6, pad_lengths=(0, 2, 0, 3, 1, 4))
    model.config.halting_epsilon = thresholds_that_split_the_batch(model, ids, mask)["halting_epsilon"]
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask)
        for row in range(6):
            single = model(input_ids=ids[row : row + 1, : int(mask[row].sum())])
            assert single.flops.item() == pytest.approx(batched.flops[row].item(), rel=1e-6)
    assert len(set(batched.exit_steps.tolist())) > 1


@pytest.mark.parametrize("make", [seq_model, image_model, lm_model], ids=["sequence", "image", "causal"])
def test_full_depth_runs_the_per_step_work_only_when_asked(make):
    """At inference full depth the units and head run at the last step only, as the plain model runs its head once:
    the prediction is the same as with every step's outputs, which `output_step_logits=True` adds."""
    model = make().eval()
    units = model.base_model.units
    calls = [0] * len(units)
    for index, unit in enumerate(units):
        if unit.dense is not None:
            unit.dense.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    inputs = (
        {"pixel_values": torch.randn(2, 1, 16, 16)}
        if make is image_model
        else dict(zip(("input_ids", "attention_mask"), token_batch()))
    )
    with torch.no_grad():
        lean = model(**inputs, exit_policy="none")
        lean_calls, calls[:] = list(calls), [0] * len(units)
        full = model(**inputs, exit_policy="none", output_step_logits=True)
    torch.testing.assert_close(lean.logits, full.logits)
    assert lean.halting_probs is None and lean.step_logits is None
    assert full.halting_probs.shape[-1] == full.step_logits.shape[0] == len(units)
    ran = [index for index, count in enumerate(calls) if count]
    assert lean_calls == [int(index == len(units) - 1 and index in ran) for index in range(len(units))]
    assert len(ran) >= len(units) - 1 and (lean.flops <= full.flops).all() and lean.flops.sum() < full.flops.sum()
