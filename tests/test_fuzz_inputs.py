"""Fuzzed inputs for every head (issue 15): each generated case either works, and then equals its reference, or is
refused with a `ValueError` / `TypeError` that names the argument.

References: each sample run alone equals its row of the batch (right padding; left padding where positions skip it:
decoders, RoBERTa's padding id, BERT given such `position_ids`); each item's exit prediction equals the full-depth
pass's prediction at that step (`exit_policy="none"`; for a causal LM, where no earlier token left before the step
before); a causal LM at full depth equals the backbone's own LM; the loss at inference equals the cross-entropy of the
logits. Cases come from Hypothesis with `derandomize=True`: every run tries the same ones.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, image_model, lm_model, seq_model, spread_halting, vary_token_exits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2LMHeadModel, LlamaForCausalLM

HEADS = ("bert-sequence", "roberta-sequence", "gpt2-sequence", "gpt2-causal", "llama-causal", "resnet-image")
POLICIES = ("halting", "confidence", "patience", "none")
MASK_DTYPES = (torch.long, torch.int32, torch.bool, torch.float32)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)

# Bad inputs: name -> the argument the error must name. Each applies to the heads whose inputs it can spoil.
TEXT_MUTATIONS = {
    "no_input": "input_ids",
    "ids_1d": "input_ids",
    "ids_3d": "input_ids",
    "ids_float": "input_ids",
    "ids_bool": "input_ids",
    "ids_list": "input_ids",
    "ids_negative": "input_ids",
    "ids_too_large": "input_ids",
    "empty_length": "input_ids",
    "empty_batch": "input_ids",
    "ids_and_embeds": "inputs_embeds",
    "embeds_width": "inputs_embeds",
    "embeds_float64": "inputs_embeds",
    "embeds_long": "inputs_embeds",
    "mask_short": "attention_mask",
    "mask_batch": "attention_mask",
    "mask_4d": "attention_mask",
    "mask_1d": "attention_mask",
    "mask_values": "attention_mask",
    "mask_list": "attention_mask",
    "positions_shape": "position_ids",
    "positions_float": "position_ids",
    "positions_negative": "position_ids",
    "labels_float": "labels",
    "labels_batch": "labels",
    "labels_list": "labels",
    "labels_range": "labels",
    "labels_shape": "labels",
    "policy_unknown": "exit_policy",
    "threshold_range": "exit_threshold",
    "threshold_full_depth": "exit_threshold",
}
ABSOLUTE_MUTATIONS = {"too_long": "input_ids", "positions_too_large": "position_ids"}  # BERT, RoBERTa, GPT-2
SEGMENT_MUTATIONS = {
    "segments_range": "token_type_ids",
    "segments_shape": "token_type_ids",
    "segments_float": "token_type_ids",
}  # BERT, RoBERTa
DECODER_MUTATIONS = {"segments_on_decoder": "token_type_ids"}
IMAGE_MUTATIONS = {
    "no_input": "pixel_values",
    "pixels_3d": "pixel_values",
    "pixels_5d": "pixel_values",
    "pixels_long": "pixel_values",
    "pixels_float64": "pixel_values",
    "pixels_list": "pixel_values",
    "pixels_channels": "pixel_values",
    "empty_batch": "pixel_values",
    "labels_float": "labels",
    "labels_batch": "labels",
    "labels_range": "labels",
    "text_input": "input_ids",
    "policy_unknown": "exit_policy",
    "threshold_range": "exit_threshold",
}


def mutations(head: str) -> dict[str, str]:
    backbone, kind = head.split("-")
    if kind == "image":
        return IMAGE_MUTATIONS
    found = dict(TEXT_MUTATIONS)
    if backbone != "llama":
        found.update(ABSOLUTE_MUTATIONS)
    found.update(SEGMENT_MUTATIONS if backbone in ("bert", "roberta") else DECODER_MUTATIONS)
    return found


@functools.cache
def fuzz_model(head: str):
    """One tiny model per head, with halting spread so that items exit at different steps."""
    torch.manual_seed(0)
    backbone, kind = head.split("-")
    if kind == "causal":
        model = lm_model(backbone, num_fixed_steps=0)
        vary_token_exits(model)
        return model.eval()
    single_label = {"problem_type": "single_label_classification"}
    if kind == "image":
        model = image_model(**single_label)
    else:
        model = seq_model(backbone, share_output_layer=backbone == "roberta", **single_label)
    spread_halting(model)
    return model.eval()


@functools.cache
def backbone_lm(head: str):
    """The backbone's own causal LM with the ADNet model's weights: the full-depth reference."""
    model = fuzz_model(head)
    config = model.config.backbone_config
    reference = (GPT2LMHeadModel if config.model_type == "gpt2" else LlamaForCausalLM)(config).eval()
    reference.base_model.load_state_dict(model.adnet.backbone.state_dict())
    reference.get_output_embeddings().weight = model.lm_head.weight
    return reference


@dataclass(frozen=True)
class Case:
    head: str
    mutation: str  # "valid", a valid variant ("labels_column", "all_padding", "longest") or a key of `mutations(head)`
    batch: int
    length: int
    real_lengths: tuple[int, ...]
    left_padding: bool
    mask_dtype: torch.dtype
    positions: str  # "default", "full" or "broadcast"
    with_mask: bool
    with_labels: bool
    policy: str
    threshold: float | int | None
    split: float | None  # put the threshold between the items' values at a step, at this quantile (None: keep it)
    split_step: int
    seed: int


@st.composite
def cases(draw) -> Case:
    head = draw(st.sampled_from(HEADS))
    backbone, kind = head.split("-")
    valid = [
        "valid",
        "valid",
        "valid",
        "labels_column",
        "all_padding",
        *(["longest"] if backbone in ("bert", "roberta", "gpt2") else []),
    ]
    mutation = draw(st.one_of(st.sampled_from(valid), st.sampled_from(sorted(mutations(head)))))
    batch, length = draw(st.sampled_from((4, 3, 2, 1))), draw(st.integers(1, 10))  # mostly several samples
    real_lengths = tuple(draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)))
    left_padding = kind != "image" and draw(st.booleans())
    positions = "default" if kind == "image" else draw(st.sampled_from(["default", "full", "broadcast"]))
    if left_padding and positions == "broadcast":
        positions = "full"
    if backbone == "bert" and left_padding:
        positions = "full"  # BERT's default positions count left padding: the batch then differs, as plain BERT's
    policy = draw(st.sampled_from(POLICIES))
    thresholds = {
        "halting": st.floats(0.01, 0.99),
        "confidence": st.floats(0.3, 1.0),
        "patience": st.integers(1, 3),
        "none": st.none(),
    }
    split = draw(st.floats(0.0, 1.0) if draw(st.sampled_from((True, True, False))) else st.none())
    return Case(
        head=head,
        mutation=mutation,
        batch=batch,
        length=length,
        real_lengths=real_lengths,
        left_padding=left_padding,
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        positions=positions,
        with_mask=draw(st.booleans()) or min(real_lengths) < length,
        with_labels=draw(st.booleans()),
        policy=policy,
        threshold=draw(thresholds[policy]),
        split=split,
        split_step=draw(st.integers(0, 2)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def token_mask(case: Case) -> torch.Tensor:
    mask = torch.zeros(case.batch, case.length, dtype=torch.long)
    for row, real in enumerate(case.real_lengths):
        if case.left_padding:
            mask[row, case.length - real :] = 1
        else:
            mask[row, :real] = 1
    return mask


def default_positions(model, mask: torch.Tensor) -> torch.Tensor:
    """The positions each real token has when its sample runs alone (RoBERTa's start after its padding id)."""
    config = model.config.backbone_config
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if config.model_type == "roberta":
        return torch.where(mask.bool(), positions + config.pad_token_id + 1, config.pad_token_id)
    return positions


def longest(config) -> int:
    """The longest sequence of a backbone with a position table (RoBERTa's positions start after its padding id)."""
    return config.max_position_embeddings - (config.pad_token_id + 1 if config.model_type == "roberta" else 0)


def valid_inputs(case: Case, model, generator: torch.Generator) -> dict:
    """The case's inputs before any mutation: tokens (padding ids at padding), mask, positions, labels."""
    if case.head.endswith("image"):
        side = 4 + case.length
        inputs = {"pixel_values": torch.randn(case.batch, 1, side, side, generator=generator)}
        if case.with_labels:
            inputs["labels"] = torch.randint(0, model.config.num_labels, (case.batch,), generator=generator)
        return inputs
    mask = token_mask(case)
    pad_id = model.config.backbone_config.pad_token_id or 0
    ids = torch.randint(3, VOCAB, (case.batch, case.length), generator=generator).masked_fill(mask == 0, pad_id)
    inputs = {"input_ids": ids}
    if case.with_mask:
        inputs["attention_mask"] = mask.to(case.mask_dtype)
    if case.positions == "full":
        inputs["position_ids"] = default_positions(model, mask)
    elif case.positions == "broadcast":
        inputs["position_ids"] = default_positions(model, torch.ones_like(mask[:1]))
    if model.config.backbone_config.model_type in ("bert", "roberta"):
        inputs["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=generator)
    if case.with_labels and case.head.endswith("causal"):
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    elif case.with_labels:
        inputs["labels"] = torch.randint(0, model.config.num_labels, (case.batch,), generator=generator)
    return inputs


def mutate(inputs: dict, case: Case, model) -> dict:
    """The case's inputs with its bad input (or its valid variant) applied; `exit_policy` / `exit_threshold` too."""
    inputs = {**inputs, "exit_policy": case.policy, "exit_threshold": case.threshold}
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask", token_mask(case))
    config = model.config.backbone_config
    main = "pixel_values" if "pixel_values" in inputs else "input_ids"
    batch_labels = torch.zeros(case.batch, dtype=torch.long)
    limit = getattr(config, "max_position_embeddings", 0)
    changes = {
        "valid": lambda: {},
        "labels_column": lambda: (
            {"labels": inputs["labels"][:, None]} if "labels" in inputs and not case.head.endswith("causal") else {}
        ),
        "all_padding": lambda: {"attention_mask": torch.zeros_like(mask)} if ids is not None else {},
        "longest": lambda: {
            "input_ids": torch.randint(3, VOCAB, (case.batch, longest(config))),
            "attention_mask": None,
            "position_ids": None,
            "token_type_ids": None,
            "labels": None,
        },
        "no_input": lambda: {main: None},
        "ids_1d": lambda: {"input_ids": ids[0]},
        "ids_3d": lambda: {"input_ids": ids[..., None]},
        "ids_float": lambda: {"input_ids": ids.float()},
        "ids_bool": lambda: {"input_ids": ids > 50},
        "ids_list": lambda: {"input_ids": ids.tolist()},
        "ids_negative": lambda: {"input_ids": ids - 200},
        "ids_too_large": lambda: {"input_ids": ids + config.vocab_size},
        "empty_length": lambda: {
            "input_ids": ids[:, :0],
            "attention_mask": mask[:, :0],
            "position_ids": None,
            "token_type_ids": None,
            "labels": None,
        },
        "empty_batch": lambda: {
            main: inputs[main][:0],
            "attention_mask": None,
            "position_ids": None,
            "token_type_ids": None,
            "labels": None,
        },
        "ids_and_embeds": lambda: {"inputs_embeds": torch.zeros(*ids.shape, config.hidden_size)},
        "embeds_width": lambda: {"input_ids": None, "inputs_embeds": torch.zeros(*ids.shape, config.hidden_size + 1)},
        "embeds_float64": lambda: {
            "input_ids": None,
            "inputs_embeds": torch.zeros(*ids.shape, config.hidden_size, dtype=torch.float64),
        },
        "embeds_long": lambda: {"input_ids": None, "inputs_embeds": ids[..., None].expand(-1, -1, config.hidden_size)},
        "mask_short": lambda: {"attention_mask": mask[:, :-1]},
        "mask_batch": lambda: {"attention_mask": torch.cat([mask, mask[:1]])},
        "mask_4d": lambda: {"attention_mask": mask[:, None, None, :].expand(-1, 1, case.length, -1)},
        "mask_1d": lambda: {"attention_mask": mask[0]},
        # 2 where the mask has a 1, and 3 where it has a 0: never a 0/1 mask, even one with no real token
        "mask_values": lambda: {"attention_mask": 3 - mask.long()},
        "mask_list": lambda: {"attention_mask": mask.tolist()},
        "positions_shape": lambda: {"position_ids": torch.zeros(case.batch, case.length + 1, dtype=torch.long)},
        "positions_float": lambda: {"position_ids": torch.zeros(case.batch, case.length)},
        "positions_negative": lambda: {"position_ids": torch.full((case.batch, case.length), -1)},
        "positions_too_large": lambda: {"position_ids": torch.full((case.batch, case.length), limit)},
        "too_long": lambda: {
            "input_ids": torch.full((case.batch, limit + 1), 5),
            "attention_mask": None,
            "position_ids": None,
            "token_type_ids": None,
            "labels": None,
        },
        "segments_range": lambda: {"token_type_ids": torch.full_like(ids, config.type_vocab_size)},
        "segments_shape": lambda: {"token_type_ids": torch.zeros(case.batch, case.length + 1, dtype=torch.long)},
        "segments_float": lambda: {"token_type_ids": torch.zeros(case.batch, case.length)},
        "segments_on_decoder": lambda: {"token_type_ids": torch.zeros_like(ids)},
        "labels_float": lambda: {
            "labels": batch_labels.float()
            if ids is None
            else torch.zeros(ids.shape)
            if case.head.endswith("causal")
            else batch_labels.float()
        },
        "labels_batch": lambda: {
            "labels": torch.zeros(
                case.batch + 1,
                *(() if ids is None or not case.head.endswith("causal") else ids.shape[1:]),
                dtype=torch.long,
            )
        },
        "labels_list": lambda: {"labels": batch_labels.tolist()},
        "labels_range": lambda: {
            "labels": batch_labels + 100
            if ids is None or not case.head.endswith("causal")
            else torch.full_like(ids, config.vocab_size)
        },
        "labels_shape": lambda: {
            "labels": torch.zeros(case.batch, 2, dtype=torch.long) if not case.head.endswith("causal") else batch_labels
        },
        "pixels_3d": lambda: {"pixel_values": inputs["pixel_values"][:, 0]},
        "pixels_5d": lambda: {"pixel_values": inputs["pixel_values"][:, None]},
        "pixels_long": lambda: {"pixel_values": inputs["pixel_values"].long()},
        "pixels_float64": lambda: {"pixel_values": inputs["pixel_values"].double()},
        "pixels_list": lambda: {"pixel_values": inputs["pixel_values"].tolist()},
        "pixels_channels": lambda: {"pixel_values": inputs["pixel_values"].expand(-1, 3, -1, -1)},
        "text_input": lambda: {"input_ids": torch.zeros(case.batch, 4, dtype=torch.long)},
        "policy_unknown": lambda: {"exit_policy": "halt"},
        "threshold_range": lambda: {"exit_policy": "halting", "exit_threshold": 1.5},
        "threshold_full_depth": lambda: {"exit_policy": "none", "exit_threshold": 0.5},
    }
    inputs.update(changes[case.mutation]())
    return {name: value for name, value in inputs.items() if value is not None}


def splitting_threshold(model, inputs: dict, mask: torch.Tensor | None, case: Case) -> float | None:
    """A `halting` / `confidence` threshold between two of the items' values at a variable step of the full-depth
    pass (at quantile `case.split`, never within 5e-6 of a value): the tiny random models otherwise
    exit a whole batch at one step. None when the items' values are too close to split."""
    full = run(model, **plain_inputs(inputs), exit_policy="none", output_step_logits=True)
    if case.policy == "halting":  # the mass not halted only falls: a split at any step separates the items
        step = min(case.split_step, full.halting_probs.shape[-1] - 2)
        values = 1 - full.halting_probs[..., : step + 1].sum(-1)
    else:  # confidence need not grow: split at the first variable step
        values = full.step_logits[0].float().softmax(-1).amax(-1)
    if mask is not None and values.dim() > 1:
        values = values[mask.bool()]
    values = values.flatten().sort().values.tolist()
    gaps = [
        (abs(index - case.split * (len(values) - 1)), (low + high) / 2)
        for index, (low, high) in enumerate(zip(values, values[1:]))
        if high - low > 1e-5
    ]
    return min(gaps)[1] if gaps else None


def plain_inputs(inputs: dict) -> dict:
    """The model inputs without labels and exit settings."""
    return {k: v for k, v in inputs.items() if k not in ("labels", "exit_policy", "exit_threshold")}


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def fixed_steps(model) -> int:
    return model.config.num_fixed_steps


def check_batch_independence(model, inputs: dict, out, mask: torch.Tensor | None) -> None:
    """Each sample alone (its real tokens only) gives its row's prediction and exit steps."""
    for row in range(out.logits.shape[0]):
        alone = {"exit_policy": inputs["exit_policy"], "exit_threshold": inputs.get("exit_threshold")}
        if mask is None:
            alone["pixel_values"] = inputs["pixel_values"][row : row + 1]
        else:
            real = mask[row].bool()
            if not real.any():
                continue
            alone["input_ids"] = inputs["input_ids"][row : row + 1, real]
            if "token_type_ids" in inputs:
                alone["token_type_ids"] = inputs["token_type_ids"][row : row + 1, real]
        single = run(model, **{k: v for k, v in alone.items() if v is not None})
        ours, theirs = out.logits[row], single.logits[0]
        steps = out.exit_steps[row]
        if mask is not None and ours.dim() > 1:  # a causal LM: its real tokens
            ours, steps = ours[mask[row].bool()], steps[mask[row].bool()]
        assert torch.equal(steps, single.exit_steps[0]), f"row {row}: exit steps {steps} alone {single.exit_steps[0]}"
        torch.testing.assert_close(ours, theirs, **TOLERANCE, msg=lambda m: f"row {row} alone differs: {m}")


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over the labels that are not -100; 0 when every label is (no NaN)."""
    return F.cross_entropy(logits, labels, reduction="sum") / max(int((labels != -100).sum()), 1)


def check_classifier(model, inputs: dict, out, mask: torch.Tensor | None) -> None:
    """Batch independence; each sample's prediction is the full-depth pass's at its exit step; the loss."""
    check_batch_independence(model, inputs, out, mask)
    full = run(model, **plain_inputs(inputs), exit_policy="none", output_step_logits=True)
    at_exit = full.step_logits[out.exit_steps - fixed_steps(model) - 1, torch.arange(out.logits.shape[0])]
    torch.testing.assert_close(out.logits, at_exit, **TOLERANCE, msg=lambda m: f"exit prediction differs: {m}")
    if "labels" in inputs:
        expected = labelled_cross_entropy(out.logits, inputs["labels"].view(-1))
        torch.testing.assert_close(out.loss, expected, **TOLERANCE)


def check_causal_lm(model, head: str, inputs: dict, out, mask: torch.Tensor) -> None:
    """Batch independence; at full depth the backbone's own LM; a token's exit prediction is the full-depth one at
    that step when no earlier token of its sample left before the step before; padding exits at 0; the loss."""
    check_batch_independence(model, inputs, out, mask)
    real = mask.bool()
    assert torch.equal(out.exit_steps[~real], torch.zeros_like(out.exit_steps[~real]))
    full = run(model, **plain_inputs(inputs), exit_policy="none", output_step_logits=True)
    positions = default_positions(model, mask)
    theirs = run(backbone_lm(head), input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(
        full.logits[real],
        theirs.logits[real],
        **TOLERANCE,
        msg=lambda m: f"full depth differs from the backbone LM: {m}",
    )
    steps = out.exit_steps.masked_fill(~real, 10**6)
    earliest_before = torch.cummin(steps, dim=-1).values.roll(1, dims=-1)
    earliest_before[:, 0] = 10**6
    exact = real & (earliest_before >= out.exit_steps - 1)
    index = (out.exit_steps - fixed_steps(model) - 1).clamp(min=0)
    at_exit = full.step_logits.gather(0, index[None, ..., None].expand(1, *full.step_logits.shape[1:]))[0]
    torch.testing.assert_close(
        out.logits[exact], at_exit[exact], **TOLERANCE, msg=lambda m: f"exit prediction differs: {m}"
    )
    if inputs["exit_policy"] != "none":
        assert not out.logits[~real].any(), "padding tokens must have zero logits under exits"
    if "labels" in inputs:
        expected = labelled_cross_entropy(out.logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten())
        torch.testing.assert_close(out.loss, expected, **TOLERANCE)


def outcome(case: Case) -> str:
    """ "works", "clear error", or what went wrong ("obscure error: ..." / "silent wrong: ...")."""
    model = fuzz_model(case.head)
    generator = torch.Generator().manual_seed(case.seed)
    inputs = mutate(valid_inputs(case, model, generator), case, model)
    expected = mutations(case.head).get(case.mutation)
    mask = None
    if expected is None and not case.head.endswith("image"):
        mask = (inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])) != 0).long()
    if expected is None and case.split is not None and case.policy in ("halting", "confidence"):
        inputs["exit_threshold"] = splitting_threshold(model, inputs, mask, case) or case.threshold
    try:
        out = run(model, **inputs)
    except (ValueError, TypeError) as error:
        if expected is not None and expected in str(error):
            return "clear error"
        return f"obscure error: {type(error).__name__}: {error}"
    except Exception as error:  # noqa: BLE001 - every other exception is an obscure one, counted
        return f"obscure error: {type(error).__name__}: {error}"
    if expected is not None:
        return f"silent wrong: bad input {case.mutation!r} accepted"
    try:
        if case.head.endswith("causal"):
            check_causal_lm(model, case.head, inputs, out, mask)
        else:
            check_classifier(model, inputs, out, mask)
    except AssertionError as error:
        return f"silent wrong: {error}"
    except Exception as error:  # noqa: BLE001 - a valid reference input that fails
        return f"obscure error in a reference run: {type(error).__name__}: {error}"
    return "works"


def fuzz(max_examples: int) -> Counter:
    """Run `max_examples` derandomized cases; fail (Hypothesis shrinks to the smallest case) on any outcome but
    "works" or "clear error"."""
    outcomes: Counter = Counter()

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases())
    def one_case(case: Case) -> None:
        result = outcome(case)
        outcomes[result.split(":")[0]] += 1
        assert result in ("works", "clear error"), f"{case}: {result}"

    one_case()
    return outcomes


def report(outcomes: Counter) -> str:
    return " | ".join(
        f"{name}: {outcomes[name]}"
        for name in ("works", "clear error", "obscure error", "obscure error in a reference run", "silent wrong")
    )


def test_fuzzed_inputs_quick():
    outcomes = fuzz(100)
    print(report(outcomes))
    assert outcomes["works"] >= 30 and outcomes["clear error"] >= 30, report(outcomes)


@pytest.mark.slow
def test_fuzzed_inputs_thousand_cases():
    outcomes = fuzz(1000)
    print(report(outcomes))
    assert sum(outcomes.values()) >= 1000 and outcomes["works"] >= 300, report(outcomes)
