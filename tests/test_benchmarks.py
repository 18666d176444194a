"""The benchmark scripts run end to end on a tiny random model (their real results come from their commands)."""

import json
import sys
from pathlib import Path

import pytest
from conftest import bert_config
from transformers import BertTokenizer

from adnet_hf import ADNetConfig, ADNetForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), num_labels=2,
                                                       unit_hidden_size=8, num_fixed_steps=0))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = ["sentence\tlabel"] + [f"w{i} w{i + 1} w{(i * 7) % 90}\t{i % 2}" for i in range(12)]
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_classification_benchmark_writes_json_table_and_plot(tiny_checkpoint):
    import bench_classification

    out_dir = tiny_checkpoint / "results"
    path = bench_classification.main([
        "--model", str(tiny_checkpoint / "model"), "--data", str(tiny_checkpoint / "dev.tsv"),
        "--batch_sizes", "1", "4", "--max_samples_batch1", "3", "--repeats", "1", "--name", "tiny",
        "--results_dir", str(out_dir), "--policies", "halting", "patience",
    ])
    result = json.loads(path.read_text())
    assert result["environment"]["command"] and result["samples"] == 12
    policies = {row["policy"] for row in result["rows"]}
    assert {"none (full depth)", "halting", "patience"} <= policies
    halting = [row for row in result["rows"] if row["policy"] == "halting"]
    assert all(row["speedup_b4"] > 0 and 1 <= row["mean_layers"] <= 4 for row in halting)
    assert (out_dir / "tiny.md").read_text().count("\n|") >= 8 and (out_dir / "tiny.png").stat().st_size > 0
