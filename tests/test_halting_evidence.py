"""Halting units that read the step prediction's evidence, and GPSL's `settled` plateau target that trains them."""

import json
import math

import pytest
import torch
from conftest import lm_model, seq_model, spread_halting, token_batch

from adnet_hf import ADNetForSequenceClassification, ADNetModel, GrowingPlateauSensitiveLoss
from adnet_hf.exits_adnet import HaltingDistribution
from adnet_hf.losses_adnet import settled_steps
from adnet_hf.units_adnet import EVIDENCE_FEATURES, CalculationUnit, step_evidence


def set_evidence_weights(model, scale: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in model.base_model.units[:-1]:
            unit.evidence.weight.copy_(torch.randn(unit.evidence.weight.shape, generator=generator) * scale)


def test_step_evidence_of_a_known_prediction():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    evidence = step_evidence(
        logits,
        previous=torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
        not_halted=torch.tensor([0.5, 1.0]),
        problem_type="single_label_classification",
    )
    assert evidence.shape == (2, len(EVIDENCE_FEATURES))
    confidence_logit, margin, certainty, agreement, log_not_halted = evidence.unbind(-1)
    torch.testing.assert_close(confidence_logit, torch.tensor([2.0, 0.0]))  # log-odds of sigmoid(2), of 1/2
    torch.testing.assert_close(margin, torch.tensor([2.0, 0.0]))
    p = torch.sigmoid(torch.tensor(2.0))
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    torch.testing.assert_close(certainty, torch.stack([1 - entropy / math.log(2), torch.tensor(0.0)]))
    torch.testing.assert_close(agreement, torch.tensor([1.0, 1.0]))  # argmax of [0, 0] is class 0, as before
    torch.testing.assert_close(log_not_halted, torch.tensor([math.log(0.5), 0.0]))
    first = step_evidence(logits, None, 1.0, "single_label_classification")
    assert (first[:, 3] == 0).all(), "no agreement without a previous step"
    saturated = step_evidence(torch.tensor([[1e4, -1e4]]), None, 0.0, "single_label_classification")
    assert torch.isfinite(saturated).all()
    multi = step_evidence(torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, -2.0]]), 1.0, "multi_label_classification")
    assert multi[0, 1] == 1.0 and multi[0, 3] == 1.0  # smallest |logit|; every label's sign unchanged
    regression = step_evidence(torch.tensor([[2.5]]), torch.tensor([[2.0]]), 1.0, "regression")
    torch.testing.assert_close(regression[0, :3], torch.tensor([-0.5, 2.5, 1.0]))


def test_the_halting_probabilities_follow_the_evidence_and_not_without_it():
    model = seq_model(num_fixed_steps=0).eval()
    assert model.config.halting_evidence and all(unit.reads_evidence for unit in model.adnet.units[:-1])
    assert all(torch.equal(unit.evidence.weight, torch.tensor([[1.0, 0, 0, 0, 0]])) for unit in model.adnet.units[:-1])
    ids, mask = token_batch()
    with torch.no_grad():
        untrained = model(input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True).halting_probs
        set_evidence_weights(model, 1.0)
        reading = model(input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True).halting_probs
    assert (untrained - reading).abs().max() > 1e-3
    with pytest.raises(ValueError, match="reads the step prediction's evidence"):
        model.adnet.units[0].halt(torch.zeros(1, 16), torch.zeros(1, 1, 32))


def test_batched_equals_one_by_one_when_the_units_read_the_evidence():
    """The evidence carries each sample's previous prediction and halting mass: it must follow the samples that stay
    in the batch."""
    model = seq_model(num_fixed_steps=0).eval()
    spread_halting(model, scale=0.0)
    set_evidence_weights(model, 3.0)
    model.step_head = lambda n, summary, hidden: summary[:, 5:8] * 30.0 * (1 + n)
    ids, mask = token_batch(batch=6, pad_lengths=(0, 2, 0, 3, 1, 4))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True)
        ordered = full.halting_probs[:, 0].sort().values
        model.config.halting_epsilon = float(1 - (ordered[2] + ordered[3]) / 2)
        batched = model(input_ids=ids, attention_mask=mask, exit_policy="halting")
        for row in range(6):
            single = model(input_ids=ids[row : row + 1, : int(mask[row].sum())], exit_policy="halting")
            assert single.exit_steps.item() == batched.exit_steps[row].item()
            torch.testing.assert_close(single.halting_probs[0], batched.halting_probs[row], rtol=1e-4, atol=1e-5)
    assert len(set(batched.exit_steps.tolist())) > 1, "every sample exited at the same step"


def test_settled_steps_and_the_settled_plateau_target():
    # 3 steps x 3 rows x 2 classes: row 0 settles at step 0, row 1 at step 2 (flips back), row 2 at step 1
    step_logits = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
            [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
            [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
        ]
    )
    settled = settled_steps(step_logits, "single_label_classification")
    assert settled.tolist() == [[True, True, True], [False, False, True], [False, True, True]]
    step_losses = torch.rand(3, 3)
    halting = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], requires_grad=True)
    loss_fn = GrowingPlateauSensitiveLoss(plateau="settled")
    rows = loss_fn.row_losses(step_losses, halting, settled)
    growing = (loss_fn.growth_weights(3, step_losses) * step_losses).sum(-1)
    first = torch.tensor([0, 2, 1])
    expected = (halting * step_losses).sum(-1) + 0.3 * growing - 0.1 * halting[torch.arange(3), first].log()
    torch.testing.assert_close(rows, expected)
    rows.sum().backward()  # the units learn from the plateau term alone: -0.1 / p_first at the first settled step
    target = torch.zeros(3, 3)
    target[torch.arange(3), first] = -0.1 / halting.detach()[torch.arange(3), first]
    torch.testing.assert_close(halting.grad, target)
    torch.testing.assert_close(
        loss_fn.row_losses(step_losses, halting),
        GrowingPlateauSensitiveLoss().row_losses(step_losses, halting),
        msg="without the settled steps, the paper's plateau",
    )
    with pytest.raises(ValueError, match="plateau must be one of"):
        GrowingPlateauSensitiveLoss(plateau="Settled")


