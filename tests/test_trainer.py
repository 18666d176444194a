import math

import numpy as np
import pytest
import torch
from conftest import bert_config, gpt2_config, token_batch, vary_token_exits
from transformers import EvalPrediction, TrainingArguments

from adnet_hf import ADNetConfig, ADNetForCausalLM, ADNetForSequenceClassification
from adnet_hf.trainer_adnet import (
    ADNetTrainer,
    ADNetTrainingArguments,
    adnet_parameter_groups,
    apply_max_norm,
    compute_classification_metrics,
)

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def classifier(**overrides):
    config = ADNetConfig(
        backbone_config=bert_config(**NO_DROPOUT), num_labels=3, unit_hidden_size=8, classifier_dropout=0.0, **overrides
    )
    return ADNetForSequenceClassification(config)


def dataset(size=16, seed=0):
    """A list of tokenised samples with labels: what `Trainer` needs from a map-style dataset."""
    generator = torch.Generator().manual_seed(seed)
    ids, mask = token_batch(batch=size, pad_lengths=[0, 2, 0, 3] * (size // 4))
    labels = torch.randint(0, 3, (size,), generator=generator)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(size)]


def training_args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 0,
        "learning_rate": 1e-3,
    }
    return ADNetTrainingArguments(**{**defaults, **kwargs})


