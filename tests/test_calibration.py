import json
from fractions import Fraction
from math import comb

import numpy as np
import pytest
import torch
from conftest import VOCAB, bert_config, gpt2_config, spread_halting, token_batch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adnet_hf import ADNetConfig, ADNetForCausalLM, ADNetForSequenceClassification, PatienceExit
from adnet_hf.calibration_adnet import RISK_CONTROL_METHOD, binomial_cdf, calibrate_exit, certify, evaluate_exits
from adnet_hf.evaluation_adnet import sample_errors, sweep_exits


def classification_batches(count=4):
    batches = []
    for _ in range(count):
        ids, mask = token_batch(batch=8, pad_lengths=(0, 2, 0, 3, 1, 0, 4, 0))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] > VOCAB // 2).long()})
    return batches


@pytest.fixture(scope="module")
def trained():
    """A tiny classifier trained on its batches, so that full depth beats chance and exits can cost accuracy."""
    torch.manual_seed(0)
    config = ADNetConfig(
        backbone_config=bert_config(), num_labels=2, unit_hidden_size=8, num_fixed_steps=0, classifier_dropout=0.0
    )
    model = ADNetForSequenceClassification(config)
    batches = classification_batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.state_dict(), config, batches


@pytest.mark.parametrize(
    "policy,budget", [("halting", 0.0), ("halting", 0.1), ("confidence", 0.05), ("patience", 0.05)]
)
def test_stored_setting_meets_the_budget_on_its_data(trained, policy, budget, tmp_path):
    state, config, batches = trained
    model = ADNetForSequenceClassification(ADNetConfig.from_dict(config.to_dict()))
    model.load_state_dict(state)
    result = calibrate_exit(model, batches, policy=policy, budget=budget)
    assert len(result.candidates) > 0
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config.exit_policy == result.policy
    full_accuracy, full_layers = evaluate_exits(reloaded, batches, "none")
    accuracy, layers = evaluate_exits(reloaded, batches, reloaded.config.exit_policy)
    assert full_accuracy > 0.75 and accuracy >= full_accuracy - budget
    assert layers == pytest.approx(result.executed_layers) and layers <= full_layers
    admissible = [c for c in result.candidates if c["within_budget"]]
    cheapest = min((c["executed_layers"] for c in admissible), default=full_layers)
    assert layers == pytest.approx(min(cheapest, full_layers))  # the cheapest admissible setting, or full depth


def test_causal_lm_calibration_keeps_perplexity_within_budget(tmp_path):
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(), unit_hidden_size=8, num_fixed_steps=0))
    spread_halting(model, scale=5.0)
    batches = []
    for _ in range(2):
        ids, mask = token_batch(batch=4, length=8, pad_lengths=(0, 3, 0, 1))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    result = calibrate_exit(model, batches, policy="halting", budget=0.03)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    full_perplexity, _ = evaluate_exits(reloaded, batches, "none")
    perplexity, layers = evaluate_exits(reloaded, batches, reloaded.config.exit_policy)
    assert perplexity <= full_perplexity * 1.03
    assert result.full_depth_quality == pytest.approx(full_perplexity)


def test_unknown_policy_is_rejected():
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    with pytest.raises(ValueError, match="policy must be one of"):
        calibrate_exit(model, classification_batches(1), policy="none")


def test_candidates_are_passed_per_call_not_through_the_config(trained):
    state, config, batches = trained
    model = ADNetForSequenceClassification(ADNetConfig.from_dict(config.to_dict()))
    model.load_state_dict(state)
    original = model.config.halting_epsilon
    calls = []

    def record(module, args, kwargs):
        calls.append((module.config.halting_epsilon, kwargs["exit_policy"], kwargs["exit_threshold"]))

    model.register_forward_pre_hook(record, with_kwargs=True)
    calibrate_exit(model, batches, policy="halting", budget=0.1, candidates=[0.2, 0.5])
    assert {epsilon for epsilon, _, _ in calls} == {original}
    assert {(policy, threshold) for _, policy, threshold in calls} == {
        ("none", None),
        ("halting", 0.2),
        ("halting", 0.5),
    }


