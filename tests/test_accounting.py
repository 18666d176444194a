"""The passes' bookkeeping, kept cheap: FLOPs added up as numbers and put on the items once, pooling that reads the
token mask only where some token is padding, no exit bookkeeping at a step where nothing stops."""

import pytest
import torch
from conftest import bert_config, gpt2_config, image_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import ResNetForImageClassification

from adnet_hf import ADNetConfig, ADNetForSequenceClassification
from adnet_hf.backbones_adnet import Flops, StepState, backbone_adapter
from adnet_hf.engine_adnet import FlopsAccountant
from adnet_hf.units_adnet import CalculationUnit


def test_pooled_flops_follow_the_tokens_and_the_items_still_running():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    state = StepState(torch.zeros(2, 3, 4), mask)
    everyone = slice(None)
    flops = FlopsAccountant(
        torch.Size([2]), state.hidden.device, False, backbone_adapter(bert_config()).context_lengths
    )
    flops.add_positions(everyone, None, Flops(tokens=2.0, context=1.0), state)  # None: no item has stopped
    flops.add(everyone, None, 5.0)
    flops.add(everyone, torch.tensor([False, True]), 7.0)  # the second sample has stopped
    first = torch.tensor([0])
    flops.add_positions(first, torch.tensor([False]), Flops(tokens=1.0, items=0.5), state.select(first))
    # tokens x 2, tokens x context (all real tokens), per item; then only the first sample
    assert flops.total.tolist() == [6 + 9 + 5 + 7 + 3 + 0.5, 4 + 4 + 5]


def test_per_token_flops_count_each_tokens_causal_context():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding
    state = StepState(torch.zeros(2, 3, 4), mask, {"position_ids": torch.tensor([[0, 0, 1], [0, 1, 2]])})
    padding = mask == 0
    flops = FlopsAccountant(padding.shape, padding.device, True, backbone_adapter(gpt2_config()).context_lengths)
    flops.add_positions(slice(None), padding, Flops(tokens=2.0, context=1.0), state)
    flops.add(slice(None), padding, 1.0)
    assert flops.total.tolist() == [[0, 4, 5], [4, 5, 6]]


def test_image_flops_match_a_flop_counter():
    """Every position of a feature map is real: blocks, units and the output layer, the stem not counted."""
    model = image_model().eval()
    pixels = torch.randn(1, 1, 16, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(pixel_values=pixels, exit_policy="none")
    with torch.no_grad(), FlopCounterMode(display=False) as stem:
        model.adnet.backbone.embedder(pixels)
    assert out.flops.item() == pytest.approx(counter.get_total_flops() - stem.get_total_flops(), rel=1e-9)


def test_pooling_reads_the_mask_only_where_a_token_is_padding():
    hidden = torch.randn(2, 3, 4)
    padded = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert StepState(hidden, torch.ones(2, 3, dtype=torch.long)).pooling_mask() is None
    assert StepState(hidden, padded).pooling_mask() is padded
    assert StepState(hidden).pooling_mask() is None
    unit = CalculationUnit(4, 5)
    with torch.no_grad():
        for with_mask, without in zip(unit(hidden, torch.ones(2, 3)), unit(hidden, None)):
            torch.testing.assert_close(with_mask, without)


class _CountedOperations(TorchDispatchMode):
    """The aten operations run while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_full_depth_inference_adds_only_the_unit_the_head_and_the_exit_counts_to_the_plain_model():
    """At batch 1 each tensor operation outside the blocks costs more than its arithmetic: ADNet at full depth runs
    the plain ResNet's operations, its last unit and head instead of the pooler and classifier, and fills exit
    steps, executed layers and FLOPs (one operation each)."""
    model = image_model().eval()
    plain = ResNetForImageClassification(model.config.backbone_config).eval()
    plain.resnet.load_state_dict(model.adnet.backbone.state_dict())
    pixels = torch.randn(1, 1, 16, 16)
    counts = {}
    for name, run in {
        "adnet": lambda: model(pixel_values=pixels, exit_policy="none"),
        "plain": lambda: plain(pixel_values=pixels),
    }.items():
        with torch.inference_mode(), _CountedOperations() as counted:
            run()
        counts[name] = counted.names
    unit_and_head = ["flatten", "transpose", "linear", "sigmoid", "mean", "amax", "cat", "dropout", "linear"]
    pooler_and_classifier = ["adaptive_avg_pool2d", "flatten", "linear"]
    bookkeeping = len(counts["adnet"]) - len(counts["plain"]) - len(unit_and_head) + len(pooler_and_classifier)
    assert bookkeeping <= 3, counts["adnet"]


def test_a_step_where_nothing_stops_adds_only_the_decision_to_the_full_depth_step():
    """A variable step where no item stops runs what the same step runs at full depth with step outputs (unit, head,
    evidence, halting) plus the rule's decision (6 operations), one check of it and the halting record: no exit
    steps, logits or FLOPs to update (37 operations more than at full depth before, at every such step)."""
    torch.manual_seed(0)
    extra = {}
    for layers in (4, 6):
        backbone = bert_config()
        backbone.num_hidden_layers = layers
        model = ADNetForSequenceClassification(
            ADNetConfig(backbone_config=backbone, num_labels=2, num_fixed_steps=0)
        ).eval()
        ids = torch.randint(5, 50, (1, 7))
        counts, outputs = {}, {}
        for name, kwargs in {
            "exiting": {"exit_policy": "halting", "exit_threshold": 1e-9},
            "full": {"exit_policy": "none", "output_step_logits": True},
        }.items():
            with torch.inference_mode(), _CountedOperations() as counted:
                outputs[name] = model(input_ids=ids, **kwargs)
            counts[name] = len(counted.names)
        assert outputs["exiting"].exit_steps.item() == layers  # nothing stopped before the last step
        torch.testing.assert_close(outputs["exiting"].halting_probs, outputs["full"].halting_probs)
        extra[layers] = counts["exiting"] - counts["full"]
    assert (extra[6] - extra[4]) / 2 <= 11
