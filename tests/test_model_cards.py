"""Model cards are rendered from their card.yaml and the results JSON it names: the metadata holds the measured
results, and every number and command comes from the results files."""

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from model_cards import make_model_cards

ENVIRONMENT = {"command": "python -m benchmarks.bench", "cpu_count": 2, "torch": "2.13.0"}
DATASETS = {
    "glue": {
        "dataset_type": "glue",
        "dataset_name": "GLUE SST-2",
        "dataset_config": "sst2",
        "dataset_split": "validation",
    },
    "ptb": {"dataset_type": "ptb_text_only", "dataset_name": "Penn Treebank", "dataset_split": "test"},
}


def write_card(root: Path, spec: dict, bench: dict, **results: dict) -> ModelCard:
    """Render the card `spec` (a card.yaml's content) from the benchmark `bench` and the named `results` files, all
    in the scratch repository `root`; the card as written."""
    for name, content in {"bench.json": {"environment": ENVIRONMENT, "num_blocks": 6, **bench}, **results}.items():
        (root / name).write_text(json.dumps(content))
    folder = root / "cards" / "adnet-test"
    folder.mkdir(parents=True)
    (folder / "card.yaml").write_text(yaml.safe_dump({"benchmark": "bench.json", "commands": ["bench.json"], **spec}))
    make_model_cards.main([], cards_dir=root / "cards", root=root)
    return ModelCard.load(folder / "README.md")