def test_candidates_come_from_the_rule_and_bad_ones_are_refused():
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    result = calibrate_exit(model, classification_batches(1), policy="patience")
    assert [c["patience"] for c in result.candidates] == PatienceExit.candidates(model.config.num_variable_steps)
    chosen = model.config.to_dict()
    with pytest.raises(ValueError, match="calibrate_exit candidate for halting_epsilon must be a number in"):
        calibrate_exit(model, classification_batches(1), policy="halting", candidates=[0.2, 1.5])
    assert model.config.to_dict() == chosen  # refused before anything was measured or written


def task_batches(kind: str, count: int = 2) -> list[dict]:
    """Batches of a regression (scores) or multi-label (three 0/1 labels) task."""
    batches = []
    for _ in range(count):
        ids, mask = token_batch(batch=8, pad_lengths=(0, 2, 0, 3, 1, 0, 4, 0))
        labels = ids[:, 0].float() / VOCAB if kind == "regression" else (ids[:, :3] > VOCAB // 2).float()
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def task_model(kind: str) -> ADNetForSequenceClassification:
    num_labels, problem_type = (1, "regression") if kind == "regression" else (3, "multi_label_classification")
    model = ADNetForSequenceClassification(
        ADNetConfig(
            backbone_config=bert_config(),
            unit_hidden_size=8,
            num_fixed_steps=0,
            num_labels=num_labels,
            problem_type=problem_type,
        )
    )
    spread_halting(model)
    return model


@pytest.mark.parametrize(
    "kind,metric,lower_is_better", [("regression", "mse", True), ("multi_label", "micro_f1", False)]
)
def test_regression_and_multi_label_are_judged_by_their_own_metric(kind, metric, lower_is_better, tmp_path):
    model, batches, budget, grid = task_model(kind), task_batches(kind), 0.02, [0.05, 0.3, 0.6, 0.9]
    result = calibrate_exit(model, batches, policy="halting", budget=budget, candidates=grid)
    assert result.metric == metric
    reference, *records = sweep_exits(model, batches, [("none", None)] + [("halting", value) for value in grid])
    assert result.full_depth_quality == pytest.approx(reference[metric])
    for candidate, record in zip(result.candidates, records):
        quality, full = record[metric], reference[metric]
        allowed = quality <= full * (1 + budget) if lower_is_better else quality >= full - budget
        assert candidate["quality"] == pytest.approx(quality) and candidate["within_budget"] == allowed
    admissible = [c["executed_layers"] for c in result.candidates if c["within_budget"]]
    assert result.executed_layers == pytest.approx(min(admissible + [reference["executed_layers"]]))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    quality, layers = evaluate_exits(reloaded, batches, reloaded.config.exit_policy)
    assert quality == pytest.approx(result.quality) and layers == pytest.approx(result.executed_layers)


@pytest.mark.parametrize("policy", ["confidence", "patience"])
def test_regression_refuses_prediction_based_policies_before_measuring(policy):
    model = task_model("regression")
    before = model.config.to_dict()
    with pytest.raises(ValueError, match=rf"policy='{policy}' needs class predictions.*\('halting', 'none'\)"):
        calibrate_exit(model, task_batches("regression"), policy=policy)
    assert model.config.to_dict() == before


def test_empty_data_is_a_clear_error_and_changes_nothing():
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="No item to evaluate: the batches are empty"):
        calibrate_exit(model, iter([]), policy="halting")
    assert model.config.to_dict() == before


@pytest.mark.parametrize(
    "candidates,match",
    [
        ([], "candidates must be None"),
        ([0.2, float("nan")], "candidate for halting_epsilon must be"),
        ([0.2, True], "candidate for halting_epsilon must be"),
    ],
)
def test_bad_candidates_are_refused_before_anything_is_written(candidates, match):
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    before = model.config.to_dict()
    with pytest.raises(ValueError, match=match):
        calibrate_exit(model, classification_batches(1), policy="halting", candidates=candidates)
    assert model.config.to_dict() == before


