"""The model-card generator writes a card whose model-index holds the measured results, and its plot."""

import json
import sys
from pathlib import Path

from huggingface_hub import ModelCard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model_cards"))
import make_model_cards  # noqa: E402


def test_card_carries_the_measured_results(tmp_path, monkeypatch):
    rows = [{"policy": "none (full depth)", "setting": None, "accuracy": 0.88, "accuracy_drop_pts": 0.0,
             "mean_layers": 6.0, "ideal_speedup": 1.0},
            {"policy": "plain reference", "setting": None, "accuracy": 0.8853, "mean_layers": 6.0,
             "ideal_speedup": 1.0, "speedup_b1": 1.01, "speedup_b32": 1.0},
            {"policy": "patience", "setting": 2, "accuracy": 0.8761, "accuracy_drop_pts": 0.39, "mean_layers": 3.25,
             "ideal_speedup": 1.85, "speedup_b1": 1.7, "speedup_b32": 1.6},
            {"policy": "patience", "setting": 1, "accuracy": 0.86, "accuracy_drop_pts": 2.0, "mean_layers": 2.5,
             "ideal_speedup": 2.4, "speedup_b1": 2.2, "speedup_b32": 2.0}]
    bench = {"rows": rows, "total_layers": 6, "environment": {"command": "python bench", "cpu_count": 2,
                                                              "torch": "2.13.0"}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    spec = make_model_cards.CardSpec(
        name="adnet-test", title="A test", pipeline_tag="text-classification",
        dataset={"dataset_type": "glue", "dataset_name": "GLUE SST-2", "dataset_config": "sst2",
                 "dataset_split": "validation"},
        benchmark="bench.json", commands=["python train"])
    monkeypatch.setattr(make_model_cards, "ROOT", tmp_path)
    monkeypatch.setattr(make_model_cards, "CARDS", {"test": spec})
    make_model_cards.main([], out_dir=tmp_path / "cards")

    written = ModelCard.load(tmp_path / "cards" / "adnet-test" / "README.md")
    results = [(r.metric_type, r.metric_name, r.metric_value) for r in written.data.eval_results]
    assert results == [("accuracy", "accuracy at full depth", 0.88),
                       ("accuracy", "accuracy with exits (patience=2)", 0.8761),
                       ("mean_executed_layers", "mean executed layers (patience=2)", 3.25)]
    assert written.data.eval_results[0].dataset_name == "GLUE SST-2"
    assert "fine-tuned plainly (full depth, no units) reaches **88.53%**" in written.text
    assert "full depth: 1.70x at batch 1, 1.60x at batch 32." in written.text and "| patience | 2 | 87.61% | 3.25 | 1.85x | 1.70x | 1.60x |" in written.text
    assert (tmp_path / "cards" / "adnet-test" / "accuracy_vs_layers.png").stat().st_size > 0
