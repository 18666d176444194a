"""The full-depth pass's bookkeeping, kept cheap: FLOPs added up as numbers and put on the items once, pooling that
reads the token mask only where some token is padding."""

import pytest
import torch
from conftest import bert_config, gpt2_config, image_model
from torch.utils.flop_counter import FlopCounterMode

from adnet_hf.backbones_adnet import Flops, StepState, backbone_adapter
from adnet_hf.engine_adnet import FlopsAccountant
from adnet_hf.units_adnet import CalculationUnit


def test_pooled_flops_follow_the_tokens_and_the_items_still_running():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    state = StepState(torch.zeros(2, 3, 4), mask)
    everyone = slice(None)
    flops = FlopsAccountant(torch.Size([2]), state.hidden.device, False,
                            backbone_adapter(bert_config()).context_lengths)
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