def nested_exit_errors(rng, samples: int, loss_rates: list[float], full_error_rate: float = 0.1):
    """Synthetic outcomes with known accuracy drops: full depth is wrong with `full_error_rate`; each candidate is
    wrong wherever full depth is, and where it is right with the candidate's rate (exits nested as real ones are, one
    uniform per sample), so its accuracy drop is exactly its `loss_rates` entry."""
    full = rng.random(samples) < full_error_rate
    uniform = rng.random(samples)
    exits = np.stack([full | (uniform < rate / (1 - full_error_rate)) for rate in loss_rates])
    return exits, full


def test_certified_settings_keep_their_budget_with_probability_one_minus_delta():
    """2,000 calibration samples of 300 drawn with known error rates: a candidate 0.1 point over the budget is
    certified in at most delta of them (measured: 5.1%; the empirical choice takes it in 45%), one well within it in
    most (81%)."""
    rng = np.random.default_rng(0)
    rates, budget, delta = [0.0, 0.005, 0.021, 0.05], 0.02, 0.1
    certified, empirical = [], []
    for _ in range(2000):
        exits, full = nested_exit_errors(rng, 300, rates)
        certified.append(certify(exits, full, budget, delta)[1])
        empirical.append((exits.mean(-1) - full.mean()) <= budget)
    certified, empirical = np.array(certified), np.array(empirical)
    violates = np.array(rates) > budget
    assert (certified & violates).any(-1).mean() <= delta
    assert (empirical & violates).any(-1).mean() > 0.3  # what the guarantee protects against
    assert certified[:, 1].mean() > 0.7 and certified[:, 0].all()


def exact_binomial_cdf(count: int, n: int, p: float) -> float:
    """`P(Binomial(n, p) <= count)` in exact rational arithmetic (of the float `p`), rounded once at the end."""
    a, b = p.as_integer_ratio()
    return float(Fraction(sum(comb(n, i) * a**i * (b - a) ** (n - i) for i in range(count + 1)), b**n))


@pytest.mark.parametrize("p", [0.0, 1e-4, 0.01, 0.3, 1.0])
def test_binomial_cdf_matches_scipy(p):
    """Every count of n samples, n up to 2,000, within 1e-10 relative (measured: 2.4e-12) where scipy's CDF is
    >= 1e-200; below, scipy's own tail loses precision (off by 30% at 6.3e-244, see the next test)."""
    binom = pytest.importorskip("scipy.stats").binom
    for n in [*range(1, 41), 99, 300, 1000, 1999, 2000]:
        counts = np.arange(n + 1)
        ours, reference = binomial_cdf(counts, n, p), binom.cdf(counts, n, p)
        kept = reference >= 1e-200
        np.testing.assert_allclose(ours[kept], reference[kept], rtol=1e-10, atol=0)
        assert (ours[~kept] < 1e-200).all()


def test_binomial_cdf_is_exact_at_the_edges_and_far_in_the_tail():
    for n in (1, 2, 2000):
        counts = np.arange(n + 1)
        assert (binomial_cdf(counts, n, 0.0) == 1).all()
        assert binomial_cdf(counts, n, 1.0).tolist() == [0.0] * n + [1.0]
    for count, n, p in [(38, 2000, 0.3), (5, 300, 0.3), (3, 2000, 1e-4), (60, 2000, 0.02)]:
        assert binomial_cdf(np.array([count]), n, p)[0] == pytest.approx(exact_binomial_cdf(count, n, p), rel=1e-11)


def test_fixed_sequence_stops_at_the_first_candidate_it_cannot_certify():
    full = np.zeros(400, dtype=bool)
    exits = np.stack([full, np.arange(400) < 40, full])  # the middle candidate loses 10 points
    p_values, certified = certify(exits, full, budget=0.02, delta=0.1)
    assert certified.tolist() == [True, False, False]  # the third, perfect on its own, comes after a failure
    assert p_values == pytest.approx([exact_binomial_cdf(count, 400, 0.02) for count in (0, 40, 0)], rel=1e-10)