def settling_task(samples: int = 512, steps: int = 3, seed: int = 0):
    """Step logits of a 3-class task whose prediction settles at a random step per sample: before it, another class
    with a small margin; from it on, the final class with a large one. The unit summaries are noise."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, steps, (samples,), generator=generator)
    final = torch.randint(0, 3, (samples,), generator=generator)
    logits = torch.zeros(steps, samples, 3)
    for n in range(steps):
        settled = n >= first
        shown = torch.where(settled, final, (final + 1 + n % 2) % 3)
        margin = torch.where(settled, 4.0, 0.5) + torch.rand(samples, generator=generator)
        logits[n, torch.arange(samples), shown] = margin
    return logits, torch.rand(steps, samples, 16, generator=generator), first


def halting_of(units, logits, summaries) -> torch.Tensor:
    """Samples x steps halting distribution of `units` (the last step takes the remainder)."""
    distribution, probs = HaltingDistribution(), []
    for n, unit in enumerate(units):
        evidence = (
            step_evidence(
                logits[n], logits[n - 1] if n else None, distribution.not_halted, "single_label_classification"
            )
            if unit.reads_evidence
            else None
        )
        probs.append(distribution.step(unit.halt(summaries[n], summaries[n][:, None], evidence)))
    probs.append(distribution.step(torch.ones(logits.shape[1]), last=True))
    return torch.stack(probs, -1)


def test_units_trained_on_the_evidence_cannot_be_matched_without_it():
    """Units trained by GPSL's settled plateau toward where each prediction settles, once reading the step evidence
    and once blind to it (the summary only): only the first learn the settling, and zeroing their evidence undoes
    their exits."""
    logits, summaries, first = settling_task()
    settled = settled_steps(logits, "single_label_classification")
    assert torch.equal(settled.logical_not().sum(-1), first)
    loss_fn = GrowingPlateauSensitiveLoss(alpha=0.0, plateau="settled")
    trained = {}
    for reads in (True, False):
        torch.manual_seed(0)
        units = torch.nn.ModuleList(CalculationUnit(4, 8, reads_evidence=reads) for _ in range(2))
        if reads:
            for unit in units:
                torch.nn.init.zeros_(unit.evidence.weight)
        optimizer = torch.optim.Adam(units.parameters(), lr=0.05)
        for _ in range(200):
            loss = loss_fn(torch.zeros(len(first), 3), halting_of(units, logits, summaries), settled=settled)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained[reads] = units

    def exit_steps(units) -> torch.Tensor:  # the `halting` rule at epsilon 0.5
        with torch.no_grad():
            return (halting_of(units, logits, summaries).cumsum(-1) >= 0.5).float().argmax(-1)

    reading, blind = (exit_steps(trained[reads]) for reads in (True, False))
    assert (reading == first).float().mean() > 0.95
    assert (blind == first).float().mean() < 0.5
    for unit in trained[True]:
        torch.nn.init.zeros_(unit.evidence.weight)
    assert (exit_steps(trained[True]) == first).float().mean() < 0.5


def test_a_checkpoint_saved_before_the_evidence_loads_as_it_was(tmp_path):
    model = seq_model(halting_evidence=False).eval()
    spread_halting(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["halting_evidence"], config["gpsl_plateau"]  # as saved before the fields existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids, mask = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
        loaded = ADNetForSequenceClassification.from_pretrained(tmp_path).eval()
        assert loaded.config.halting_evidence is False and not loaded.adnet.units[0].reads_evidence
        same = loaded(input_ids=ids, attention_mask=mask)
        # the evidence can be added to it (the prior weights then start where they start in a new model)
        added = ADNetForSequenceClassification.from_pretrained(tmp_path, halting_evidence=True).eval()
        assert added.adnet.units[0].reads_evidence
        assert torch.equal(added.adnet.units[0].evidence.weight, torch.tensor([[1.0, 0, 0, 0, 0]]))
        torch.testing.assert_close(added.adnet.units[0].halting.weight, model.adnet.units[0].halting.weight)
    torch.testing.assert_close(same.logits, expected.logits)
    assert torch.equal(same.exit_steps, expected.exit_steps)


def test_the_base_model_of_a_classifier_with_evidence_units(tmp_path):
    seq_model().save_pretrained(tmp_path)
    base = ADNetModel.from_pretrained(tmp_path).eval()
    ids, mask = token_batch()
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=mask, exit_policy="none")
        assert out.halting_probs is None and out.last_hidden_state.shape[:2] == ids.shape
        assert base(input_ids=ids, attention_mask=mask).exit_steps.tolist() == [4] * 4  # warned, full depth
        with pytest.raises(ValueError, match="needs step predictions \\(these halting units read them\\)"):
            base(input_ids=ids, attention_mask=mask, exit_policy="halting")


def test_causal_lm_units_read_no_evidence():
    assert lm_model().config.halting_evidence is False  # decided when built, so a saved config loads the same
    with pytest.raises(ValueError, match="halting_evidence must be False or None for per-token units"):
        lm_model(halting_evidence=True)
