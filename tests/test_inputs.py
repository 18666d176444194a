"""What a forward pass receives (issue 15, items 6 and 7): each bad input refused early, by name, with what is allowed;
padding behaviour as documented. The generated cases are in `test_fuzz_inputs.py`."""

import pytest
import torch
from conftest import (
    VOCAB,
    bert_config,
    gpt2_config,
    image_model,
    lm_model,
    midpoint_threshold,
    seq_model,
    spread_halting,
    token_batch,
)
from transformers import BertForSequenceClassification, BertModel, GPT2ForSequenceClassification

from adnet_hf import ADNetConfig, ADNetForSequenceClassification

IDS, MASK = token_batch()
BAD_TEXT_INPUTS = [  # (inputs, error, what the message says)
    ({}, ValueError, "input_ids or inputs_embeds is required"),
    ({"input_ids": IDS[0]}, ValueError, r"input_ids must have shape \(batch_size, sequence_length\), got shape \(7,\)"),
    ({"input_ids": IDS.tolist()}, TypeError, "input_ids must be a torch.Tensor"),
    ({"input_ids": IDS.float()}, TypeError, r"input_ids must be an integer tensor \(torch.long\), got torch.float32"),
    ({"input_ids": IDS + VOCAB}, ValueError, r"input_ids must hold token ids in \[0, vocab_size=99\)"),
    ({"input_ids": IDS[:, :0]}, ValueError, "input_ids must not be empty"),
    ({"input_ids": IDS[:0]}, ValueError, "input_ids must not be empty"),
    (
        {"input_ids": IDS, "inputs_embeds": torch.zeros(4, 7, 32)},
        ValueError,
        "Pass only one of input_ids or inputs_embeds",
    ),
    ({"inputs_embeds": torch.zeros(4, 7, 31)}, ValueError, "inputs_embeds must have hidden_size=32 features"),
    (
        {"inputs_embeds": torch.zeros(4, 7, 32, dtype=torch.float64)},
        TypeError,
        "inputs_embeds must be a torch.float32 tensor like the model's weights",
    ),
    ({"input_ids": torch.full((1, 65), 5)}, ValueError, "input_ids has 65 tokens, more than the 64 positions"),
    (
        {"input_ids": IDS, "attention_mask": MASK[:, :5]},
        ValueError,
        r"attention_mask must have the shape of the tokens .*\(4, 7\), got \(4, 5\)",
    ),
    (
        {"input_ids": IDS, "attention_mask": MASK * 2},
        ValueError,
        "attention_mask must hold 1 for real tokens and 0 for padding",
    ),
    (
        {"input_ids": IDS, "position_ids": torch.arange(8)[None]},
        ValueError,
        r"position_ids must have shape \(4 or 1, 7\)",
    ),
    ({"input_ids": IDS, "position_ids": torch.full((4, 7), 64)}, ValueError, r"position_ids must hold positions in \["),
]


@pytest.mark.parametrize("backbone", ["bert", "gpt2"])
@pytest.mark.parametrize("inputs, error, message", BAD_TEXT_INPUTS)
def test_bad_text_inputs_are_refused_by_name(backbone, inputs, error, message):
    with pytest.raises(error, match=message):
        seq_model(backbone).eval()(**inputs)


@pytest.mark.parametrize(
    "labels, error, message",
    [
        (torch.zeros(4), TypeError, "labels must be an integer tensor"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"labels must be class indices .* \(4,\), got shape \(3,\)"),
        (torch.full((4,), 3), ValueError, r"labels must hold class indices in \[0, num_labels=3\) or -100"),
        ([0, 1, 2, 0], TypeError, "labels must be a torch.Tensor"),
    ],
)
def test_bad_classification_labels_are_refused_by_name(labels, error, message):
    model = seq_model(problem_type="single_label_classification")
    with pytest.raises(error, match=message):
        model(input_ids=IDS, attention_mask=MASK, labels=labels)


