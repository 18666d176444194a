"""The benchmark scripts run end to end on a tiny random model (their real results come from their commands)."""

import json
from pathlib import Path

import pytest
from conftest import bert_config
from transformers import BertTokenizer

from adnet_hf import ADNetConfig, ADNetForSequenceClassification
from benchmarks import bench_classification, bench_costs, bench_generation, halting_profile, step_perplexity


@pytest.fixture
def tiny_checkpoint(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizer(vocab=str(tmp_path / "vocab.txt"))  # v5: `vocab`, not `vocab_file`
    model = ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), num_labels=2,
                                                       unit_hidden_size=8, num_fixed_steps=0))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = ["sentence\tlabel"] + [f"w{i} w{i + 1} w{(i * 7) % 90}\t{i % 2}" for i in range(12)]
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_classification_benchmark_writes_json_table_and_plot(tiny_checkpoint):

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
    assert all(row["speedup_b4"] > 0 and 1 <= row["executed_layers"] <= 4 for row in halting)
    assert (out_dir / "tiny.md").read_text().count("\n|") >= 8 and (out_dir / "tiny.png").stat().st_size > 0


def test_classification_benchmark_reads_sentence_pairs_and_scores_regression(tiny_checkpoint):
    from transformers import BertForSequenceClassification

    tokenizer = BertTokenizer.from_pretrained(tiny_checkpoint / "model")
    regression = {"num_labels": 1, "problem_type": "regression"}
    ADNetForSequenceClassification(ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8, num_fixed_steps=0,
                                               **regression)).save_pretrained(tiny_checkpoint / "stsb")
    tokenizer.save_pretrained(tiny_checkpoint / "stsb")
    BertForSequenceClassification(bert_config(**regression)).save_pretrained(tiny_checkpoint / "plain")
    rows = ["genre\tsentence1\tsentence2\tscore"] + [f"news\tw{i} w{i + 1}\tw{(i * 7) % 90} w3\t{i % 5}.{i}00"
                                                      for i in range(10)]
    (tiny_checkpoint / "stsb.tsv").write_text("\n".join(rows) + "\n")
    assert tokenizer.tokenize("w1 w2") == ["w1", "w2"]
    args = ["--model", str(tiny_checkpoint / "stsb"), "--data", str(tiny_checkpoint / "stsb.tsv"), "--batch_sizes",
            "1", "4", "--max_samples_batch1", "3", "--repeats", "1", "--results_dir", str(tiny_checkpoint / "results")]
    path = bench_classification.main([*args, "--reference", str(tiny_checkpoint / "plain"), "--halting", "0.3"])
    result = json.loads(path.read_text())
    assert result["benchmark"] == "regression" and result["samples"] == 10
    assert [row["policy"] for row in result["rows"]] == ["none (full depth)", "plain reference", "halting"]
    assert all(-1 <= row["pearson"] <= 1 for row in result["rows"])
    with pytest.raises(SystemExit):  # confidence needs classes
        bench_classification.main([*args, "--policies", "confidence"])


def test_halting_profile_accounts_for_every_input(tiny_checkpoint):

    path = halting_profile.main([
        "--model", str(tiny_checkpoint / "model"), "--data", str(tiny_checkpoint / "dev.tsv"), "--name", "tiny",
        "--results_dir", str(tiny_checkpoint / "results"), "--halting", "0.2", "0.6",
    ])
    rows = json.loads(path.read_text())["rows"]
    assert [row["executed_layers"] for row in rows] == [1, 2, 3, 4]
    assert sum(row["halting_prob_mean"] for row in rows) == pytest.approx(1.0)
    for epsilon in ("0.2", "0.6"):
        assert sum(row[f"exit_share_eps{epsilon}"] for row in rows) == pytest.approx(1.0)
        assert all((row[f"exit_accuracy_eps{epsilon}"] is None) == (row[f"exit_share_eps{epsilon}"] == 0)
                   for row in rows)
    assert (tiny_checkpoint / "results" / "tiny.png").stat().st_size > 0


def test_generation_benchmark_writes_json_table_and_plot(tmp_path, shared_data):
    from conftest import gpt2_config
    from transformers import GPT2Tokenizer

    from adnet_hf import ADNetForCausalLM

    data = shared_data
    tokenizer = GPT2Tokenizer.from_pretrained(data / "gpt2-tokenizer")
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(vocab_size=len(tokenizer), eos_token_id=0),
                                         unit_hidden_size=8, num_fixed_steps=0))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text((data / "ptb" / "ptb.valid.txt").read_text()[:4000])
    path = bench_generation.main([
        "--model", str(tmp_path / "model"), "--data", str(text), "--name", "tiny", "--block_size", "16",
        "--max_blocks", "4", "--batch_size", "2", "--generation_batch_sizes", "1", "2", "--prompt_length", "4",
        "--new_tokens", "3", "--epsilons", "0.1", "0.5", "--repeats", "1", "--results_dir", str(tmp_path / "r"),
    ])
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert rows[0]["policy"] == "none (full depth)" and len(rows) == 3
    assert all(row["speedup_b2"] > 0 and row["tokens_per_s_b1"] > 0 for row in rows[1:])
    assert (tmp_path / "r" / "tiny.png").exists()


