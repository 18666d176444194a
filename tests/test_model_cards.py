"""The model-card generator writes a card whose model-index holds the measured results, and its plot."""

import json

from huggingface_hub import ModelCard

from model_cards import make_model_cards


def write_card(tmp_path, monkeypatch, spec, bench: dict) -> ModelCard:
    """Generate `spec`'s card from the benchmark `bench` in a scratch root; the card as written."""
    bench |= {"num_blocks": 6, "environment": {"command": "python bench", "cpu_count": 2, "torch": "2.13.0"}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    monkeypatch.setattr(make_model_cards, "ROOT", tmp_path)
    monkeypatch.setattr(make_model_cards, "CARDS", {"test": spec})
    make_model_cards.main([], out_dir=tmp_path / "cards")
    return ModelCard.load(tmp_path / "cards" / spec.name / "README.md")


def assert_eval_results(card: ModelCard, metric: str, setting: str, full: float, best: float, layers: float):
    """The model-index: the metric at full depth, then at the cheapest setting within budget, and its layers."""
    assert [(r.metric_type, r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        (metric, f"{metric} at full depth", full), (metric, f"{metric} with exits ({setting})", best),
        ("mean_executed_layers", f"mean executed layers ({setting})", layers)]


def test_card_carries_the_measured_results(tmp_path, monkeypatch):
    rows = [{"policy": "none (full depth)", "setting": None, "accuracy": 0.88, "accuracy_drop_pts": 0.0,
             "executed_layers": 6.0, "ideal_speedup": 1.0},
            {"policy": "plain reference", "setting": None, "accuracy": 0.8853, "executed_layers": 6.0,
             "ideal_speedup": 1.0, "speedup_b1": 1.01, "speedup_b32": 1.0},
            {"policy": "patience", "setting": 2, "accuracy": 0.8761, "accuracy_drop_pts": 0.39, "executed_layers": 3.25,
             "ideal_speedup": 1.85, "speedup_b1": 1.7, "speedup_b32": 1.6},
            {"policy": "patience", "setting": 1, "accuracy": 0.86, "accuracy_drop_pts": 2.0, "executed_layers": 2.5,
             "ideal_speedup": 2.4, "speedup_b1": 2.2, "speedup_b32": 2.0}]
    spec = make_model_cards.CardSpec(
        name="adnet-test", title="A test", pipeline_tag="text-classification",
        dataset={"dataset_type": "glue", "dataset_name": "GLUE SST-2", "dataset_config": "sst2",
                 "dataset_split": "validation"},
        benchmark="bench.json", commands=["python train"])
    written = write_card(tmp_path, monkeypatch, spec, {"benchmark": "classification", "rows": rows})
    assert_eval_results(written, "accuracy", "patience=2", 0.88, 0.8761, 3.25)
    assert written.data.eval_results[0].dataset_name == "GLUE SST-2"
    assert "fine-tuned plainly (full depth, no units) reaches **88.53%**" in written.text
    assert "full depth: 1.70x at batch 1, 1.60x at batch 32." in written.text
    assert "| patience | 2 | 87.61% | 3.25 | 1.85x | 1.70x | 1.60x |" in written.text
    assert (tmp_path / "cards" / "adnet-test" / "accuracy_vs_layers.png").stat().st_size > 0


def test_generation_card_reports_perplexity_within_its_budget(tmp_path, monkeypatch):
    rows = [{"policy": "none (full depth)", "setting": None, "perplexity": 150.0, "ppl_increase_pct": 0.0,
             "executed_layers": 6.0, "ideal_speedup": 1.0},
            {"policy": "halting", "setting": 0.5, "perplexity": 153.0, "ppl_increase_pct": 2.0,
             "executed_layers": 4.0, "ideal_speedup": 1.5, "speedup_b1": 1.4, "speedup_b8": 1.3},
            {"policy": "halting", "setting": 0.7, "perplexity": 160.0, "ppl_increase_pct": 6.67,
             "executed_layers": 3.0, "ideal_speedup": 2.0, "speedup_b1": 1.8, "speedup_b8": 1.7}]
    spec = make_model_cards.CardSpec(
        name="adnet-lm", title="An LM", pipeline_tag="text-generation",
        dataset={"dataset_type": "ptb_text_only", "dataset_name": "Penn Treebank", "dataset_split": "test"},
        benchmark="bench.json", commands=["python train"])
    written = write_card(tmp_path, monkeypatch, spec, {"benchmark": "generation", "rows": rows})
    assert_eval_results(written, "perplexity", "halting=0.5", 150.0, 153.0, 4.0)
    assert "within 3% of it, `halting=0.5`, reaches **153.0** running **4.00** of 6 layers per token" in written.text
    assert "| halting | 0.7 | 160.0 | 3.00 | 2.00x | 1.80x | 1.70x |" in written.text
    assert "AutoModelForCausalLM" in written.text
    assert (tmp_path / "cards" / "adnet-lm" / "perplexity_vs_layers.png").stat().st_size > 0


def test_regression_card_reports_pearson_and_the_plain_training_run(tmp_path, monkeypatch):
    rows = [{"policy": "none (full depth)", "setting": None, "pearson": 0.8484, "pearson_drop_pts": 0.0,
             "executed_layers": 6.0, "ideal_speedup": 1.0},
            {"policy": "halting", "setting": 0.5, "pearson": 0.8452, "pearson_drop_pts": 0.32, "executed_layers": 5.0,
             "ideal_speedup": 1.2, "speedup_b1": 1.1, "speedup_b32": 1.15}]
    (tmp_path / "plain.json").write_text(json.dumps({"eval_pearson": 0.8252}))
    spec = make_model_cards.CardSpec(
        name="adnet-stsb", title="STS-B", pipeline_tag="text-classification",
        dataset={"dataset_type": "glue", "dataset_name": "GLUE STS-B", "dataset_config": "stsb",
                 "dataset_split": "validation"},
        benchmark="bench.json", commands=["python train"], plain_result=("plain.json", "eval_pearson"))
    written = write_card(tmp_path, monkeypatch, spec, {"benchmark": "regression", "rows": rows})
    assert_eval_results(written, "pearson", "halting=0.5", 0.8484, 0.8452, 5.0)
    assert "reaches **0.8252** on the same data (its training run's evaluation, `plain.json`)" in written.text
    assert "| halting | 0.5 | 0.8452 | 5.00 | 1.20x | 1.10x | 1.15x |" in written.text
    assert "AutoModelForSequenceClassification" in written.text
