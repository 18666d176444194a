import copy
import itertools
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, gpt2_config, spread_halting, token_batch, vary_token_exits

from adnet_hf import EXIT_RULES, ADNetConfig, ADNetForCausalLM, ADNetForSequenceClassification
from adnet_hf.evaluation_adnet import (
    evaluate_batches,
    exit_items,
    perplexity,
    sweep_exits,
    task_metrics,
    token_losses,
)


def test_two_class_accuracy_and_f1():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    # predicted 0, 1, 0, 1 against 0, 1, 1, 1: class 1 has precision 1, recall 2/3
    assert task_metrics(logits, np.array([0, 1, 1, 1])) == {"accuracy": 0.75, "f1": pytest.approx(0.8)}


def test_many_class_accuracy_has_no_f1():
    logits = np.array([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0], [0.0, 4.0, 1.0]])
    assert task_metrics(logits, np.array([2, 1, 1])) == {"accuracy": pytest.approx(2 / 3)}


def test_multi_label_accuracy_needs_every_label_right():
    logits = np.array([[1.0, -1.0, 2.0], [1.0, 1.0, -1.0], [-1.0, -2.0, -3.0], [2.0, 2.0, 2.0]])
    labels = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # rows 0 and 2 are right on every label; rows 1 and 3 miss one label each (10 of 12 labels right): 5 labels
    # present and predicted, 2 predicted but absent, none missed, so micro-F1 = 2 * 5 / (2 * 5 + 2)
    assert task_metrics(logits, labels) == {"accuracy": 0.5, "micro_f1": pytest.approx(10 / 12)}


def test_regression_metrics():
    scores = np.array([[0.1], [0.4], [0.4], [0.9], [0.7]])
    targets = np.array([1.0, 2.0, 3.0, 5.0, 4.0])
    metrics = task_metrics(scores, targets)
    assert metrics["pearson"] == pytest.approx(np.corrcoef(scores[:, 0], targets)[0, 1])
    # ranks of the scores: 1, 2.5, 2.5, 5, 4 (the tie shares its average rank) against 1, 2, 3, 5, 4
    assert metrics["spearman"] == pytest.approx(np.corrcoef([1, 2.5, 2.5, 5, 4], [1, 2, 3, 5, 4])[0, 1])
    assert metrics["mse"] == pytest.approx((0.81 + 2.56 + 6.76 + 16.81 + 10.89) / 5)


