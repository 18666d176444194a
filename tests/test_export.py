"""Deploying exits: every step exported as its own graph (`torch.export`, ONNX) and the ONNX Runtime exit loop over
them give the eager model's outputs and exit steps; full depth exports whole."""

import numpy as np
import pytest
import torch
from conftest import image_model, lm_model, midpoint_threshold, seq_model, spread_halting, token_batch
from torch.utils._pytree import tree_flatten

from adnet_hf.backbones_adnet import StepState
from adnet_hf.export_adnet import (
    ADNetStepRunner,
    StateLayout,
    StepGraph,
    evidence_inputs,
    export_step_programs,
    export_steps,
)

POLICIES = ("none", "halting", "confidence", "patience")


def example_and_test_inputs(kind: str) -> tuple[dict, dict]:
    """An export example, and inputs of another batch size and sequence length (image size) to run."""
    if kind == "resnet":
        return {"pixel_values": torch.randn(3, 1, 12, 12)}, {"pixel_values": torch.randn(10, 1, 16, 14)}
    ids, mask = token_batch(batch=3, length=6, pad_lengths=(0, 2, 1))
    test_ids, test_mask = token_batch(batch=10, length=9, pad_lengths=(0, 4, 1, 0, 7, 2, 0, 3, 0, 5))
    return {"input_ids": ids, "attention_mask": mask}, {"input_ids": test_ids, "attention_mask": test_mask}


def build_model(kind: str):
    model = image_model(num_fixed_steps=0) if kind == "resnet" else seq_model(kind, num_fixed_steps=1)
    spread_halting(model, scale=50.0)
    return model.eval()


def thresholds(model, inputs: dict) -> dict:
    """A setting per exit policy that splits the batch between early and late exits."""
    with torch.no_grad():
        full = model(**inputs, exit_policy="none", output_step_logits=True)
    return {
        "none": None,
        "halting": midpoint_threshold(1 - full.halting_probs[:, :2].sum(-1)),
        "confidence": midpoint_threshold(full.step_logits[0].softmax(-1).amax(-1)),
        "patience": 1,
    }


@pytest.mark.slow
def test_step_programs_chain_to_the_full_depth_logits_at_another_batch_and_length():
    model = build_model("bert")
    _, inputs = example_and_test_inputs("bert")
    ids, mask = token_batch(batch=2, length=5, pad_lengths=(0, 0))  # no padding: the eager embedding has no 4-D mask
    exported = export_step_programs(model, {"input_ids": ids, "attention_mask": mask})
    tensors = tree_flatten(exported.programs[0].module()(*(inputs[name] for name in exported.input_names)))[0]
    assert len(tensors) == len(exported.state_names) == 3  # hidden, token_mask, the 4-D mask
    engine, previous = model.adnet.step_engine(), None
    for step, program in enumerate(exported.programs[1:]):
        extra = {"not_halted": torch.ones(len(tensors[0])), "previous_logits": previous}
        outputs = program.module()(*tensors, *(extra[name] for name in evidence_inputs(engine, step)))
        tensors, previous = (outputs[0], *tensors[1:]), outputs[-1]
    with torch.no_grad():
        full = model(**inputs, exit_policy="none")
    torch.testing.assert_close(outputs[2], full.logits, rtol=1e-5, atol=1e-5)


def test_a_step_graph_is_the_engine_step_unit_and_head():
    model = build_model("bert")
    ids, mask = token_batch()
    engine = model.adnet.step_engine()

    def engine_step(step: int, state: StepState) -> StepState:
        hidden = engine.run_blocks(step, state, None, lambda index, output: output)[0]
        return StepState(hidden, state.token_mask, state.block_kwargs)

    with torch.no_grad():
        state = engine_step(
            0, model.adnet.adapter.embed(model.adnet.backbone, {"input_ids": ids, "attention_mask": mask})
        )
        graph = StepGraph(model, 1, StateLayout.of(state))
        not_halted = torch.ones(len(ids))  # the first variable step's unit reads the evidence with no halting yet
        hidden, lambdas, logits = graph(
            state.hidden, state.token_mask, state.block_kwargs["attention_mask"], not_halted
        )
        state = engine_step(1, state)
        summary = engine.units[0].summarise(state.hidden, state.token_mask)
        expected_logits = model.step_head(0, summary, state.hidden)
        evidence = model.read_step_evidence(expected_logits, None, not_halted)
        expected_lambdas = engine.units[0].halt(summary, state.hidden, evidence)
    assert engine.units[0].reads_evidence
    torch.testing.assert_close(hidden, state.hidden)
    torch.testing.assert_close(lambdas, expected_lambdas)
    torch.testing.assert_close(logits, expected_logits)


