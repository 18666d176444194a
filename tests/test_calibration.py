import pytest
import torch
from conftest import VOCAB, bert_config, gpt2_config, spread_halting, token_batch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adnet_hf import ADNetConfig, ADNetForCausalLM, ADNetForSequenceClassification, PatienceExit
from adnet_hf.calibration_adnet import calibrate_exit, evaluate_exits


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
    config = ADNetConfig(backbone_config=bert_config(), num_labels=2, unit_hidden_size=8, num_fixed_steps=0,
                         classifier_dropout=0.0)
    model = ADNetForSequenceClassification(config)
    batches = classification_batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.state_dict(), config, batches


@pytest.mark.parametrize("policy,budget", [("halting", 0.0), ("halting", 0.1), ("confidence", 0.05),
                                           ("patience", 0.05)])
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
    assert {(policy, threshold) for _, policy, threshold in calls} == {("none", None), ("halting", 0.2),
                                                                       ("halting", 0.5)}


def test_candidates_come_from_the_rule_and_bad_ones_are_refused():
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8))
    result = calibrate_exit(model, classification_batches(1), policy="patience")
    assert [c["patience"] for c in result.candidates] == PatienceExit.candidates(model.config.num_variable_steps)
    chosen = model.config.to_dict()
    with pytest.raises(ValueError, match="calibrate_exit candidate for halting_epsilon must be a number in"):
        calibrate_exit(model, classification_batches(1), policy="halting", candidates=[0.2, 1.5])
    assert model.config.to_dict() == chosen  # refused before anything was measured or written