def reference_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What the `evaluate` module that `task_metrics` replaced computed: scikit-learn's and scipy's functions."""
    metrics, stats = pytest.importorskip("sklearn.metrics"), pytest.importorskip("scipy.stats")
    if logits.shape[-1] == 1:
        predictions, references = logits.reshape(-1).astype(np.float64), labels.reshape(-1).astype(np.float64)
        return {
            "pearson": stats.pearsonr(predictions, references)[0],
            "spearman": stats.spearmanr(predictions, references)[0],
            "mse": metrics.mean_squared_error(references, predictions),
        }
    if labels.ndim == logits.ndim:
        predictions, references = (logits > 0).astype(np.int64), (labels > 0.5).astype(np.int64)
        return {
            "accuracy": metrics.accuracy_score(references, predictions),
            "micro_f1": metrics.f1_score(references, predictions, average="micro", zero_division=1.0),
        }
    predictions = logits.argmax(-1)
    expected = {"accuracy": metrics.accuracy_score(labels, predictions)}
    if logits.shape[-1] == 2:
        expected["f1"] = metrics.f1_score(labels, predictions, pos_label=1, average="binary")
    return expected


def classes_at_rate(rng, samples: int, rate: float, num_classes: int) -> np.ndarray:
    """Class 1 at `rate`, the other classes uniformly otherwise."""
    others = rng.choice([c for c in range(num_classes) if c != 1], samples)
    return np.where(rng.random(samples) < rate, 1, others)


def classification_cases(rng, num_classes: int):
    """(logits, labels) with class 1 predicted and present at rates 0 (F1's zero division), 0.3 and 1 (constant
    predictions or labels)."""
    for samples, predicted, present in itertools.product((1, 2, 9, 200), (0.0, 0.3, 1.0), (0.0, 0.3, 1.0)):
        predictions = classes_at_rate(rng, samples, predicted, num_classes)
        logits = rng.normal(size=(samples, num_classes)) + 10 * np.eye(num_classes)[predictions]
        yield logits.astype(np.float32), classes_at_rate(rng, samples, present, num_classes)


def multi_label_cases(rng):
    """(logits, labels) of three labels, each predicted (logit > 0) and present (label > 0.5; 0.5 itself is absent)
    at rates 0 (nothing predicted or present anywhere: micro-F1's zero division), 0.3 and 1."""
    for samples, predicted, present in itertools.product((1, 2, 9, 200), (0.0, 0.3, 1.0), (0.0, 0.3, 1.0)):
        shape = (samples, 3)
        logits = np.where(rng.random(shape) < predicted, 1, -1) * rng.uniform(0.01, 3, shape)
        labels = np.where(rng.random(shape) < present, rng.uniform(0.51, 1, shape), rng.choice([0, 0.2, 0.5], shape))
        yield logits.astype(np.float32), labels.astype(np.float32)


def regression_cases(rng):
    """(scores, targets): continuous, with many ties (Spearman's average ranks), constant on either side (no
    correlation: nan), from two samples on."""
    for samples in (2, 3, 9, 500):
        continuous, tied = rng.normal(size=(2, samples)), rng.integers(0, 3, (2, samples)).astype(np.float64)
        constant = np.full(samples, 0.1 if samples < 9 else 0.9)  # from 3 samples, its mean is not exactly itself
        for scores, targets in [
            continuous,
            tied,
            (tied[0], continuous[1]),
            (constant, continuous[1]),
            (continuous[0], constant),
        ]:
            yield scores[:, None], targets


@pytest.mark.filterwarnings("ignore")  # scikit-learn's and scipy's warnings of zero division and constant inputs
@pytest.mark.parametrize(
    "cases",
    [
        partial(classification_cases, num_classes=2),
        partial(classification_cases, num_classes=3),
        multi_label_cases,
        regression_cases,
    ],
    ids=["two_class", "three_class", "multi_label", "regression"],
)
def test_task_metrics_match_scikit_learn_and_scipy(cases):
    for logits, labels in cases(np.random.default_rng(0)):
        metrics = task_metrics(logits, labels)
        assert metrics == pytest.approx(reference_metrics(logits, labels), rel=1e-12, abs=1e-12, nan_ok=True)
        assert all(type(value) is float for value in metrics.values())


def test_perplexity_is_exp_of_the_shifted_cross_entropy():
    logits = torch.randn(3, 6, VOCAB)
    labels = torch.randint(0, VOCAB, (3, 6))
    labels[1, 4:] = -100
    labels[2, :3] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    # 15 predicted tokens (labels 1-5 of each row), 4 of them ignored: row 1's labels 4, 5 and row 2's labels 1, 2
    assert token_losses(logits, labels).shape == (15 - 4,)
    assert perplexity(token_losses(logits, labels)) == pytest.approx(math.exp(expected.item()), rel=1e-5)


def test_causal_lm_exit_statistics_count_predicted_tokens():
    exit_steps = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 0]])
    labels = torch.tensor([[5, 6, -100, 8], [5, 6, 7, -100]])
    # position t predicts label t + 1: kept are (0, 0), (0, 2), (1, 0), (1, 1)
    items = exit_items({"exit_steps": exit_steps, "executed_layers": 2 * exit_steps}, labels)
    assert items["exit_steps"].tolist() == [1, 3, 4, 3] and items["executed_layers"].tolist() == [2, 6, 8, 6]
    without_labels = exit_items({"exit_steps": exit_steps, "executed_layers": exit_steps}, None)
    assert without_labels["exit_steps"].tolist() == [1, 2, 3, 4, 4, 3, 2]