def test_float_labels_of_the_wrong_shape_leave_the_problem_type_unset():
    """Float labels mean multi-label (as in Transformers): refused when not (batch_size, num_labels), and the refused
    call does not fix the config's problem type."""
    model = seq_model()
    with pytest.raises(ValueError, match=r"labels must be 0/1 targets for multi_label_classification .*\(4, 3\)"):
        model(input_ids=IDS, labels=torch.zeros(4))
    assert model.config.problem_type is None


def test_single_label_column_labels_are_flattened_as_transformers_does():
    model = seq_model().eval()
    labels = torch.tensor([0, 2, 1, 1])
    column = model(input_ids=IDS, attention_mask=MASK, labels=labels[:, None])
    flat = model(input_ids=IDS, attention_mask=MASK, labels=labels)
    torch.testing.assert_close(column.loss, flat.loss)


@pytest.mark.parametrize(
    "labels, error, message",
    [
        (IDS[:, :3], ValueError, r"labels must have the shape of input_ids, \(4, 7\), got \(4, 3\)"),
        (IDS.float(), TypeError, "labels must be an integer tensor"),
        (IDS + VOCAB, ValueError, r"labels must hold token ids in \[0, vocab_size=99\) or -100"),
    ],
)
def test_bad_causal_lm_labels_are_refused_by_name(labels, error, message):
    with pytest.raises(error, match=message):
        lm_model()(input_ids=IDS, attention_mask=MASK, labels=labels)


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_token_type_ids_on_a_decoder_are_refused_not_dropped(backbone):
    with pytest.raises(ValueError, match="does not take token_type_ids"):
        lm_model(backbone)(input_ids=IDS, token_type_ids=torch.zeros_like(IDS))


@pytest.mark.parametrize(
    "pixel_values, error, message",
    [
        (None, ValueError, "pixel_values is required"),
        (
            torch.randn(1, 28, 28),
            ValueError,
            r"pixel_values must have shape \(batch_size, num_channels, height, width\)",
        ),
        (torch.randn(1, 1, 1, 28, 28), ValueError, r"pixel_values must have shape"),
        (torch.randn(2, 3, 28, 28), ValueError, "pixel_values must have num_channels=1 channels"),
        (torch.ones(2, 1, 28, 28, dtype=torch.long), TypeError, "pixel_values must be a torch.float32 tensor"),
    ],
)
def test_bad_pixel_values_are_refused_by_name(pixel_values, error, message):
    with pytest.raises(error, match=message):
        image_model()(pixel_values=pixel_values)


@pytest.mark.parametrize(
    "plain_class, config", [(BertForSequenceClassification, bert_config), (GPT2ForSequenceClassification, gpt2_config)]
)
def test_a_plain_task_checkpoint_points_to_from_backbone(tmp_path, plain_class, config):
    plain_class(config(num_labels=3)).save_pretrained(tmp_path)
    for load in (ADNetForSequenceClassification.from_pretrained, ADNetConfig.from_pretrained):
        with pytest.raises(ValueError, match=r"not an ADNet one: wrap it with .*from_backbone"):
            load(tmp_path)
    model = ADNetForSequenceClassification.from_backbone(str(tmp_path), num_labels=3)  # what the message says works
    assert model.config.backbone_config.model_type == config().model_type


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_causal_lm_with_an_all_zero_mask_returns_logits(backbone):
    """As Transformers' own LMs do; under exits padding tokens get zero logits and exit step 0, as in any batch."""
    model = lm_model(backbone).eval()
    mask = MASK.clone()
    mask[1] = 0
    with torch.no_grad():
        for attention_mask in (torch.zeros_like(MASK), mask):
            out = model(input_ids=IDS, attention_mask=attention_mask, exit_policy="halting")
            assert out.logits.shape == (4, 7, VOCAB)
            padding = attention_mask == 0
            assert not out.logits[padding].any() and not out.exit_steps[padding].any()
        alone = model(input_ids=IDS[2:3, : int(MASK[2].sum())], exit_policy="halting")
        torch.testing.assert_close(out.logits[2, : int(MASK[2].sum())], alone.logits[0], rtol=1e-4, atol=1e-5)


