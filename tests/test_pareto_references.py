"""The references that `benchmarks.pareto_exits` puts beside the exit rules: the two oracle floors, computed from every
step's prediction at full depth, and the static models' depth that matches a setting's accuracy."""

from types import SimpleNamespace

import torch

from benchmarks import pareto_exits

# 3 variable steps x 4 samples x 2 classes; labels 1, 0, 1, 0.
#   sample 0: predictions 0, 1, 1 -> settles at step 2, first right at step 2
#   sample 1: predictions 0, 1, 1 -> settles at step 2, first right at step 1 (wrong at full depth)
#   sample 2: predictions 1, 1, 1 -> settles at step 1, first right at step 1
#   sample 3: predictions 1, 1, 1 -> settles at step 1, never right (the oracle exits at step 1)
PREDICTIONS = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
LABELS = torch.tensor([1, 0, 1, 0])


class StepModel:
    """Stands in for an ADNet classifier at full depth: fixed step predictions, one fixed step before them."""

    config = SimpleNamespace(num_fixed_steps=1, num_variable_steps=3, layers_per_step=2)

    def __call__(self, sample, exit_policy, output_step_logits):
        assert exit_policy == "none" and output_step_logits
        logits = torch.nn.functional.one_hot(PREDICTIONS[:, sample], 2).float()
        return SimpleNamespace(step_logits=logits)


def test_oracles_exit_where_the_prediction_settles_and_where_it_is_first_right():
    batches = [
        {"sample": torch.tensor([0, 1]), "labels": LABELS[:2]},
        {"sample": torch.tensor([2, 3]), "labels": LABELS[2:]},
    ]
    settled, first_correct = pareto_exits.oracle_points(StepModel(), batches)
    # variable steps run to layers 4, 6, 8 (a fixed step of 2 layers first)
    assert settled == {
        "policy": pareto_exits.ORACLE_SETTLED,
        "setting": None,
        "accuracy": 0.5,  # full depth's: samples 0 and 2 right
        "executed_layers": (6 + 6 + 4 + 4) / 4,
    }
    assert first_correct["accuracy"] == 0.75  # right at some step: samples 0, 1, 2
    assert first_correct["executed_layers"] == (6 + 4 + 4 + 4) / 4


def test_static_blocks_is_the_shallowest_static_model_as_accurate():
    static = [
        {"accuracy": 0.70, "executed_layers": 1.0},
        {"accuracy": 0.80, "executed_layers": 2.0},
        {"accuracy": 0.78, "executed_layers": 3.0},
        {"accuracy": 0.85, "executed_layers": 4.0},
    ]
    assert pareto_exits.static_blocks_for(0.79, static) == 2.0
    assert pareto_exits.static_blocks_for(0.80, static) == 2.0
    assert pareto_exits.static_blocks_for(0.81, static) == 4.0
    assert pareto_exits.static_blocks_for(0.90, static) is None
    oracle = [{"policy": pareto_exits.ORACLE_SETTLED, "executed_layers": 2.5}]
    rows = [{"accuracy": 0.79}, {"mean_drop_pts": 5.0}]
    assert pareto_exits.with_references(rows, 0.86, static, oracle) == [
        {"accuracy": 0.79, "static_blocks": 2.0, "oracle_layers": 2.5},
        {"mean_drop_pts": 5.0, "static_blocks": 4.0, "oracle_layers": 2.5},  # a held-out row: 0.86 - 0.05
    ]


def test_static_depth_reads_text_layers_and_resnet_blocks():
    assert pareto_exits.num_blocks(SimpleNamespace(config=SimpleNamespace(model_type="bert", num_hidden_layers=3))) == 3
    assert pareto_exits.num_blocks(SimpleNamespace(config=SimpleNamespace(model_type="resnet", depths=[2, 1]))) == 3