CLASSIFIER_SETTINGS = [("none", None), ("halting", 0.3), ("halting", 0.7), ("confidence", 0.5), ("patience", 1)]
REGRESSION_SETTINGS = [("none", None), ("halting", 0.3), ("halting", 0.7)]


def adnet_classifier(num_labels):
    """4 steps of 2 GPT-2 blocks, with halting spread so that the settings exit at different steps."""
    config = ADNetConfig(
        backbone_config=gpt2_config(n_layer=8),
        num_labels=num_labels,
        unit_hidden_size=8,
        num_fixed_steps=0,
        layers_per_step=2,
        classifier_dropout=0.0,
    )
    model = ADNetForSequenceClassification(config).eval()
    spread_halting(model, scale=5.0)
    return model


def labelled_batches(num_labels, count=3):
    batches = []
    for _ in range(count):
        ids, mask = token_batch(batch=8, pad_lengths=(0, 2, 0, 3, 1, 0, 4, 0))
        labels = torch.randn(8) if num_labels == 1 else torch.randint(0, num_labels, (8,))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@torch.no_grad()
def configured_forwards(model, batches, policy, threshold):
    """Logits and exit steps over `batches` of a copy of `model` whose config holds the setting."""
    configured = copy.deepcopy(model)
    if threshold is not None:
        setattr(configured.config, EXIT_RULES[policy].config_field, threshold)
    outputs = [
        configured(input_ids=b["input_ids"], attention_mask=b["attention_mask"], exit_policy=policy) for b in batches
    ]
    return torch.cat([out.logits for out in outputs]), torch.cat([out.exit_steps for out in outputs]).double()


@pytest.mark.parametrize(
    "num_labels,settings", [(2, CLASSIFIER_SETTINGS), (1, REGRESSION_SETTINGS)], ids=["classification", "regression"]
)
def test_sweep_matches_forward_calls_with_the_setting_in_the_config(num_labels, settings):
    model = adnet_classifier(num_labels)
    batches = labelled_batches(num_labels)
    labels = torch.cat([b["labels"] for b in batches]).numpy()
    records = sweep_exits(model, batches, settings)
    for (policy, threshold), record in zip(settings, records):
        logits, steps = configured_forwards(model, batches, policy, threshold)
        if num_labels == 1:
            scores = logits[:, 0].double().numpy()
            expected = {"pearson": np.corrcoef(scores, labels)[0, 1], "mse": np.mean((scores - labels) ** 2)}
        else:
            expected = {"accuracy": np.mean(logits.argmax(-1).numpy() == labels)}
        expected |= {"exit_steps": steps.mean().item(), "executed_layers": 2 * steps.mean().item()}
        assert record["exit_policy"] == policy and record["exit_threshold"] == threshold
        assert {name: record[name] for name in expected} == pytest.approx(expected)
    assert records[0]["exit_steps"] == model.config.num_steps
    assert len({record["exit_steps"] for record in records}) >= 3  # the thresholds did change the exits


def test_sweep_leaves_the_config_unchanged():
    model = adnet_classifier(2)
    before = model.config.to_dict()
    sweep_exits(model, labelled_batches(2, count=1), CLASSIFIER_SETTINGS)
    assert model.config.to_dict() == before


def test_causal_lm_sweep_matches_the_model_loss():
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(), unit_hidden_size=8, num_fixed_steps=0))
    vary_token_exits(model)
    ids, mask = token_batch(batch=4, length=8, pad_lengths=(0, 3, 0, 1))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    records = {}
    for policy, threshold in (("none", None), ("halting", 0.6), ("halting", 0.8)):
        record = evaluate_batches(model.eval(), [batch], policy, threshold)
        with torch.no_grad():
            out = model(**batch, exit_policy=policy, exit_threshold=threshold)
        assert record["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-5)
        predicting = out.exit_steps[:, :-1][mask[:, 1:] == 1].double()
        assert record["exit_steps"] == pytest.approx(predicting.mean().item())
        records[threshold] = record
    assert len({record["perplexity"] for record in records.values()}) == 3
    assert 1 < records[0.6]["exit_steps"] < records[None]["exit_steps"]
