import math

import pytest
import torch
from conftest import bert_config, token_batch

from adnet_hf import (
    ADNetConfig,
    ADNetForSequenceClassification,
    DeepSupervisionLoss,
    GrowingPlateauSensitiveLoss,
    LastStepLoss,
    PonderNetLoss,
)
from adnet_hf.exits_adnet import halting_distribution
from adnet_hf.losses_adnet import settled_steps

STEP_LOSSES = [[1.0, 0.5, 0.4, 0.39], [0.2, 0.9, 1.3, 0.1]]
HALTING = [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]


def gpsl_by_hand(losses, probs, alpha, beta, cost, tau, rate, midpoint):
    """The design's formula written out with plain Python floats, one row at a time."""
    total = 0.0
    for row_losses, row_probs in zip(losses, probs):
        n_steps = len(row_losses)
        n0 = n_steps / 2 if midpoint is None else midpoint
        growth = [1 / (1 + math.exp(-rate * (n - n0))) for n in range(1, n_steps + 1)]
        weights = [g / sum(growth) for g in growth]
        scores = [math.exp(-(loss + cost * n / n_steps) / tau) for n, loss in enumerate(row_losses, start=1)]
        target = [s / sum(scores) for s in scores]
        expected = sum(p * loss for p, loss in zip(row_probs, row_losses))
        growing = sum(w * loss for w, loss in zip(weights, row_losses))
        kl = sum(q * math.log(q / p) for q, p in zip(target, row_probs))
        total += expected + alpha * growing + beta * kl
    return total / len(losses)


@pytest.mark.parametrize(
    "settings",
    [
        dict(alpha=0.3, beta=0.1, step_cost=0.05, temperature=0.5, growth_rate=1.0, growth_midpoint=None),
        dict(alpha=1.0, beta=0.5, step_cost=0.3, temperature=0.2, growth_rate=2.5, growth_midpoint=1.0),
    ],
)
def test_gpsl_matches_the_formula_by_hand(settings):
    loss = GrowingPlateauSensitiveLoss(**settings)(torch.tensor(STEP_LOSSES), torch.tensor(HALTING))
    expected = gpsl_by_hand(
        STEP_LOSSES,
        HALTING,
        settings["alpha"],
        settings["beta"],
        settings["step_cost"],
        settings["temperature"],
        settings["growth_rate"],
        settings["growth_midpoint"],
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gpsl_plateau_target_ignores_the_loss_gradient():
    losses = torch.tensor(STEP_LOSSES, requires_grad=True)
    halting = torch.tensor(HALTING)
    GrowingPlateauSensitiveLoss(alpha=0.0, beta=1.0)(losses, halting).backward()
    # with alpha=0 only the expected loss differentiates the losses: d/dL_n = p_n / B
    torch.testing.assert_close(losses.grad, halting / 2)


def test_pondernet_loss_by_hand():
    prior, beta = 0.3, 0.2
    geometric = [prior * (1 - prior) ** (n - 1) for n in range(1, 5)]
    geometric = [g / sum(geometric) for g in geometric]
    expected = (
        sum(
            sum(p * loss for p, loss in zip(probs, losses))
            + beta * sum(p * math.log(p / g) for p, g in zip(probs, geometric))
            for losses, probs in zip(STEP_LOSSES, HALTING)
        )
        / 2
    )
    loss = PonderNetLoss(prior=prior, beta=beta)(torch.tensor(STEP_LOSSES), torch.tensor(HALTING))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_deep_supervision_and_last_step_losses_by_hand():
    steps = torch.tensor(STEP_LOSSES)
    expected = sum(sum(n * loss for n, loss in enumerate(row, start=1)) / 10 for row in STEP_LOSSES) / 2
    assert DeepSupervisionLoss()(steps, torch.tensor(HALTING)).item() == pytest.approx(expected)
    assert LastStepLoss()(steps, torch.tensor(HALTING)).item() == pytest.approx((0.39 + 0.1) / 2)


def test_halting_distribution_by_hand():
    lambdas = torch.tensor([[0.2, 0.5, 0.25, 0.9]])
    expected = [0.2, 0.8 * 0.5, 0.8 * 0.5 * 0.25, 0.8 * 0.5 * 0.75]
    torch.testing.assert_close(halting_distribution(lambdas), torch.tensor([expected]))


def model_for(**overrides):
    config = ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8, classifier_dropout=0.0, **overrides)
    return ADNetForSequenceClassification(config)


