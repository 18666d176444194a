"""LayerSkip training (Elhoushi et al. 2024): layer dropout rising with depth in training only, and the early-exit
loss with its `sum_l` scale."""

import json

import pytest
import torch
from conftest import DECODER_BACKBONES, lm_model, seq_model, token_batch

from adnet_hf import ADNetConfig
from adnet_hf.engine_adnet import layer_dropout_rate
from adnet_hf.losses_adnet import LayerSkipLoss, build_loss


def test_rates_rise_exponentially_from_zero_to_the_maximum():
    rates = [layer_dropout_rate(0.4, block, 5) for block in range(5)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)
    assert rates[2] == pytest.approx(0.4 * (2**0.5 - 1))
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert layer_dropout_rate(0.3, 0, 1) == 0.3


def block_batch_sizes(model) -> list[list[int]]:
    """Per block, the batch size of each of its calls."""
    blocks = model.base_model.adapter.blocks(model.base_model.backbone)
    sizes: list[list[int]] = [[] for _ in blocks]
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda module, args, out, index=index: sizes[index].append(args[0].shape[0]))
    return sizes


def test_blocks_are_skipped_in_training_at_their_rates():
    model = lm_model("gpt2", layer_dropout=0.6).train()
    sizes = block_batch_sizes(model)
    batch, passes = 64, 30
    ids = torch.randint(3, 99, (batch, 5))
    with torch.no_grad():
        for _ in range(passes):
            model(input_ids=ids)
    ran = [sum(calls) / (batch * passes) for calls in sizes]
    expected = [1 - layer_dropout_rate(0.6, block, 4) for block in range(4)]
    assert ran[0] == 1.0
    # 1,920 draws per block: 4.5 standard deviations of a rate near 0.5 is about 0.05
    assert ran == pytest.approx(expected, abs=0.05)
    assert ran[-1] < 0.5


@pytest.mark.parametrize("backbone", ["gpt2", "llama", "bert"])
def test_no_block_is_skipped_at_evaluation(backbone):
    model = (seq_model if backbone == "bert" else lm_model)(backbone, layer_dropout=0.9).eval()
    plain = type(model)(ADNetConfig(**{**model.config.to_dict(), "layer_dropout": 0.0})).eval()
    plain.load_state_dict(model.state_dict())
    sizes = block_batch_sizes(model)
    ids, mask = token_batch()
    with torch.no_grad():
        for policy in ("none", None):
            out, reference = (m(input_ids=ids, attention_mask=mask, exit_policy=policy) for m in (model, plain))
            assert torch.equal(out.logits, reference.logits)
    assert all(size == len(ids) for calls in sizes for size in calls)


@pytest.mark.parametrize("backbone", sorted(DECODER_BACKBONES))
def test_a_skipped_block_passes_its_input_on_and_gradients_flow(backbone):
    """A sample that skips a block keeps its input there (its hidden state is unchanged by the block), the others
    are changed; the loss backpropagates through both to every block that ran. A block every sample skipped still
    runs (on one sample, weighted 0): its parameters get a zero gradient, so that distributed processes stay in
    step."""
    torch.manual_seed(1)
    model = lm_model(backbone, layer_dropout=0.8, num_fixed_steps=0, loss_type="layerskip").train()
    ids, mask = token_batch(batch=8, pad_lengths=(0, 2, 0, 3, 0, 1, 0, 0), left_padding=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), output_hidden_states=True)
    skipped = [(out.hidden_states[b + 1] == out.hidden_states[b]).flatten(1).all(-1) for b in range(4)]
    assert not skipped[0].any() and any(s.any() for s in skipped[1:]) and not all(s.all() for s in skipped)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for index, block in enumerate(model.adnet.adapter.blocks(model.adnet.backbone)):
        for name, param in block.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), (index, name)
            assert bool(param.grad.any()) == (not skipped[index].all()), (index, name)
    assert torch.isfinite(model.get_input_embeddings().weight.grad).all()