def test_bad_export_requests_are_refused_by_name(tmp_path):
    model = build_model("bert")
    ids, mask = token_batch()
    with pytest.raises(TypeError, match="ADNetForCausalLM"):
        export_steps(lm_model(), tmp_path, {"input_ids": ids})
    with pytest.raises(ValueError, match=r"example_inputs\['input_ids'\].*batch of at least 2"):
        export_steps(model, tmp_path, {"input_ids": ids[:1]})
    with pytest.raises(ValueError, match="example_inputs must hold model inputs among"):
        export_steps(model, tmp_path, {"labels": ids})
    with pytest.raises(ValueError, match="directory must hold an export_steps output"):
        ADNetStepRunner(tmp_path)


@pytest.fixture(scope="module", params=["bert", "gpt2", "resnet"])
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(request.param)
    example, inputs = example_and_test_inputs(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    export_steps(model, directory, example)
    return model, ADNetStepRunner(directory), inputs


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_onnx_runner_equals_the_eager_model(exported, policy):
    model, runner, inputs = exported
    threshold = thresholds(model, inputs)[policy]
    with torch.no_grad():
        eager = model(**inputs, exit_policy=policy, exit_threshold=threshold, output_step_logits=True)
    out = runner(exit_policy=policy, exit_threshold=threshold, **{k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_array_equal(out.exit_steps, eager.exit_steps.numpy())
    np.testing.assert_allclose(out.logits, eager.logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.halting_probs, eager.halting_probs.numpy(), rtol=1e-5, atol=1e-5)
    if policy in ("halting", "confidence"):  # samples left early and others went on: the batch shrank on the way
        assert out.exit_steps.min() < out.exit_steps.max()
    if policy == "patience":
        assert out.exit_steps.max() < len(runner.steps)
    single = runner(exit_policy=policy, exit_threshold=threshold, **{k: v[3:4].numpy() for k, v in inputs.items()})
    np.testing.assert_array_equal(single.exit_steps, out.exit_steps[3:4])
    np.testing.assert_allclose(single.logits, out.logits[3:4], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_runner_reads_the_exported_config_setting_and_refuses_bad_ones(exported):
    model, runner, inputs = exported
    arrays = {k: v.numpy() for k, v in inputs.items()}
    with torch.no_grad():
        eager = model(**inputs)
    np.testing.assert_array_equal(runner(**arrays).exit_steps, eager.exit_steps.numpy())
    with pytest.raises(ValueError, match="exit_threshold"):
        runner(exit_policy="halting", exit_threshold=1.5, **arrays)
    with pytest.raises(ValueError, match="inputs must be exactly"):
        runner(**{**arrays, "token_type_ids": arrays[next(iter(arrays))]})


@pytest.mark.slow
def test_full_depth_exports_whole_through_torch_export_and_onnx(tmp_path):
    """The usual route at full depth: the whole model as one graph (exits need `export_steps`)."""
    import onnxruntime

    model = build_model("bert")
    model.config.exit_policy = "none"
    example, inputs = example_and_test_inputs("bert")
    batch = torch.export.Dim("batch")
    shapes = {name: {0: batch, 1: torch.export.Dim.AUTO} for name in example}
    program = torch.export.export(model, (), dict(example), dynamic_shapes=shapes)
    with torch.no_grad():
        eager = model(**inputs)
    torch.testing.assert_close(program.module()(**inputs).logits, eager.logits, rtol=1e-5, atol=1e-5)
    torch.onnx.export(program, (), str(tmp_path / "model.onnx"), dynamo=True, output_names=["logits"])
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    (logits,) = session.run(["logits"], feed)
    np.testing.assert_allclose(logits, eager.logits.numpy(), rtol=1e-5, atol=1e-5)