@pytest.mark.parametrize(
    "loss_type,loss_class",
    [
        ("gpsl", GrowingPlateauSensitiveLoss),
        ("pondernet", PonderNetLoss),
        ("deep_supervision", DeepSupervisionLoss),
        ("last", LastStepLoss),
    ],
)
def test_each_loss_type_is_what_the_model_trains_with(loss_type, loss_class):
    model = model_for(num_labels=3, loss_type=loss_type)
    assert isinstance(model.loss_fn, loss_class)
    ids, mask = token_batch()
    labels = torch.tensor([0, 2, 1, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    step_losses = torch.stack(
        [torch.nn.functional.cross_entropy(logits, labels, reduction="none") for logits in out.step_logits], dim=-1
    )
    settled = settled_steps(out.step_logits, "single_label_classification")
    torch.testing.assert_close(out.loss, model.loss_fn(step_losses, out.halting_probs, settled=settled))
    out.loss.backward()


@pytest.mark.parametrize(
    "num_labels,labels,problem_type",
    [
        (3, torch.tensor([0, 2, 1, 1]), "single_label_classification"),
        (1, torch.tensor([0.5, 1.5, -0.2, 3.0]), "regression"),
        (
            3,
            torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
            "multi_label_classification",
        ),
    ],
)
def test_problem_types_inferred_and_their_step_losses(num_labels, labels, problem_type):
    model = model_for(num_labels=num_labels, loss_type="last")
    ids, mask = token_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert model.config.problem_type == problem_type
    last = out.step_logits[-1]
    if problem_type == "regression":
        expected = torch.nn.functional.mse_loss(last.squeeze(-1), labels)
    elif problem_type == "single_label_classification":
        expected = torch.nn.functional.cross_entropy(last, labels)
    else:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(last, labels)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("policy", ["halting", "none"])
def test_inference_loss_is_the_task_loss_of_the_prediction(policy):
    model = model_for(num_labels=3).eval()
    ids, mask = token_batch()
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, exit_policy=policy)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_causal_lm_loss_from_running_step_losses_matches_the_step_logits():
    from conftest import gpt2_config

    from adnet_hf import ADNetForCausalLM

    config = ADNetConfig(
        backbone_config=gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), unit_hidden_size=8
    )
    model = ADNetForCausalLM(config).train()
    ids, mask = token_batch(batch=2, length=6, pad_lengths=(0, 2))
    labels = ids.masked_fill(mask == 0, -100)
    lean = model(input_ids=ids, attention_mask=mask, labels=labels)
    full = model(input_ids=ids, attention_mask=mask, labels=labels, output_step_logits=True)
    assert lean.step_logits is None and not lean.logits.requires_grad
    targets, keep = labels[:, 1:], labels[:, 1:] != -100
    step_losses = torch.stack(
        [
            torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="none")
            for logits in full.step_logits
        ],
        dim=-1,
    )
    expected = model.loss_fn(step_losses, full.halting_probs[:, :-1][keep])
    torch.testing.assert_close(lean.loss, expected)
    torch.testing.assert_close(full.loss, expected)
    fused = (full.halting_probs.movedim(-1, 0).unsqueeze(-1) * full.step_logits).sum(0)
    real = mask.bool()  # padding tokens have no halting distribution
    torch.testing.assert_close(lean.logits[real], fused.detach()[real])
    torch.testing.assert_close(full.logits[real], fused[real])


def test_training_logits_are_fused_under_the_halting_distribution():
    model = model_for(num_labels=3)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = token_batch()
    out = model(input_ids=ids, attention_mask=mask)
    fused = (out.halting_probs.t().unsqueeze(-1) * out.step_logits).sum(0)
    torch.testing.assert_close(out.logits, fused)
    assert out.logits.requires_grad