def assert_eval_results(card: ModelCard, metric: str, setting: str, full: float, best: float, layers: float):
    """The model-index: the metric at full depth, then at the cheapest setting within budget, and its layers."""
    assert [(r.metric_type, r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        (metric, f"{metric} at full depth", full),
        (metric, f"{metric} with exits ({setting})", best),
        ("executed_layers", f"mean executed layers ({setting})", layers),
    ]


def test_card_carries_the_measured_results(tmp_path):
    rows = [
        {
            "policy": "none (full depth)",
            "setting": None,
            "accuracy": 0.88,
            "accuracy_drop_pts": 0.0,
            "executed_layers": 6.0,
            "ideal_speedup": 1.0,
        },
        {
            "policy": "plain reference",
            "setting": None,
            "accuracy": 0.8853,
            "executed_layers": 6.0,
            "ideal_speedup": 1.0,
            "speedup_b1": 1.01,
            "speedup_b32": 1.0,
        },
        {
            "policy": "patience",
            "setting": 2,
            "accuracy": 0.8761,
            "accuracy_drop_pts": 0.39,
            "executed_layers": 3.25,
            "ideal_speedup": 1.85,
            "speedup_b1": 1.7,
            "speedup_b32": 1.6,
        },
        {
            "policy": "patience",
            "setting": 1,
            "accuracy": 0.86,
            "accuracy_drop_pts": 2.0,
            "executed_layers": 2.5,
            "ideal_speedup": 2.4,
            "speedup_b1": 2.2,
            "speedup_b32": 2.0,
        },
        {
            "policy": "halting",
            "setting": 0.5,
            "accuracy": 0.87,
            "accuracy_drop_pts": 1.0,
            "executed_layers": 5.0,
            "ideal_speedup": 1.2,
            "speedup_b1": 1.1,
            "speedup_b32": 1.1,
        },
    ]
    spec = {
        "title": "A test",
        "pipeline_tag": "text-classification",
        "dataset": DATASETS["glue"],
        "rows": ["plain reference", "none (full depth)", "patience"],
        "limits": ["Made up."],
        "commands": ["train.json", "bench.json"],
    }
    written = write_card(
        tmp_path,
        spec,
        {"benchmark": "classification", "rows": rows},
        **{"train.json": {"command": "python examples/train.py"}},
    )
    assert_eval_results(written, "accuracy", "patience=2", 0.88, 0.8761, 3.25)
    assert written.data.eval_results[0].dataset_name == "GLUE SST-2"
    assert "full depth: 1.70x at batch 1, 1.60x at batch 32." in written.text
    table = [line for line in written.text.splitlines() if line.startswith("| ") and "x |" in line]
    assert table[0].startswith("| plain reference |  | 88.53% | 6.00 | 1.00x | 1.01x | 1.00x |")
    assert "| patience | 2 | 87.61% | 3.25 | 1.85x | 1.70x | 1.60x |" in table and len(table) == 4  # no halting row
    assert "- Made up." in written.text
    assert "```\npython examples/train.py\n```\n```\npython -m benchmarks.bench\n```" in written.text
    assert (tmp_path / "cards" / "adnet-test" / "accuracy_vs_layers.png").stat().st_size > 0


def test_generation_card_reports_perplexity_within_its_budget_and_each_exit_point(tmp_path):
    rows = [
        {
            "policy": "none (full depth)",
            "setting": None,
            "perplexity": 150.0,
            "ppl_increase_pct": 0.0,
            "executed_layers": 6.0,
            "ideal_speedup": 1.0,
        },
        {
            "policy": "halting",
            "setting": 0.5,
            "perplexity": 153.0,
            "ppl_increase_pct": 2.0,
            "executed_layers": 4.0,
            "ideal_speedup": 1.5,
            "speedup_b1": 1.4,
            "speedup_b8": 1.3,
        },
        {
            "policy": "halting",
            "setting": 0.7,
            "perplexity": 160.0,
            "ppl_increase_pct": 6.67,
            "executed_layers": 3.0,
            "ideal_speedup": 2.0,
            "speedup_b1": 1.8,
            "speedup_b8": 1.7,
        },
    ]
    steps = {
        "blocks": 4,
        "block_size": 16,
        "rows": [
            {"executed_layers": 3, "perplexity": 3.5e6, "ratio_to_last_step": 2.3e4},
            {"executed_layers": 6, "perplexity": 150.0, "ratio_to_last_step": 1.0},
        ],
    }
    spec = {
        "title": "An LM",
        "pipeline_tag": "text-generation",
        "dataset": DATASETS["ptb"],
        "rows": ["none (full depth)", "halting"],
        "steps": "steps.json",
    }
    written = write_card(
        tmp_path,
        spec,
        {"benchmark": "generation", "rows": rows, "blocks": 8, "block_size": 32},
        **{"steps.json": steps},
    )
    assert_eval_results(written, "perplexity", "halting=0.5", 150.0, 153.0, 4.0)
    assert "within 3% of it, `halting=0.5`, reaches **153.0** running **4.00** of 6 layers per token" in written.text
    assert "| halting | 0.7 | 160.0 | 3.00 | 2.00x | 1.80x | 1.70x |" in written.text
    assert "on the first 4 blocks of 16 tokens of the test set:" in written.text
    assert "| 3 | 3.5e+06 | 2.3e+04 |" in written.text
    assert "## Self-speculative generation" not in written.text
    note = "- Perplexity in the exit policy table is on the first 8 blocks of 32 tokens of the test set."
    assert note in written.text
    assert "AutoModelForCausalLM" in written.text
    assert (tmp_path / "cards" / "adnet-test" / "perplexity_vs_layers.png").stat().st_size > 0


def test_regression_card_sets_the_training_runs_against_the_plain_ones(tmp_path):
    rows = [
        {
            "policy": "none (full depth)",
            "setting": None,
            "pearson": 0.8484,
            "pearson_drop_pts": 0.0,
            "executed_layers": 6.0,
            "ideal_speedup": 1.0,
        },
        {
            "policy": "halting",
            "setting": 0.5,
            "pearson": 0.8452,
            "pearson_drop_pts": 0.32,
            "executed_layers": 5.0,
            "ideal_speedup": 1.2,
            "speedup_b1": 1.1,
            "speedup_b32": 1.15,
        },
    ]
    spec = {
        "title": "STS-B",
        "pipeline_tag": "text-classification",
        "dataset": DATASETS["glue"],
        "rows": ["none (full depth)", "halting"],
        "plain_comparison": [{"run": "seed 42", "adnet": "adnet.json", "plain": "plain.json"}],
    }
    written = write_card(
        tmp_path,
        spec,
        {"benchmark": "regression", "rows": rows},
        **{"adnet.json": {"eval_pearson": 0.84839}, "plain.json": {"eval_pearson": 0.82519}},
    )
    assert_eval_results(written, "pearson", "halting=0.5", 0.8484, 0.8452, 5.0)
    assert "| seed 42 | 0.8484 | 0.8252 | +0.0232 | `adnet.json`, `plain.json` |" in written.text
    assert "| halting | 0.5 | 0.8452 | 5.00 | 1.20x | 1.10x | 1.15x |" in written.text
    assert "AutoModelForSequenceClassification" in written.text


@pytest.mark.parametrize("spec", sorted(make_model_cards.CARDS_DIR.glob("*/card.yaml")), ids=lambda p: p.parent.name)
def test_committed_card_is_its_results_rendered(spec):
    """Each committed card is exactly what its card.yaml and the committed results render: no number or command in
    it was typed by hand, and none has drifted from the results."""
    card, _, _ = make_model_cards.render(make_model_cards.CardSpec.from_yaml(spec), spec.parent.name)
    assert str(card) == (spec.parent / "README.md").read_text(encoding="utf-8")


def test_card_states_the_exit_guarantee_and_how_often_it_held(tmp_path):
    rows = [
        {
            "policy": "none (full depth)",
            "setting": None,
            "accuracy": 0.88,
            "accuracy_drop_pts": 0.0,
            "executed_layers": 6.0,
            "ideal_speedup": 1.0,
        },
        {
            "policy": "halting",
            "setting": 0.3,
            "accuracy": 0.875,
            "accuracy_drop_pts": 0.5,
            "executed_layers": 4.5,
            "ideal_speedup": 1.33,
            "speedup_b1": 1.2,
            "speedup_b32": 1.25,
        },
    ]
    guarantee = {
        "policy": "halting",
        "value": 0.3,
        "metric": "accuracy",
        "budget": 0.01,
        "delta": 0.1,
        "calibration_size": 400,
        "method": "Learn-then-Test",
    }
    calibration = {
        "calibration_samples": 400,
        "policy": "halting",
        "value": 0.3,
        "guarantee": guarantee,
        "command": "python examples/run_glue_style.py",
    }
    risk = {
        "samples": 872,
        "calibration_size": 436,
        "test_size": 436,
        "policy": "halting",
        "rows": [
            {
                "budget_pts": 0.5,
                "delta": 0.1,
                "splits": 200,
                "violation_share": 0.01,
                "mean_layers": 5.8,
                "empirical_violation_share": 0.35,
                "empirical_mean_layers": 4.9,
            }
        ],
    }
    spec = {
        "title": "SST-2",
        "pipeline_tag": "text-classification",
        "dataset": DATASETS["glue"],
        "rows": ["none (full depth)", "halting"],
        "calibration": "calibration.json",
        "risk_control": "risk.json",
        "commands": ["calibration.json", "bench.json"],
    }
    written = write_card(
        tmp_path,
        spec,
        {"benchmark": "classification", "rows": rows},
        **{"calibration.json": calibration, "risk.json": risk},
    )
    assert (
        "The saved exit setting, `halting=0.3`, is risk-controlled: with probability at least 90% over the 400 "
        "calibration samples"
    ) in written.text
    assert "new data from the same distribution is at most 1 point below full depth" in written.text
    assert "Over 200 random splits of the validation set (872 samples) into\n436 to calibrate `halting`" in written.text
    assert "| 0.5 points | 0.1 | 1.0% | 5.80 | 35.0% | 4.90 |" in written.text
    none = {**calibration, "policy": "none", "value": None, "guarantee": {**guarantee, "policy": "none", "value": None}}
    assert make_model_cards.guarantee_text(none).startswith("No setting could be certified to lose at most 1 point of")
    empirical = make_model_cards.guarantee_text({**calibration, "guarantee": None})
    assert empirical.startswith("The saved exit setting, `halting=0.3`, was chosen empirically on 400 samples")


def test_generation_card_shows_the_self_speculative_table(tmp_path):
    rows = [
        {
            "policy": "none (full depth)",
            "setting": None,
            "perplexity": 150.0,
            "ppl_increase_pct": 0.0,
            "executed_layers": 6.0,
            "ideal_speedup": 1.0,
        }
    ]
    draft = {
        "assistant_early_exit": 2,
        "num_assistant_tokens": 8,
        "assistant_confidence_threshold": 0.0,
        "backbone_tokens_per_s": 50.0,
        "tokens_per_s": 105.0,
        "speedup": 2.1,
        "acceptance_rate": 0.875,
        "tokens_per_verification": 5.5,
        "identical_outputs": True,
        "draft_vocab_size": None,
    }
    speculative = {
        "environment": {"command": "python -m benchmarks.bench_speculative --depths 2"},
        "prompts": 4,
        "prompt_lengths": [16] * 4,
        "new_tokens": 48,
        "rows": [
            draft,
            {
                **draft,
                "assistant_confidence_threshold": 0.5,
                "draft_vocab_size": 4096,
                "speedup": 0.9,
                "identical_outputs": False,
            },
        ],
    }
    spec = {
        "title": "An LM",
        "pipeline_tag": "text-generation",
        "dataset": DATASETS["ptb"],
        "rows": ["none (full depth)"],
        "speculative": "speculative.json",
    }
    written = write_card(tmp_path, spec, {"benchmark": "generation", "rows": rows}, **{"speculative.json": speculative})
    assert "4 prompts of 16 tokens\nfrom the test set, 48 new tokens each" in written.text
    assert "`python -m benchmarks.bench_speculative --depths 2`" in written.text
    assert "| 2 | 8 | 0 | full | 87.5% | 5.50 | 105.0 | 50.0 | 2.10x | yes |" in written.text
    assert "| 2 | 8 | 0.5 | 4096 | 87.5% | 5.50 | 105.0 | 50.0 | 0.90x | no |" in written.text