def test_costs_benchmark_times_training_and_measures_peak_memory(tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(Path(bench_costs.__file__).parents[1])  # its memory runs start `-m benchmarks.bench_costs`
    from transformers import BertForSequenceClassification

    backbone = tiny_checkpoint / "backbone"
    BertForSequenceClassification(bert_config(num_labels=2)).save_pretrained(backbone)
    path = bench_costs.main([
        "--backbone", str(backbone), "--model", str(tiny_checkpoint / "model"), "--reference", str(backbone),
        "--tokenizer", str(tiny_checkpoint / "model"), "--data", str(tiny_checkpoint / "dev.tsv"),
        "--train_batches", "2", "--batch_size", "4", "--repeats", "1", "--name", "tiny",
        "--results_dir", str(tiny_checkpoint / "results"), "--exit_policy", "patience", "--exit_value", "1",
    ])
    rows = json.loads(path.read_text())["rows"]
    training = [row for row in rows if row["measure"] == "training step"]
    assert [row["setting"] for row in training] == ["plain"] + [f"adnet {t}" for t in bench_costs.LOSS_TYPES]
    assert all(row["seconds_per_step"] > 0 for row in training)
    memory = {(row["allocator"], row["setting"]): row for row in rows if "memory" in row["measure"]}
    settings = ("adnet none (full depth)", "adnet exits (patience=1)", "plain reference")
    assert set(memory) == {(allocator, setting) for allocator in bench_costs.ALLOCATORS for setting in settings}
    assert all(memory[allocator, "adnet none (full depth)"]["ratio_to_full_depth"] == 1.0
               for allocator in bench_costs.ALLOCATORS)
    assert all(row["peak_rise_mib"] > 0 for row in memory.values())  # a pass from a fresh allocator allocates


def write_idx(path: Path, array) -> str:
    """MNIST's IDX format: zero, zero, the unsigned-byte type code, the rank, then big-endian dimensions."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype("uint8").tobytes())
    return str(path)


def test_classification_benchmark_on_idx_images(tmp_path):
    import numpy as np
    from conftest import resnet_config

    from adnet_hf import ADNetForImageClassification

    model = ADNetForImageClassification(ADNetConfig(backbone_config=resnet_config(), num_labels=3))
    model.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    images = write_idx(tmp_path / "images.idx", rng.integers(0, 256, (10, 28, 28)))
    labels = write_idx(tmp_path / "labels.idx", rng.integers(0, 3, (10,)))
    path = bench_classification.main([
        "--model", str(tmp_path / "model"), "--images", images, "--image_labels", labels, "--batch_sizes", "1", "4",
        "--max_samples_batch1", "3", "--repeats", "1", "--policies", "confidence", "--confidence", "0.5",
        "--name", "tiny_images", "--results_dir", str(tmp_path / "results"),
    ])
    result = json.loads(path.read_text())
    assert result["samples"] == 10 and result["num_blocks"] == model.config.num_blocks
    row = result["rows"][1]
    assert row["policy"] == "confidence" and row["speedup_b1"] > 0 and 1 <= row["executed_layers"]


def test_step_perplexity_ends_at_the_full_depth_perplexity(tmp_path, shared_data):
    from conftest import gpt2_config
    from transformers import GPT2Tokenizer

    from adnet_hf import ADNetForCausalLM

    tokenizer = GPT2Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(vocab_size=len(tokenizer), eos_token_id=0),
                                         unit_hidden_size=8, num_fixed_steps=1)).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text((shared_data / "ptb" / "ptb.valid.txt").read_text()[:3000])
    path = step_perplexity.main(["--model", str(tmp_path / "model"), "--data", str(text), "--block_size", "16",
                                 "--max_blocks", "4", "--name", "tiny", "--results_dir", str(tmp_path / "r")])
    rows = json.loads(path.read_text())["rows"]
    assert [row["executed_layers"] for row in rows] == [2, 3, 4] and rows[-1]["ratio_to_last_step"] == 1.0
    blocks = bench_generation.token_blocks(tokenizer, text, 16, 4)
    full_depth, _ = bench_generation.perplexity(model, blocks, 2, "none")
    assert rows[-1]["perplexity"] == pytest.approx(full_depth, rel=1e-4)
