"""`fit_halting`: the evidence-reading halting units fitted to the trained model's settling steps."""

import json

import pytest
import torch
from conftest import seq_model, token_batch

from adnet_hf.halting_adnet import fit_halting
from adnet_hf.losses_adnet import settled_steps
from examples import fit_halting as fit_halting_script


def batches_of(count: int = 4) -> list[dict]:
    return [
        dict(zip(("input_ids", "attention_mask"), token_batch(batch=8, length=9, pad_lengths=(0, 3) * 4)))
        for _ in range(count)
    ]


@torch.no_grad()
def full_depth(model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outputs = [model(**batch, exit_policy="none", output_step_logits=True) for batch in batches]
    return (
        torch.cat([out.logits for out in outputs]),
        torch.cat([out.step_logits for out in outputs], dim=1),
        torch.cat([out.halting_probs for out in outputs]),
    )


def survival_nll(step_logits: torch.Tensor, halting_probs: torch.Tensor) -> torch.Tensor:
    """GPSL's `settled` halting term: -log of the halting probability at each sample's first settled step, summed
    over the samples (the fit's per-step means weighted by the rows they read add up to it)."""
    settled = settled_steps(step_logits, "single_label_classification").float().argmax(-1)
    return -halting_probs.gather(1, settled[:, None]).log().sum()


def settled_by_loss(step_logits: torch.Tensor, halting_probs: torch.Tensor) -> torch.Tensor:
    """At every step but the last, the log loss of the halted mass so far against "settled by this step", each a
    mean over the samples, summed over the steps."""
    settled = settled_steps(step_logits, "single_label_classification").float()[:, :-1]
    halted = halting_probs.cumsum(-1)[:, :-1].clamp(1e-7, 1 - 1e-7)
    return torch.nn.functional.binary_cross_entropy(halted, settled, reduction="none").mean(0).sum()


@pytest.mark.parametrize("objective, engine_loss", [("survival", survival_nll), ("settled_by", settled_by_loss)])
def test_fit_lowers_the_engines_loss_by_what_it_reports_and_leaves_predictions_unchanged(objective, engine_loss):
    model = seq_model(num_fixed_steps=0).eval()
    batches = batches_of()
    logits, step_logits, halting_probs = full_depth(model, batches)
    before = engine_loss(step_logits, halting_probs)
    fit = fit_halting(model, batches, objective=objective)
    logits_after, step_logits_after, halting_after = full_depth(model, batches)
    torch.testing.assert_close(logits_after, logits)
    torch.testing.assert_close(step_logits_after, step_logits)
    after = engine_loss(step_logits, halting_after)
    assert after < before - 0.05
    # the losses the fit reports are the engine's (same evidence, same halting mass)
    weights = [step["rows"] if objective == "survival" else 1 for step in fit.steps]
    reported = sum(weight * step["loss"][1] for weight, step in zip(weights, fit.steps) if step["loss"])
    assert fit.samples == len(logits)
    torch.testing.assert_close(after, torch.tensor(reported), rtol=1e-4, atol=1e-4)
    assert all(unit.halting.weight.abs().sum() == 0 for unit in model.base_model.units[:-1])


def test_fit_refuses_units_without_evidence_regressors_and_unknown_objectives():
    with pytest.raises(ValueError, match="objective must be one of"):
        fit_halting(seq_model(), batches_of(1), objective="hazard")
    with pytest.raises(ValueError, match="halting_evidence=True"):
        fit_halting(seq_model(halting_evidence=False), batches_of(1))
    with pytest.raises(ValueError, match="needs a classifier"):
        fit_halting(seq_model(problem_type="regression"), batches_of(1))


def test_script_saves_the_fitted_model_and_its_report(tiny_checkpoint):
    out = tiny_checkpoint / "fitted"
    report = fit_halting_script.main(
        [
            "--model",
            str(tiny_checkpoint / "model"),
            "--data",
            str(tiny_checkpoint / "dev.tsv"),
            "--output_dir",
            str(out),
        ]
    )
    assert json.loads((out / "halting_fit.json").read_text()) == report
    assert report["samples"] == 12 and report["command"].startswith("python examples/fit_halting.py --model")
    saved = fit_halting_script.AutoModelForSequenceClassification.from_pretrained(out)
    assert all(unit.halting.weight.abs().sum() == 0 for unit in saved.base_model.units[:-1])
    assert (
        fit_halting_script.AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"]
        == fit_halting_script.AutoTokenizer.from_pretrained(tiny_checkpoint / "model")("w1 w2")["input_ids"]
    )