def confidence_model(backbone: str):
    """One output layer per step, `confidence` exits, halfway between the samples' first-step confidences."""
    model = seq_model(backbone, share_output_layer=False, exit_policy="confidence").eval()
    spread_halting(model)
    with torch.no_grad():
        for layer in model.output_layers:
            layer[1].weight.normal_(0.0, 1.0)
    return model


def left_padded_against_alone(model, ids, mask, **inputs) -> tuple[float, int]:
    """The largest logit difference and the number of exit flips between the batch and each sample alone."""
    with torch.no_grad():
        confidence = model(
            input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True, **inputs
        ).step_logits[0]
        model.config.confidence_threshold = midpoint_threshold(confidence.softmax(-1).amax(-1))
        batched = model(input_ids=ids, attention_mask=mask, **inputs)
        worst, flips = 0.0, 0
        for row in range(ids.shape[0]):
            alone = model(input_ids=ids[row : row + 1, mask[row].bool()])
            worst = max(worst, (alone.logits[0] - batched.logits[row]).abs().max().item())
            flips += int(alone.exit_steps[0] != batched.exit_steps[row])
    return worst, flips


LEFT_PADDING = dict(batch=8, length=9, pad_lengths=(0, 2, 0, 3, 1, 0, 4, 5), left_padding=True)


def test_left_padded_bert_differs_by_its_positions_only():
    """BERT's absolute positions count left padding (plain `BertModel` differs too); positions that skip the padding
    make the batch equal each sample alone, so the units and exits add no dependence on the batch."""
    model = confidence_model("bert")
    ids, mask = token_batch(**LEFT_PADDING)
    skipping = (mask.cumsum(-1) - 1).clamp(min=0)
    assert left_padded_against_alone(model, ids, mask)[0] > 1e-2
    worst, flips = left_padded_against_alone(model, ids, mask, position_ids=skipping)
    assert worst < 1e-5 and flips == 0
    plain = BertModel(model.config.backbone_config, add_pooling_layer=False).eval()
    plain.load_state_dict(model.adnet.backbone.state_dict())
    with torch.no_grad():
        padded = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = plain(input_ids=ids[3:4, mask[3].bool()]).last_hidden_state
    assert (padded[3, mask[3].bool()] - alone[0]).abs().max() > 1e-2


@pytest.mark.parametrize("backbone, pad_id", [("gpt2", 0), ("roberta", 1)])
def test_left_padding_equals_alone_where_positions_skip_it(backbone, pad_id):
    """Decoders (positions from the mask) and RoBERTa padded with its pad_token_id (positions from the ids)."""
    model = confidence_model(backbone)
    ids, mask = token_batch(**LEFT_PADDING, pad_id=pad_id)
    worst, flips = left_padded_against_alone(model, ids, mask)
    assert worst < 1e-5 and flips == 0


def test_broadcast_position_ids_survive_samples_leaving_the_batch():
    """`position_ids` of shape (1, T), as Transformers takes them, while some samples exit before others."""
    model = seq_model("gpt2").eval()
    spread_halting(model)
    ids = torch.randint(3, VOCAB, (8, 6))
    with torch.no_grad():
        not_halted = 1 - model(input_ids=ids, exit_policy="none", output_step_logits=True).halting_probs[:, 0]
        threshold = midpoint_threshold(not_halted)
        out = model(input_ids=ids, position_ids=torch.arange(6)[None], exit_policy="halting", exit_threshold=threshold)
        reference = model(input_ids=ids, exit_policy="halting", exit_threshold=threshold)
    assert len(set(out.exit_steps.tolist())) > 1
    torch.testing.assert_close(out.logits, reference.logits)
    assert torch.equal(out.exit_steps, reference.exit_steps)