LOSS_TYPES = ["gpsl", "pondernet", "deep_supervision", "last"]


def without_dropout(model):
    """Training mode without dropout, so that a batch and its sub-batch give the same per-sample values."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def labelled_batch(labels):
    """The same ids and mask on every call, with `labels`."""
    torch.manual_seed(0)
    ids, mask = token_batch()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rows_labelled_minus_100_count_neither_in_the_mean_nor_in_the_halting_units(loss_type):
    model = without_dropout(model_for(num_labels=3, loss_type=loss_type))
    batch = labelled_batch(torch.tensor([0, -100, 1, -100]))
    loss = model(**batch).loss
    keep = torch.tensor([True, False, True, False])
    dropped = model(**{name: value[keep] for name, value in batch.items()}).loss
    torch.testing.assert_close(loss, dropped)
    loss.backward()
    ignored = model_for(num_labels=3, loss_type=loss_type).train()
    ignored.load_state_dict(model.state_dict())
    out = ignored(**labelled_batch(torch.full((4,), -100)))
    assert out.loss.item() == 0.0
    out.loss.backward()
    grads = [p.grad for p in ignored.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(grad) == 0 for grad in grads)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_inference_loss_skips_rows_labelled_minus_100(loss_type):
    model = model_for(num_labels=3, loss_type=loss_type).eval()
    batch = labelled_batch(torch.tensor([0, -100, 1, 2]))
    with torch.no_grad():
        out = model(**batch)
    keep = batch["labels"] != -100
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[keep], batch["labels"][keep]))
    with torch.no_grad():
        assert model(**labelled_batch(torch.full((4,), -100))).loss.item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_single_label_column_labels_are_taken_as_one_per_sample(loss_type):
    model = without_dropout(model_for(num_labels=3, loss_type=loss_type))
    labels = torch.tensor([0, 2, 1, 1])
    flat = model(**labelled_batch(labels)).loss
    column = model(**labelled_batch(labels[:, None])).loss
    torch.testing.assert_close(column, flat)
    assert column.dim() == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_an_all_ignored_causal_lm_batch_has_zero_loss_and_gradients(loss_type):
    from conftest import gpt2_config

    from adnet_hf import ADNetForCausalLM

    model = ADNetForCausalLM(
        ADNetConfig(backbone_config=gpt2_config(), unit_hidden_size=8, loss_type=loss_type)
    ).train()
    ids, mask = token_batch(batch=2, length=6, pad_lengths=(0, 2))
    out = model(input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def test_a_loss_set_after_construction_is_the_one_trained_with():
    model = model_for(num_labels=3)
    model.config.loss_type = "last"
    assert isinstance(model.loss_fn, LastStepLoss)
    model.config.gpsl_alpha = 0.7
    model.config.loss_type = "gpsl"
    assert model.loss_fn.alpha == 0.7


@pytest.mark.parametrize(
    "settings",
    [
        dict(growth_midpoint=1e6),
        dict(growth_midpoint=-1e6),
        dict(growth_rate=1e6, growth_midpoint=2.0),
        dict(temperature=1e-6),
        dict(alpha=1e6, beta=1e6, step_cost=1e6),
    ],
)
def test_gpsl_stays_finite_at_the_bounds_of_its_settings(settings):
    losses = torch.tensor(STEP_LOSSES, requires_grad=True)
    probs = torch.tensor(HALTING, requires_grad=True)
    loss = GrowingPlateauSensitiveLoss(**settings)(losses, probs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(losses.grad).all() and torch.isfinite(probs.grad).all()


@pytest.mark.parametrize("prior", [1e-300, 1e-12, 1.0])
def test_pondernet_stays_finite_for_any_prior(prior):
    loss = PonderNetLoss(prior=prior, beta=1.0)(torch.tensor(STEP_LOSSES), torch.tensor(HALTING))
    assert torch.isfinite(loss)
