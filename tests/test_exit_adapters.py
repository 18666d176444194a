"""Exit adapters (`ADNetConfig.exit_adapters`): identity at initialisation, saved and loaded with the model, trained
on the frozen backbone, read by per-token exits and by self-speculative drafts without changing the output."""

import pytest
import torch
from conftest import DECODER_BACKBONES, lm_model, seq_model, token_batch
from safetensors.torch import load_file
from test_speculative import PROMPTS, drafting_model, speculative

from adnet_hf import ADNetConfig, ADNetForCausalLM
from adnet_hf.losses_adnet import distillation_loss
from benchmarks.bench_speculative import plain_causal_lm


def with_adapters(model, scale=0.3) -> ADNetForCausalLM:
    """A copy of `model` with exit adapters that move its exits' predictions."""
    adapted = ADNetForCausalLM(ADNetConfig(**{**model.config.to_dict(), "exit_adapters": True})).eval()
    adapted.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for adapter in adapted.exit_adapters:
            adapter.weight.normal_(0.0, scale)
            adapter.bias.normal_(0.0, scale)
    return adapted


@pytest.mark.parametrize("backbone", sorted(DECODER_BACKBONES))
def test_identity_at_initialisation(backbone):
    model = lm_model(backbone).eval()
    adapted = ADNetForCausalLM(ADNetConfig(**{**model.config.to_dict(), "exit_adapters": True})).eval()
    missing, _ = adapted.load_state_dict(model.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"exit_adapters.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    ids, mask = token_batch()
    with torch.no_grad():
        # every token exits at the first exit (confidence >= 1e-6), or none does
        for policy, threshold in (("confidence", 1e-6), ("none", None)):
            out, reference = (
                m(
                    input_ids=ids,
                    attention_mask=mask,
                    exit_policy=policy,
                    exit_threshold=threshold,
                    output_step_logits=True,
                )
                for m in (adapted, model)
            )
            assert torch.equal(out.logits, reference.logits), policy
        assert torch.equal(out.step_logits, reference.step_logits)


def test_adapters_move_the_exits_and_never_the_last_step():
    model = lm_model("gpt2", num_fixed_steps=0).eval()
    adapted = with_adapters(model)
    ids, mask = token_batch()
    with torch.no_grad():
        out, reference = (
            m(input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True) for m in (adapted, model)
        )
    assert torch.equal(out.logits, reference.logits) and torch.equal(out.step_logits[-1], reference.step_logits[-1])
    assert all(not torch.allclose(a, b) for a, b in zip(out.step_logits[:-1], reference.step_logits[:-1]))
    assert len(adapted.exit_adapters) == model.config.num_steps - 1
    assert adapted.head_flops() == model.head_flops() + 2 * 32 * 32


def test_saved_and_loaded_with_the_model(tmp_path):
    model = with_adapters(lm_model("llama"))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    loaded = ADNetForCausalLM.from_pretrained(tmp_path).eval()
    for index, adapter in enumerate(model.exit_adapters):
        assert torch.equal(saved[f"exit_adapters.{index}.weight"], adapter.weight)
        assert torch.equal(loaded.exit_adapters[index].weight, adapter.weight)
    ids, _ = token_batch()
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, output_step_logits=True, exit_policy="none").step_logits,
            model(input_ids=ids, output_step_logits=True, exit_policy="none").step_logits,
        )


def test_checkpoint_without_adapters_loads_unchanged_or_gains_identity_adapters(tmp_path):
    model = lm_model("gpt2").eval()
    model.save_pretrained(tmp_path)
    plain = ADNetForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.exit_adapters is None and not plain.config.exit_adapters
    adapted = ADNetForCausalLM.from_pretrained(tmp_path, exit_adapters=True).eval()
    assert all(not a.weight.any() and not a.bias.any() for a in adapted.exit_adapters)
    ids, _ = token_batch()
    with torch.no_grad():
        steps = [
            m(input_ids=ids, output_step_logits=True, exit_policy="none").step_logits for m in (model, plain, adapted)
        ]
    assert torch.equal(steps[0], steps[1]) and torch.equal(steps[0], steps[2])