def params(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_compute_loss_is_the_model_loss(tmp_path):
    model = classifier()
    trainer = ADNetTrainer(model=model, args=training_args(tmp_path))
    ids, mask = token_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    model.train()
    torch.testing.assert_close(trainer.compute_loss(model, dict(inputs)), model(**inputs).loss)


@pytest.mark.parametrize("exit_policy,warns", [("halting", True), ("none", False)])
def test_warns_when_exits_follow_untrained_halting_units(tmp_path, caplog, exit_policy, warns):
    ADNetTrainer(model=classifier(loss_type="last", exit_policy=exit_policy), args=training_args(tmp_path))
    assert ("trains no halting units" in caplog.text) == warns


def causal_lm():
    backbone = gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return ADNetForCausalLM(ADNetConfig(backbone_config=backbone, unit_hidden_size=8))


def lm_dataset(size=8):
    """Both halves hold the same number of predicted tokens, so the two micro-batch means average exactly."""
    return [
        {**item, "labels": item["input_ids"].masked_fill(item["attention_mask"] == 0, -100)} for item in dataset(size)
    ]


@pytest.mark.parametrize(
    "model_fn, data_fn", [(classifier, dataset), (causal_lm, lm_dataset)], ids=["classifier", "causal_lm"]
)
def test_gradient_accumulation_matches_full_batch(tmp_path, model_fn, data_fn):
    """1 x 8 and 2 x 4 give the same parameters after one step (SGD, so a doubled loss would show)."""
    data = data_fn(size=8)
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = model_fn()
        args = training_args(
            tmp_path,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
        )
        ADNetTrainer(model=model, args=args, train_dataset=data).train()
        results.append(params(model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_parameter_groups_learning_rates_and_floor(tmp_path):
    model = classifier()
    args = training_args(
        tmp_path,
        max_steps=6,
        backbone_learning_rate=1e-4,
        unit_learning_rate=1e-2,
        output_learning_rate=3e-3,
        min_learning_rate_ratio=0.1,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
    )
    trainer = ADNetTrainer(model=model, args=args, train_dataset=dataset())
    groups = adnet_parameter_groups(model)
    assert {name.split(".")[0] for name, _ in groups["output"]} == {"output_layers"}
    assert all(name.startswith("adnet.backbone.") for name, _ in groups["backbone"])
    assert all(name.startswith("adnet.units.") for name, _ in groups["unit"])

    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    initial = {"backbone": 1e-4, "unit": 1e-2, "output": 3e-3}
    for group, lr in zip(trainer.optimizer.param_groups, trainer.lr_scheduler.get_last_lr()):
        assert lr == pytest.approx(initial[group["name"]])
        no_decay = any(
            p is param for name, param in model.named_parameters() if "bias" in name for p in group["params"]
        )
        assert group["weight_decay"] == (0.0 if no_decay else 0.01)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(list(model.parameters()))

    trainer.lr_scheduler = trainer.optimizer = None
    trainer.train()
    for group, lr in zip(trainer.optimizer.param_groups, trainer.lr_scheduler.get_last_lr()):
        assert lr == pytest.approx(0.1 * initial[group["name"]])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_each_group_warms_up_from_zero_then_decays_to_its_own_floor(tmp_path, schedule):
    """20 steps: warm-up over 4, then linear or cosine decay over 16 to 0.1 of each group's own initial rate."""
    decay = {
        "linear": lambda progress: 1 - progress,
        "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    }[schedule]
    multipliers = {0: 0.0, 2: 0.5, 4: 1.0, 8: 0.1 + 0.9 * decay(0.25), 12: 0.55, 20: 0.1}  # 12: mid-way, 20: last
    initial = {"backbone": 1e-4, "unit": 1e-2, "output": 3e-3}
    args = training_args(
        tmp_path,
        max_steps=20,
        warmup_steps=4,
        backbone_learning_rate=initial["backbone"],
        unit_learning_rate=initial["unit"],
        output_learning_rate=initial["output"],
        min_learning_rate_ratio=0.1,
        lr_scheduler_type=schedule,
    )
    trainer = ADNetTrainer(model=classifier(), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    for step in range(21):
        if step in multipliers:
            for group, lr in zip(trainer.optimizer.param_groups, trainer.lr_scheduler.get_last_lr()):
                assert lr == pytest.approx(multipliers[step] * initial[group["name"]]), (step, group["name"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()


def test_floor_needs_a_decaying_schedule(tmp_path):
    with pytest.raises(ValueError, match="min_learning_rate_ratio"):
        training_args(tmp_path, min_learning_rate_ratio=0.1, lr_scheduler_type="constant")


def test_max_norm_renorms_unit_and_output_rows(tmp_path):
    model = classifier(max_weight_norm=0.05)
    backbone_before = params(model.adnet.backbone)
    args = training_args(tmp_path, max_steps=1, learning_rate=1.0)  # a huge step pushes rows past the limit
    ADNetTrainer(model=model, args=args, train_dataset=dataset(size=4)).train()
    constrained = [model.adnet.units[0].dense, model.adnet.units[0].halting, model.output_layers[0][1]]
    for linear in constrained:
        assert linear.weight.norm(dim=1).max() <= 0.05 + 1e-6
    assert any(not torch.equal(backbone_before[n], p) for n, p in model.adnet.backbone.named_parameters())
    assert max(p.norm(dim=-1).max() for p in model.adnet.backbone.parameters() if p.dim() == 2) > 0.05


@pytest.mark.parametrize("share_output_layer", [True, False])
def test_freeze_full_depth_trains_the_exits_only(tmp_path, share_output_layer):
    torch.manual_seed(0)
    model = classifier(max_weight_norm=0.05, share_output_layer=share_output_layer)
    ids, mask = token_batch()
    model.eval()
    full_depth = model(input_ids=ids, attention_mask=mask, exit_policy="none").logits
    before = params(model)
    model.freeze_full_depth()
    args = training_args(tmp_path, max_steps=2, learning_rate=1.0)  # a huge step, and max-norm after it
    ADNetTrainer(model=model, args=args, train_dataset=dataset(size=8)).train()
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, exit_policy="none").logits, full_depth)
    changed = {name for name, value in model.named_parameters() if not torch.equal(before[name], value)}
    exits = {
        name
        for name in before
        if name.startswith("adnet.units.") and not name.startswith(f"adnet.units.{len(model.adnet.units) - 1}.")
    }
    if not share_output_layer:
        exits |= {
            name
            for name in before
            if name.startswith("output_layers.")
            and not name.startswith(f"output_layers.{len(model.output_layers) - 1}.")
        }
    assert changed == exits


def test_max_norm_leaves_tied_lm_head_alone():
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(), unit_hidden_size=8))
    embedding = model.get_input_embeddings().weight.detach().clone()
    apply_max_norm(model, 1e-3)
    torch.testing.assert_close(model.get_input_embeddings().weight, embedding)
    assert model.adnet.units[0].dense.weight.norm(dim=1).max() <= 1e-3 + 1e-6


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    data = dataset()
    torch.manual_seed(0)
    straight = classifier()
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, min_learning_rate_ratio=0.2)
    ADNetTrainer(model=straight, args=args, train_dataset=data).train()

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = classifier()
    trainer = ADNetTrainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    for name, value in params(straight).items():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], value, msg=name)


def test_training_logs_and_evaluation_metrics(tmp_path):
    model = classifier()
    args = training_args(tmp_path, max_steps=4, logging_steps=2, per_device_eval_batch_size=8)
    trainer = ADNetTrainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        eval_dataset=dataset(seed=1),
        compute_metrics=compute_classification_metrics,
    )
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 2
    steps = model.config.num_steps
    for entry in train_logs:
        assert model.config.num_fixed_steps + 1 <= entry["exit_steps"] <= steps
        assert 0 <= entry["halting_entropy"] <= np.log(model.config.num_variable_steps) + 1e-6
        assert all(0 <= entry[f"step_{n}_accuracy"] <= 1 for n in range(model.config.num_fixed_steps + 1, steps + 1))

    metrics = trainer.evaluate()
    predictions = trainer.predict(dataset(seed=1))
    logits, exit_steps = predictions.predictions
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == predictions.label_ids))
    assert metrics["eval_exit_steps"] == pytest.approx(exit_steps.mean())
    assert metrics["eval_executed_layers"] == pytest.approx(exit_steps.mean())  # one layer per step
    # without compute_metrics the exits are still reported
    trainer.compute_metrics = None
    without = trainer.evaluate()
    assert {name: without[name] for name in ("eval_exit_steps", "eval_executed_layers")} == pytest.approx(
        {name: metrics[name] for name in ("eval_exit_steps", "eval_executed_layers")}
    )