def test_a_cache_in_training_is_refused():
    model = lm_model("gpt2", layer_dropout=0.5).train()
    with pytest.raises(ValueError, match="layer_dropout"):
        model(input_ids=torch.randint(3, 99, (2, 5)), use_cache=True)


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.2", None])
def test_bad_layer_dropout_is_refused(value):
    with pytest.raises((ValueError, TypeError), match="layer_dropout"):
        lm_model("gpt2", layer_dropout=value)


def test_layerskip_loss_weights_follow_the_sum_scale():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    weights = LayerSkipLoss(scale=1.0).step_weights(4, losses)
    assert torch.allclose(weights, torch.tensor([1.0, 3.0, 6.0, 10.0]) / 20)
    weights = LayerSkipLoss(scale=0.1).step_weights(4, losses)
    assert torch.allclose(weights, torch.tensor([0.1, 0.3, 0.6, 10.0]) / 11)
    assert build_loss(ADNetConfig(loss_type="layerskip", early_exit_loss_scale=0.1))(
        losses, losses
    ).item() == pytest.approx((0.1 + 0.6 + 1.8 + 40.0) / 11)
    with pytest.raises(ValueError, match="early_exit_loss_scale"):
        ADNetConfig(early_exit_loss_scale=1.5)


def test_configs_saved_before_the_fields_load_with_their_defaults():
    saved = lm_model("gpt2").config.to_dict()
    fields = {"layer_dropout": 0.0, "early_exit_loss_scale": 1.0, "exit_adapters": False, "exit_distillation": False}
    for name in fields:
        saved.pop(name)
    config = ADNetConfig.from_dict(saved)
    assert {name: getattr(config, name) for name in fields} == fields


@pytest.mark.slow
def test_run_clm_trains_the_layerskip_way_then_exit_adapters_on_it(tmp_path, shared_data):
    """From scratch with the LayerSkip flags, then exit adapters on the frozen result: full depth is unchanged by
    the second run, which saves its adapters."""
    from safetensors.torch import load_file

    from examples import run_clm

    text = (shared_data / "ptb" / "ptb.valid.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:6000])
    (tmp_path / "valid.txt").write_text(text[6000:9000])
    common = [
        "--tokenizer_name",
        str(shared_data / "gpt2-tokenizer"),
        "--train_file",
        str(tmp_path / "train.txt"),
        "--validation_file",
        str(tmp_path / "valid.txt"),
        "--block_size",
        "16",
        "--do_train",
        "--do_eval",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--learning_rate",
        "1e-3",
        "--seed",
        "0",
        "--loss_type",
        "layerskip",
    ]
    first = run_clm.main(
        [
            "--backbone_config",
            '{"model_type": "gpt2", "n_layer": 4, "n_embd": 16, "n_head": 2, "n_positions": 32}',
            "--num_fixed_steps",
            "0",
            "--layer_dropout",
            "0.2",
            "--early_exit_loss_scale",
            "0.2",
            "--output_dir",
            str(tmp_path / "layerskip"),
            *common,
        ]
    )
    config = json.loads((tmp_path / "layerskip" / "config.json").read_text())
    assert (config["layer_dropout"], config["early_exit_loss_scale"], config["exit_policy"]) == (0.2, 0.2, "none")
    second = run_clm.main(
        [
            "--model_name_or_path",
            str(tmp_path / "layerskip"),
            "--exit_adapters",
            "true",
            "--freeze_full_depth",
            "--layer_dropout",
            "0",
            "--output_dir",
            str(tmp_path / "adapters"),
            *common,
        ]
    )
    assert second["eval_full_depth_perplexity"] == pytest.approx(first["eval_full_depth_perplexity"], rel=1e-6)
    weights = load_file(tmp_path / "adapters" / "model.safetensors")
    assert any(weights[f"exit_adapters.{i}.weight"].any() for i in range(3))