def test_training_on_the_frozen_backbone_lowers_the_exit_loss():
    """`freeze_full_depth` leaves the adapters (and units) to train; the backbone gets no gradient, so its pass
    builds no graph, and full depth is unchanged."""
    torch.manual_seed(0)
    model = drafting_model("gpt2", exit_adapters=True, num_fixed_steps=0, loss_type="layerskip")
    model.freeze_full_depth()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trained} >= {id(p) for p in model.exit_adapters.parameters()}
    assert not any(p.requires_grad for p in model.adnet.backbone.parameters())
    ids = torch.randint(3, 99, (4, 12))
    with torch.no_grad():
        before = model(input_ids=ids, output_step_logits=True, exit_policy="none")
    optimizer = torch.optim.Adam(model.exit_adapters.parameters(), lr=1e-2)
    model.train()
    for _ in range(20):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids, output_step_logits=True, exit_policy="none")

    def exit_loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    assert exit_loss(after.step_logits[1]) < exit_loss(before.step_logits[1]) - 0.1
    assert torch.equal(after.logits, before.logits)
    assert all(p.grad is None for p in model.adnet.backbone.parameters())


@pytest.mark.parametrize("backbone", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_speculative_output_with_adapters_is_the_full_depth_output(backbone):
    base = drafting_model(backbone)
    model = with_adapters(base, scale=0.05)
    ids = PROMPTS[0]
    reference = plain_causal_lm(model).generate(
        ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    drafts = {}
    for depth in (3, 1, 2):
        out = speculative(model, ids, assistant_early_exit=depth, num_assistant_tokens=4)
        assert torch.equal(out.sequences, reference), depth
        drafts[depth] = out.drafted_tokens - out.accepted_tokens
    assert sum(drafts.values()) > 0
    without = speculative(base, ids, assistant_early_exit=2, num_assistant_tokens=4)
    assert torch.equal(without.sequences, reference)
    assert without.accepted_tokens != out.accepted_tokens or without.drafted_tokens != out.drafted_tokens


def test_drafts_read_their_exit_through_its_adapter():
    """Each drafted token is read through the adapter of the draft's exit (after 2 blocks: the second), which no
    verification reads."""
    model = with_adapters(drafting_model("gpt2"), scale=0.05)
    calls = [0] * len(model.exit_adapters)
    for index, adapter in enumerate(model.exit_adapters):
        adapter.register_forward_hook(lambda module, args, out, index=index: calls.__setitem__(index, calls[index] + 1))
    out = speculative(model, PROMPTS[0], assistant_early_exit=2, num_assistant_tokens=3)
    assert calls == [0, out.drafted_tokens, 0] and out.drafted_tokens > 0


def test_a_classifier_refuses_adapters():
    with pytest.raises(ValueError, match="exit_adapters"):
        seq_model("bert", exit_adapters=True)


def test_distillation_trains_the_exits_towards_the_full_depth_prediction():
    """With `exit_distillation`, the step losses are KL divergences from the model's own full-depth prediction (made
    in a pass at evaluation, after which the model is back in training); training the adapters on them brings an
    exit's prediction closer to full depth's."""
    torch.manual_seed(0)
    model = drafting_model(
        "llama", exit_adapters=True, num_fixed_steps=0, loss_type="layerskip", exit_distillation=True
    )
    model.freeze_full_depth()
    ids = torch.randint(3, 99, (4, 12))
    labels = ids.clone()
    labels[0, 5:] = -100

    def exit_kl() -> torch.Tensor:
        with torch.no_grad():
            out = model.eval()(input_ids=ids, output_step_logits=True, exit_policy="none")
        full = torch.log_softmax(out.logits, -1)
        return torch.nn.functional.kl_div(
            torch.log_softmax(out.step_logits[1], -1), full, log_target=True, reduction="batchmean"
        )

    before = exit_kl()
    model.train()
    assert model(input_ids=ids, labels=labels).loss > 0 and model.training
    optimizer = torch.optim.Adam(model.exit_adapters.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        model.train()(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    assert exit_kl() < 0.7 * before


def test_distillation_loss_is_zero_for_the_teacher_and_ignored_tokens():
    logits = torch.randn(2, 3, 11)
    teacher = torch.log_softmax(logits, -1)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    assert distillation_loss(logits, teacher, labels).abs().max() < 1e-6
    loss = distillation_loss(torch.randn(2, 3, 11), teacher, labels)
    assert (loss[labels == -100] == 0).all() and (loss[labels != -100] > 0).all()