def test_risk_controlled_choice_is_certified_and_stored_with_its_guarantee(trained, tmp_path):
    state, config, batches = trained
    model = ADNetForSequenceClassification(ADNetConfig.from_dict(config.to_dict()))
    model.load_state_dict(state)
    result = calibrate_exit(model, batches, policy="halting", budget=0.1, delta=0.1)
    full, *records = sweep_exits(
        model,
        batches,
        [("none", None)] + [("halting", c["halting_epsilon"]) for c in result.candidates],
        return_items=True,
    )
    full_errors = sample_errors(full["items"])
    for candidate, record in zip(result.candidates, records):
        losses = int((sample_errors(record["items"]) & ~full_errors).sum())
        assert candidate["p_value"] == pytest.approx(exact_binomial_cdf(losses, 32, 0.1), rel=1e-10)
    flags = [c["certified"] for c in result.candidates]
    assert flags == sorted(flags, reverse=True) and any(flags)  # a prefix of the grid, not empty here
    chosen = min((c for c in result.candidates if c["certified"]), key=lambda c: c["executed_layers"])
    assert (result.policy, result.value) == ("halting", chosen["halting_epsilon"])
    expected = {
        "policy": "halting",
        "value": result.value,
        "metric": "accuracy",
        "budget": 0.1,
        "delta": 0.1,
        "calibration_size": 32,
        "method": RISK_CONTROL_METHOD,
    }
    assert result.guarantee == expected
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config.exit_guarantee == expected and reloaded.config.halting_epsilon == result.value
    calibrate_exit(model, batches, policy="halting", budget=0.1)  # an empirical choice carries no guarantee
    assert model.config.exit_guarantee is None


def test_too_few_samples_certify_nothing_and_keep_full_depth(trained):
    """On 8 samples even a setting that loses nothing cannot be certified at 5 points (0.95^8 = 0.66 > delta)."""
    state, config, batches = trained
    model = ADNetForSequenceClassification(ADNetConfig.from_dict(config.to_dict()))
    model.load_state_dict(state)
    result = calibrate_exit(model, batches[:1], policy="confidence", budget=0.05, delta=0.1)
    assert not any(c["certified"] for c in result.candidates)
    assert min(c["p_value"] for c in result.candidates) == pytest.approx(0.95**8)
    assert model.config.exit_policy == "none" and result.executed_layers == config.num_blocks
    assert model.config.exit_guarantee == {**result.guarantee, "policy": "none", "value": None, "calibration_size": 8}


def test_checkpoint_saved_before_the_guarantee_field_loads_without_one(tmp_path):
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("exit_guarantee", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path).config.exit_guarantee is None


@pytest.mark.parametrize("delta", [0, 1, 1.5, float("nan"), True, "0.1"])
def test_bad_delta_is_refused_before_anything_is_measured(delta):
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    before = model.config.to_dict()
    with pytest.raises(ValueError, match=r"delta must be None \(the empirical choice, no guarantee\) or a number in"):
        calibrate_exit(model, iter([]), delta=delta)
    assert model.config.to_dict() == before


@pytest.mark.parametrize("kind,task", [("regression", "a regressor"), ("multi_label", "a multi-label classifier")])
def test_tasks_without_a_valid_bound_refuse_delta(kind, task):
    model = task_model(kind)
    before = model.config.to_dict()
    with pytest.raises(
        ValueError,
        match=f"delta=0.1: risk control bounds a single-label classifier's accuracy drop, and this model is {task}",
    ):
        calibrate_exit(model, task_batches(kind), policy="halting", budget=0.01, delta=0.1)
    assert model.config.to_dict() == before


def test_causal_lm_and_budgets_over_one_refuse_delta():
    lm = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(), unit_hidden_size=8))
    with pytest.raises(ValueError, match="this model is a causal LM"):
        calibrate_exit(lm, iter([]), delta=0.1)
    classifier = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    with pytest.raises(ValueError, match=r"budget must be an accuracy drop in \[0, 1\] with delta"):
        calibrate_exit(classifier, iter([]), budget=1.5, delta=0.1)


def test_delta_refuses_multi_label_labels_on_a_config_without_a_problem_type():
    """A classifier whose problem type is only inferred from its labels (Transformers' way) is caught by its items."""
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8, num_labels=3))
    with pytest.raises(ValueError, match=r"delta needs a single-label classifier's labels: sample_errors needs"):
        calibrate_exit(model, task_batches("multi_label", 1), policy="halting", budget=0.05, delta=0.1)
    assert model.config.exit_policy == "halting" and model.config.exit_guarantee is None