def test_executed_layers_count_layers_per_step(tmp_path):
    model = classifier(layers_per_step=2, exit_policy="none")
    trainer = ADNetTrainer(model=model, args=training_args(tmp_path), eval_dataset=dataset())
    metrics = trainer.evaluate()
    assert metrics["eval_exit_steps"] == pytest.approx(2.0) and metrics["eval_executed_layers"] == pytest.approx(4.0)


def test_causal_lm_exits_are_counted_per_predicted_token(tmp_path):
    model = causal_lm()
    vary_token_exits(model)
    data = lm_dataset(size=8)
    trainer = ADNetTrainer(model=model, args=training_args(tmp_path, per_device_eval_batch_size=8), eval_dataset=data)
    metrics = trainer.evaluate()
    batch = {name: torch.stack([item[name] for item in data]) for name in data[0]}
    with torch.no_grad():
        exit_steps = model.eval()(**batch).exit_steps
    predicting = exit_steps[:, :-1][batch["labels"][:, 1:] != -100].double()
    assert predicting.mean() != exit_steps[exit_steps > 0].double().mean()  # the last tokens predict nothing
    assert metrics["eval_exit_steps"] == pytest.approx(predicting.mean().item())
    assert metrics["eval_executed_layers"] == pytest.approx(predicting.mean().item())


def test_compute_classification_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    labels = np.array([0, 1, 1, 1])
    metrics = compute_classification_metrics(EvalPrediction((logits, np.array([2, 3, 4, 3])), labels))
    # class 1: predicted for samples 1 and 3, true for 1, 2, 3: precision 1, recall 2/3
    assert metrics == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    without_exits = compute_classification_metrics(EvalPrediction(logits, labels))
    assert without_exits == {"accuracy": 0.75, "f1": pytest.approx(0.8)}


def test_plain_training_arguments_take_adnet_defaults(tmp_path):
    """A user switching from `Trainer` keeps their `TrainingArguments`: one learning rate for every group, plain
    decay, max-norm from the config; the same weights as `ADNetTrainingArguments` left at its defaults."""
    trained = []
    for args_class in (TrainingArguments, ADNetTrainingArguments):
        torch.manual_seed(0)
        model = classifier(max_weight_norm=0.01)  # below the initial rows' norms: the constraint must act
        args = args_class(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
            seed=0,
            learning_rate=1e-3,
            max_steps=2,
            report_to="none",
        )
        trainer = ADNetTrainer(model=model, args=args, train_dataset=dataset())
        trainer.train()
        assert {group["lr"] for group in trainer.optimizer.param_groups} == {0.0}  # linear decay reached zero
        assert {group["initial_lr"] for group in trainer.optimizer.param_groups} == {1e-3}
        assert {group["name"] for group in trainer.optimizer.param_groups} == {"backbone", "unit", "output"}
        trained.append(params(model))
    for name, value in trained[0].items():
        assert torch.equal(trained[1][name], value), name
    row_norms = trained[0]["output_layers.0.1.weight"].norm(dim=1)
    assert (row_norms <= 0.01 + 1e-6).all() and row_norms.max().item() == pytest.approx(0.01, rel=1e-5)  # renormed


@pytest.mark.parametrize("args_class", [TrainingArguments, ADNetTrainingArguments])
def test_label_smoothing_is_refused_with_either_arguments(tmp_path, args_class):
    args = args_class(output_dir=str(tmp_path / "out"), use_cpu=True, label_smoothing_factor=0.1, report_to="none")
    with pytest.raises(ValueError, match="label_smoothing_factor is not used by ADNetTrainer"):
        ADNetTrainer(model=classifier(), args=args)


def test_the_frozen_full_depth_runs_without_dropout_in_training():
    """Stage two trains the exits on the step predictions inference will see: the frozen backbone and output layer
    keep no dropout in training mode, the trained units (and their own output layers) keep theirs."""
    config = ADNetConfig(
        backbone_config=bert_config(hidden_dropout_prob=0.5),
        num_labels=3,
        unit_hidden_size=8,
        classifier_dropout=0.5,
        share_output_layer=False,
    )
    model = ADNetForSequenceClassification(config)
    ids, mask = token_batch()
    model.freeze_full_depth()
    model.train()
    assert not model.adnet.backbone.training and not model.output_layers[-1].training
    assert model.adnet.units[0].training and model.output_layers[0].training
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask, labels=torch.zeros(4, dtype=torch.long))
        inference = model.eval()(input_ids=ids, attention_mask=mask, exit_policy="none", output_step_logits=True)
    torch.testing.assert_close(trained.step_logits[-1], inference.step_logits[-1])
