"""The benchmark scripts run end to end on a tiny random model (their real results come from their commands); their
quality and layer counts agree with `evaluation_adnet` and with direct forwards on the same model and data."""

import argparse
import json
import math
import re
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import bert_config
from transformers import AutoModelForSequenceClassification, BertTokenizer

from adnet_examples.arguments import CalibrationArguments, HaltingFitArguments, hold_out
from adnet_examples.data import model_label_ids, read_tsv
from adnet_hf import ADNetConfig, ADNetForSequenceClassification, calibrate_exit
from adnet_hf.evaluation_adnet import evaluate_batches, task_metrics
from benchmarks import (
    bench_classification,
    bench_costs,
    bench_generation,
    bench_risk_control,
    halting_profile,
    halting_transfer,
    pareto_exits,
    step_perplexity,
)


def labelled_text_batches(folder: Path, data: Path, batch_size: int, label_type=int) -> list[dict]:
    """The benchmark's largest batches of `data`, tokenised by the checkpoint's tokenizer, with their labels."""
    texts, labels = read_tsv(data)
    batches = bench_classification.make_batches(BertTokenizer.from_pretrained(folder), texts, batch_size, 128)
    return bench_classification.with_labels(batches, torch.tensor([label_type(label) for label in labels]))


def inputs(batch: dict) -> dict:
    return {name: value for name, value in batch.items() if name != "labels"}


@torch.no_grad()
def forward_layers(model, batches: list[dict], **exit_setting) -> torch.Tensor:
    """Backbone blocks executed per sample (per token of a causal LM), from the `exit_steps` of forward calls."""
    steps = torch.cat([model(**inputs(batch), **exit_setting).exit_steps for batch in batches])
    return steps * model.config.layers_per_step


def assert_rows_match_direct_evaluation(rows: list[dict], model, batches: list[dict], metric: str) -> None:
    """Every ADNet row's quality is `evaluate_batches` with its setting, and its layers those of direct forwards;
    the full-depth row is `exit_policy="none"`."""
    for row in rows:
        if row["policy"] == "plain reference":
            continue
        policy = "none" if row["policy"] == "none (full depth)" else row["policy"]
        setting = {"exit_policy": policy, "exit_threshold": row["setting"]}
        assert row[metric] == pytest.approx(evaluate_batches(model, batches, **setting)[metric]), row
        assert row["executed_layers"] == pytest.approx(forward_layers(model, batches, **setting).double().mean()), row
    assert rows[0]["executed_layers"] == model.config.num_blocks and rows[0][f"{metric}_drop_pts"] == 0.0


# Labels as the training scripts name their classes: an RTE-like pair task whose labels are words.
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def save_classifier(model, tokenizer_folder: Path, folder: Path) -> Path:
    """`model` saved in `folder` with the tokenizer of `tokenizer_folder`, as a training script saves one."""
    model.save_pretrained(folder)
    BertTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return folder


@pytest.fixture
def word_pair_task(tiny_checkpoint) -> Path:
    """A tiny ADNet model saved with the label2id `run_glue_style.py` gives RTE, and a dev TSV of 12 pairs labelled
    with the model's own full-depth prediction but for the last 3: full-depth accuracy is 0.75 with the labels mapped
    right, 0.25 with them swapped."""
    id2label = {i: name for name, i in RTE_LABELS.items()}
    config = ADNetConfig(
        backbone_config=bert_config(), label2id=RTE_LABELS, id2label=id2label, unit_hidden_size=8, num_fixed_steps=0
    )
    model = ADNetForSequenceClassification(config).eval()
    save_classifier(model, tiny_checkpoint / "model", tiny_checkpoint / "rte")
    pairs = [(f"w{i} w{i + 1}", f"w{(i * 7) % 90} w3") for i in range(12)]
    batch = BertTokenizer.from_pretrained(tiny_checkpoint / "rte")(*zip(*pairs), padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch, exit_policy="none").logits.argmax(-1).tolist()
    names = list(RTE_LABELS)
    labels = [names[p if row < 9 else 1 - p] for row, p in enumerate(predicted)]
    lines = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{row}\t{first}\t{second}\t{label}" for row, ((first, second), label) in enumerate(zip(pairs, labels))
    ]
    (tiny_checkpoint / "rte.tsv").write_text("\n".join(lines) + "\n")
    return tiny_checkpoint


def input_args(*argv: str, batch_size: int = 4) -> argparse.Namespace:
    """What `labelled_inputs` reads, parsed as a classification benchmark parses it."""
    parser = argparse.ArgumentParser()
    bench_classification.add_input_arguments(parser)
    args = parser.parse_args(["--model", "unused", *argv])
    args.batch_sizes, args.max_samples_batch1 = [batch_size], None
    return args


@pytest.mark.slow
def test_classification_benchmark_writes_json_table_and_plot(tiny_checkpoint):
    out_dir = tiny_checkpoint / "results"
    path = bench_classification.main(
        [
            "--model",
            str(tiny_checkpoint / "model"),
            "--data",
            str(tiny_checkpoint / "dev.tsv"),
            "--batch_sizes",
            "1",
            "4",
            "--max_samples_batch1",
            "3",
            "--repeats",
            "1",
            "--name",
            "tiny",
            "--results_dir",
            str(out_dir),
            "--policies",
            "halting",
            "patience",
        ]
    )
    result = json.loads(path.read_text())
    assert result["environment"]["command"] and result["samples"] == 12
    rows = result["rows"]
    assert [(row["policy"], row["setting"]) for row in rows] == [("none (full depth)", None)] + [
        ("halting", value) for value in bench_classification.DEFAULT_SETTINGS["halting"]
    ] + [("patience", value) for value in bench_classification.DEFAULT_SETTINGS["patience"]]
    model = ADNetForSequenceClassification.from_pretrained(tiny_checkpoint / "model").eval()
    batches = labelled_text_batches(tiny_checkpoint / "model", tiny_checkpoint / "dev.tsv", 4)
    assert_rows_match_direct_evaluation(rows, model, batches, "accuracy")
    assert all(math.isfinite(row[f"speedup_b{size}"]) for row in rows[1:] for size in (1, 4))
    assert (out_dir / "tiny.md").read_text().count("\n|") == len(rows) + 1 and (out_dir / "tiny.png").stat().st_size > 0


@pytest.mark.slow
def test_classification_benchmark_reads_sentence_pairs_and_scores_regression(tiny_checkpoint):
    from transformers import BertForSequenceClassification

    tokenizer = BertTokenizer.from_pretrained(tiny_checkpoint / "model")
    regression = {"num_labels": 1, "problem_type": "regression"}
    ADNetForSequenceClassification(
        ADNetConfig(backbone_config=bert_config(), unit_hidden_size=8, num_fixed_steps=0, **regression)
    ).save_pretrained(tiny_checkpoint / "stsb")
    tokenizer.save_pretrained(tiny_checkpoint / "stsb")
    BertForSequenceClassification(bert_config(**regression)).save_pretrained(tiny_checkpoint / "plain")
    rows = ["genre\tsentence1\tsentence2\tscore"] + [
        f"news\tw{i} w{i + 1}\tw{(i * 7) % 90} w3\t{i % 5}.{i}00" for i in range(10)
    ]
    (tiny_checkpoint / "stsb.tsv").write_text("\n".join(rows) + "\n")
    assert tokenizer.tokenize("w1 w2") == ["w1", "w2"]
    args = [
        "--model",
        str(tiny_checkpoint / "stsb"),
        "--data",
        str(tiny_checkpoint / "stsb.tsv"),
        "--batch_sizes",
        "1",
        "4",
        "--max_samples_batch1",
        "3",
        "--repeats",
        "1",
        "--results_dir",
        str(tiny_checkpoint / "results"),
    ]
    path = bench_classification.main([*args, "--reference", str(tiny_checkpoint / "plain"), "--halting", "0.3"])
    result = json.loads(path.read_text())
    assert result["benchmark"] == "regression" and result["samples"] == 10
    rows = result["rows"]
    assert [row["policy"] for row in rows] == ["none (full depth)", "plain reference", "halting"]
    batches = labelled_text_batches(tiny_checkpoint / "stsb", tiny_checkpoint / "stsb.tsv", 4, float)
    model = ADNetForSequenceClassification.from_pretrained(tiny_checkpoint / "stsb").eval()
    assert_rows_match_direct_evaluation(rows, model, batches, "pearson")
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint / "plain").eval()
    with torch.no_grad():
        logits = torch.cat([plain(**inputs(batch)).logits for batch in batches])
    labels = torch.cat([batch["labels"] for batch in batches])
    assert rows[1]["pearson"] == pytest.approx(task_metrics(logits.numpy(), labels.numpy())["pearson"])
    with pytest.raises(SystemExit):  # confidence needs classes
        bench_classification.main([*args, "--policies", "confidence"])


@pytest.mark.slow
def test_halting_profile_accounts_for_every_input(tiny_checkpoint):
    path = halting_profile.main(
        [
            "--model",
            str(tiny_checkpoint / "model"),
            "--data",
            str(tiny_checkpoint / "dev.tsv"),
            "--name",
            "tiny",
            "--results_dir",
            str(tiny_checkpoint / "results"),
            "--halting",
            "0.2",
            "0.6",
        ]
    )
    rows = json.loads(path.read_text())["rows"]
    assert [row["executed_layers"] for row in rows] == [1, 2, 3, 4]
    assert sum(row["halting_prob_mean"] for row in rows) == pytest.approx(1.0)
    model = ADNetForSequenceClassification.from_pretrained(tiny_checkpoint / "model").eval()
    batches = labelled_text_batches(tiny_checkpoint / "model", tiny_checkpoint / "dev.tsv", 32)
    for epsilon in (0.2, 0.6):
        shares = [row[f"exit_share_eps{epsilon}"] for row in rows]
        accuracies = [row[f"exit_accuracy_eps{epsilon}"] for row in rows]
        assert all((accuracy is None) == (share == 0) for share, accuracy in zip(shares, accuracies))
        # the shares are where direct forwards exit, and the per-step accuracies weigh up to the overall one
        layers = forward_layers(model, batches, exit_policy="halting", exit_threshold=epsilon)
        assert shares == pytest.approx([(layers == row["executed_layers"]).double().mean().item() for row in rows])
        overall = evaluate_batches(model, batches, "halting", epsilon)["accuracy"]
        assert sum(share * (accuracy or 0) for share, accuracy in zip(shares, accuracies)) == pytest.approx(overall)
    assert (tiny_checkpoint / "results" / "tiny.png").stat().st_size > 0


@pytest.mark.slow
def test_generation_benchmark_writes_json_table_and_plot(tmp_path, shared_data):
    from conftest import gpt2_config
    from transformers import GPT2Tokenizer

    from adnet_hf import ADNetForCausalLM

    data = shared_data
    tokenizer = GPT2Tokenizer.from_pretrained(data / "gpt2-tokenizer")
    model = ADNetForCausalLM(
        ADNetConfig(
            backbone_config=gpt2_config(vocab_size=len(tokenizer), eos_token_id=0),
            unit_hidden_size=8,
            num_fixed_steps=0,
        )
    )
    model.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text((data / "ptb" / "ptb.valid.txt").read_text()[:4000])
    path = bench_generation.main(
        [  # the bare vocab.json + merges.txt folder, as the README's commands pass it
            "--model",
            str(tmp_path / "model"),
            "--tokenizer",
            str(data / "gpt2-tokenizer"),
            "--data",
            str(text),
            "--name",
            "tiny",
            "--block_size",
            "16",
            "--max_blocks",
            "4",
            "--batch_size",
            "2",
            "--generation_batch_sizes",
            "1",
            "2",
            "--prompt_length",
            "4",
            "--new_tokens",
            "3",
            "--epsilons",
            "0.1",
            "0.5",
            "--repeats",
            "1",
            "--results_dir",
            str(tmp_path / "r"),
        ]
    )
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert [(row["policy"], row["setting"]) for row in rows] == [
        ("none (full depth)", None),
        ("halting", 0.1),
        ("halting", 0.5),
    ]
    model.eval()
    blocks = bench_generation.token_blocks(tokenizer, text, 16, 4)
    with torch.no_grad():  # one forward over every block: its loss is the mean over every predicted token
        full_depth = model(input_ids=blocks, labels=blocks, exit_policy="none")
    assert rows[0]["perplexity"] == pytest.approx(math.exp(full_depth.loss.item()), rel=1e-4)
    assert rows[0]["executed_layers"] == model.config.num_blocks and rows[0]["ppl_increase_pct"] == 0.0
    batches = [{"input_ids": batch, "labels": batch} for batch in blocks.split(2)]
    for row in rows[1:]:
        setting = {"exit_policy": "halting", "exit_threshold": row["setting"]}
        assert row["perplexity"] == pytest.approx(evaluate_batches(model, batches, **setting)["perplexity"])
        predicting = forward_layers(model, batches, **setting)[:, :-1]  # the last token predicts nothing
        assert row["executed_layers"] == pytest.approx(predicting.double().mean().item())
        assert all(math.isfinite(row[key]) for key in ("speedup_b1", "speedup_b2", "tokens_per_s_b1"))
    assert (tmp_path / "r" / "tiny.png").exists()


@pytest.mark.slow
def test_costs_benchmark_times_training_and_measures_peak_memory(word_pair_task, monkeypatch):
    monkeypatch.chdir(Path(bench_costs.__file__).parents[1])  # its memory runs start `-m benchmarks.bench_costs`
    from transformers import BertForSequenceClassification

    backbone = word_pair_task / "backbone"
    BertForSequenceClassification(bert_config(num_labels=2)).save_pretrained(backbone)
    path = bench_costs.main(
        [
            "--backbone",
            str(backbone),
            "--model",
            str(word_pair_task / "rte"),
            "--reference",
            str(backbone),
            "--tokenizer",
            str(word_pair_task / "rte"),
            "--data",
            str(word_pair_task / "rte.tsv"),
            "--train_batches",
            "2",
            "--batch_size",
            "4",
            "--repeats",
            "1",
            "--name",
            "tiny",
            "--results_dir",
            str(word_pair_task / "results"),
            "--exit_policy",
            "patience",
            "--exit_value",
            "1",
        ]
    )
    rows = json.loads(path.read_text())["rows"]
    training = [row for row in rows if row["measure"] == "training step"]
    assert [row["setting"] for row in training] == ["plain"] + [f"adnet {t}" for t in bench_costs.LOSS_TYPES]
    assert all(math.isfinite(row["seconds_per_step"]) for row in training)
    memory = {(row["allocator"], row["setting"]): row for row in rows if "memory" in row["measure"]}
    settings = ("adnet none (full depth)", "adnet exits (patience=1)", "plain reference")
    assert set(memory) == {(allocator, setting) for allocator in bench_costs.ALLOCATORS for setting in settings}
    assert all(
        memory[allocator, "adnet none (full depth)"]["ratio_to_full_depth"] == 1.0
        for allocator in bench_costs.ALLOCATORS
    )
    assert all(row["peak_rise_mib"] > 0 for row in memory.values())  # a pass from a fresh allocator allocates


def write_idx(path: Path, array) -> str:
    """MNIST's IDX format: zero, zero, the unsigned-byte type code, the rank, then big-endian dimensions."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype("uint8").tobytes())
    return str(path)


@pytest.mark.slow
def test_classification_benchmark_on_idx_images(tmp_path):
    import numpy as np
    from conftest import resnet_config

    from adnet_hf import ADNetForImageClassification

    model = ADNetForImageClassification(ADNetConfig(backbone_config=resnet_config(), num_labels=3))
    model.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    images = write_idx(tmp_path / "images.idx", rng.integers(0, 256, (10, 28, 28)))
    labels = write_idx(tmp_path / "labels.idx", rng.integers(0, 3, (10,)))
    path = bench_classification.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--images",
            images,
            "--image_labels",
            labels,
            "--batch_sizes",
            "1",
            "4",
            "--max_samples_batch1",
            "3",
            "--repeats",
            "1",
            "--policies",
            "confidence",
            "--confidence",
            "0.5",
            "--name",
            "tiny_images",
            "--results_dir",
            str(tmp_path / "results"),
        ]
    )
    result = json.loads(path.read_text())
    assert result["samples"] == 10 and result["num_blocks"] == model.config.num_blocks
    rows = result["rows"]
    assert [(row["policy"], row["setting"]) for row in rows] == [("none (full depth)", None), ("confidence", 0.5)]
    dataset = bench_classification.ImageDataset(
        bench_classification.read_idx(images), bench_classification.read_idx(labels)
    )
    batches = bench_classification.with_labels(bench_classification.image_batches(dataset, 4), dataset.labels)
    assert_rows_match_direct_evaluation(rows, model.eval(), batches, "accuracy")
    assert math.isfinite(rows[1]["speedup_b1"])


@pytest.mark.slow
def test_step_perplexity_ends_at_the_full_depth_perplexity(tmp_path, shared_data):
    from conftest import gpt2_config
    from transformers import GPT2Tokenizer

    from adnet_hf import ADNetForCausalLM

    tokenizer = GPT2Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    model = ADNetForCausalLM(
        ADNetConfig(
            backbone_config=gpt2_config(vocab_size=len(tokenizer), eos_token_id=0),
            unit_hidden_size=8,
            num_fixed_steps=1,
        )
    ).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text((shared_data / "ptb" / "ptb.valid.txt").read_text()[:3000])
    path = step_perplexity.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(text),
            "--block_size",
            "16",
            "--max_blocks",
            "4",
            "--name",
            "tiny",
            "--results_dir",
            str(tmp_path / "r"),
        ]
    )
    rows = json.loads(path.read_text())["rows"]
    assert [row["executed_layers"] for row in rows] == [2, 3, 4] and rows[-1]["ratio_to_last_step"] == 1.0
    assert rows[-1]["agreement_with_last_step"] == 1.0 and all(
        0 <= row["agreement_with_last_step"] <= 1 for row in rows
    )
    blocks = bench_generation.token_blocks(tokenizer, text, 16, 4)
    with torch.no_grad():  # one forward over every block: its loss is the mean over every predicted token
        full_depth = model(input_ids=blocks, labels=blocks, exit_policy="none")
    assert rows[-1]["perplexity"] == pytest.approx(math.exp(full_depth.loss.item()), rel=1e-4)


@pytest.mark.slow
def test_export_benchmark_times_every_arm_and_its_runner_agrees_with_eager(word_pair_task):
    from benchmarks import bench_export

    path = bench_export.main(
        [
            "--model",
            str(word_pair_task / "rte"),
            "--data",
            str(word_pair_task / "rte.tsv"),
            "--batch_sizes",
            "1",
            "4",
            "--max_samples_batch1",
            "3",
            "--repeats",
            "1",
            "--name",
            "tiny_export",
            "--results_dir",
            str(word_pair_task / "results"),
            "--settings",
            "confidence=0.6",
            "patience=1",
        ]
    )
    result = json.loads(path.read_text())
    model = ADNetForSequenceClassification.from_pretrained(word_pair_task / "rte").eval()
    batches = labelled_text_batches(word_pair_task / "rte", word_pair_task / "rte.tsv", 4, RTE_LABELS.__getitem__)
    for row in result["agreement"]:
        assert row["same_prediction"] == row["same_exit_step"] == 1.0 and row["max_logit_difference"] < 1e-5, row
        setting = {"exit_policy": row["policy"], "exit_threshold": row["setting"]}
        assert row["eager_accuracy"] == pytest.approx(evaluate_batches(model, batches, **setting)["accuracy"])
        assert row["runner_accuracy"] == row["eager_accuracy"]
    arms = [(row["batch_size"], row["arm"], row["policy"], row["setting"]) for row in result["rows"]]
    assert arms == [
        (size, arm, policy, setting)
        for size in (1, 4)
        for arm, policy, setting in [
            ("eager", "none", None),
            ("eager", "confidence", 0.6),
            ("ONNX Runtime runner", "confidence", 0.6),
            ("eager", "patience", 1),
            ("ONNX Runtime runner", "patience", 1),
            ("ONNX Runtime runner", "none", None),
        ]
    ]
    assert all(row["seconds"] > 0 for row in result["rows"])
    assert [row["samples"] for row in result["rows"]] == [3] * 6 + [12] * 6


@pytest.mark.slow
def test_risk_control_benchmark_chooses_as_calibrate_exit_does(tiny_checkpoint):
    """The benchmark's choice on a calibration part, from per-sample outcomes of whole-set passes, is the one
    `calibrate_exit` makes on that part's own passes (risk-controlled and empirical); its rows cover every budget and
    delta."""
    path = bench_risk_control.main(
        [
            "--model",
            str(tiny_checkpoint / "model"),
            "--data",
            str(tiny_checkpoint / "dev.tsv"),
            "--splits",
            "20",
            "--budgets",
            "0.2",
            "0.5",
            "--deltas",
            "0.1",
            "--batch_size",
            "4",
            "--name",
            "tiny",
            "--results_dir",
            str(tiny_checkpoint / "results"),
        ]
    )
    result = json.loads(path.read_text())
    assert [(row["budget_pts"], row["delta"]) for row in result["rows"]] == [(20.0, 0.1), (50.0, 0.1)]
    assert result["samples"] == 12 and result["calibration_size"] == 6
    assert all(
        0 <= row["violation_share"] <= 1 and row["within_delta"] == (row["violation_share"] <= 0.1)
        for row in result["rows"]
    )
    model = ADNetForSequenceClassification.from_pretrained(tiny_checkpoint / "model").eval()
    batches = labelled_text_batches(tiny_checkpoint / "model", tiny_checkpoint / "dev.tsv", 6)
    grid = [row["setting"] for row in result["candidates"]]
    outcomes = bench_risk_control.sample_outcomes(model, batches, "halting", grid)
    for budget, delta in [(0.2, None), (0.2, 0.1), (0.5, None), (0.5, 0.1)]:  # 0.8^6 > 0.1: (0.2, 0.1) certifies none
        choice = bench_risk_control.choose(outcomes, np.arange(6), budget, delta, 4)
        calibrated = calibrate_exit(model, batches[:1], "halting", budget, grid, delta=delta)
        assert calibrated.value == (None if choice is None else grid[choice])


def test_pareto_budget_table_takes_each_policys_cheapest_setting_within_budget():
    """Known points: per budget, each policy's fewest-layer setting within it (full depth when none is), and whether
    halting needs no more layers than the others."""
    points = [{"policy": "none (full depth)", "setting": None, "accuracy": 0.90, "executed_layers": 6.0}] + [
        {"policy": policy, "setting": setting, "accuracy": accuracy, "executed_layers": layers}
        for policy, setting, accuracy, layers in [
            ("halting", 0.1, 0.899, 3.0),
            ("halting", 0.3, 0.893, 2.0),
            ("halting", 0.5, 0.85, 1.0),
            ("confidence", 0.99, 0.90, 4.0),
            ("confidence", 0.9, 0.896, 2.5),
            ("confidence", 0.8, 0.88, 1.5),
            ("patience", 2, 0.897, 3.5),
            ("patience", 1, 0.891, 2.2),
        ]
    ]
    rows = pareto_exits.budget_table(points, [0.0025, 0.005, 0.01], 6)
    chosen = [(row["budget_pts"], row["policy"], row["setting"], row["executed_layers"]) for row in rows]
    assert chosen == [
        (0.25, "halting", 0.1, 3.0),
        (0.25, "confidence", 0.99, 4.0),
        (0.25, "patience", "none (full depth)", 6.0),
        (0.5, "halting", 0.1, 3.0),
        (0.5, "confidence", 0.9, 2.5),
        (0.5, "patience", 2, 3.5),
        (1.0, "halting", 0.3, 2.0),
        (1.0, "confidence", 0.9, 2.5),
        (1.0, "patience", 1, 2.2),
    ]
    assert [row.get("halting_no_more_layers") for row in rows] == [
        True,
        None,
        None,
        False,
        None,
        None,
        True,
        None,
        None,
    ]
    assert [row["accuracy_drop_pts"] for row in rows[:3]] == pytest.approx([0.1, 0.0, 0.0])
    front = pareto_exits.pareto_front(
        [point for point in points if point["policy"] != "confidence" and point["policy"] != "patience"]
    )
    assert [point["setting"] for point in front] == [0.5, 0.3, 0.1, None]


def test_pareto_held_out_choice_is_scored_on_the_other_half():
    """A setting right on every sample and one wrong on every sample: whichever half chooses, each policy's pick
    and its held-out layers and drop are known."""
    full_errors = np.zeros(8, dtype=bool)
    outcomes = {
        "full_errors": full_errors,
        "exit_errors": np.stack([full_errors, ~full_errors]),
        "layers": np.array([[3.0] * 8, [1.0] * 8]),
    }
    settings = [("halting", 0.1), ("confidence", 0.6)]
    rows = pareto_exits.held_out_table(settings, outcomes, [0.01], 4, splits=5, seed=0)
    assert [(row["policy"], row["mean_layers"], row["violation_share"]) for row in rows] == [
        ("halting", 3.0, 0.0),
        ("confidence", 4.0, 0.0),
    ]
    assert rows[0]["halting_no_more_layers"] is True and all(row["mean_drop_pts"] == 0.0 for row in rows)


def test_plain_twin_holds_the_adnet_backbone_weights(tiny_checkpoint):
    model = ADNetForSequenceClassification.from_pretrained(tiny_checkpoint / "model")
    plain = bench_classification.plain_twin(model, AutoModelForSequenceClassification)
    assert type(plain).__name__ == "BertForSequenceClassification" and plain.config.num_labels == 2
    weights = plain.base_model.state_dict()
    for name, value in model.adnet.backbone.state_dict().items():
        assert torch.equal(weights[name], value), name


@pytest.mark.slow
def test_pareto_benchmark_measures_every_setting_with_real_exits(tiny_checkpoint):
    out_dir = tiny_checkpoint / "results"
    config = bert_config(num_labels=2)
    config.num_hidden_layers = 1
    static = AutoModelForSequenceClassification.from_config(config).eval()
    static.save_pretrained(tiny_checkpoint / "static")
    BertTokenizer.from_pretrained(tiny_checkpoint / "model").save_pretrained(tiny_checkpoint / "static")
    path = pareto_exits.main(
        [
            "--static_models",
            str(tiny_checkpoint / "static"),
            "--model",
            str(tiny_checkpoint / "model"),
            "--data",
            str(tiny_checkpoint / "dev.tsv"),
            "--grid_size",
            "6",
            "--batch_size",
            "5",
            "--budgets",
            "0.1",
            "0.3",
            "--splits",
            "4",
            "--name",
            "tiny",
            "--results_dir",
            str(out_dir),
        ]
    )
    result = json.loads(path.read_text())
    model = ADNetForSequenceClassification.from_pretrained(tiny_checkpoint / "model").eval()
    steps = model.config.num_variable_steps
    points = result["points"]
    assert [(point["policy"], point["setting"]) for point in points] == [("none (full depth)", None)] + [
        (policy, value) for policy in pareto_exits.POLICIES for value in pareto_exits.dense_grid(policy, steps, 6)
    ]
    ten_classes = pareto_exits.dense_grid("confidence", steps, 6, num_labels=10)
    assert ten_classes[0] == pytest.approx(0.1) and ten_classes[-1] == pytest.approx(0.9999)  # from 1 / C
    batches = labelled_text_batches(tiny_checkpoint / "model", tiny_checkpoint / "dev.tsv", 4)
    for point in points[1::4]:
        metrics = evaluate_batches(model, batches, point["policy"], point["setting"])
        assert (point["accuracy"], point["executed_layers"]) == pytest.approx(
            (metrics["accuracy"], metrics["executed_layers"])
        ), point
    table = pareto_exits.budget_table(points, [0.1, 0.3], model.config.num_blocks)
    full = result["full_depth_accuracy"]
    assert result["rows"] == pareto_exits.with_references(table, full, result["static"], result["oracle"])
    assert [(row["budget_pts"], row["policy"]) for row in result["budget_rows_held_out"]] == [
        (budget, policy) for budget in (10.0, 30.0) for policy in pareto_exits.POLICIES
    ]
    assert "Held-out verdict" in (out_dir / "tiny.md").read_text() and (out_dir / "tiny.png").stat().st_size > 0
    static_logits = torch.cat([static(**inputs(batch)).logits for batch in batches])
    labels = torch.cat([batch["labels"] for batch in batches])
    assert result["static"] == [
        {
            "policy": "static",
            "setting": str(tiny_checkpoint / "static"),
            "accuracy": pytest.approx((static_logits.argmax(-1) == labels).double().mean().item()),
            "executed_layers": 1.0,
            "trained_by": None,
        }
    ]
    settled, first_correct = result["oracle"]
    assert settled["accuracy"] == pytest.approx(result["full_depth_accuracy"])  # the settled oracle loses nothing
    assert first_correct["accuracy"] >= settled["accuracy"]
    assert first_correct["executed_layers"] <= settled["executed_layers"] <= model.config.num_blocks


def test_batch_one_alone_is_timed_and_scored_on_every_sample():
    """Batch 1 is cut to `--max_samples_batch1` for timing only while a larger size covers every sample for the
    quality sweep; measured alone (`--batch_sizes 1`) it is that sweep's size, so it keeps every sample."""
    args = argparse.Namespace(max_samples_batch1=3, batch_sizes=[1])
    assert bench_classification.timed_samples(args, 1) is None
    args.batch_sizes = [1, 4]
    assert bench_classification.timed_samples(args, 1) == 3 and bench_classification.timed_samples(args, 4) is None


@pytest.mark.slow
def test_classification_benchmark_times_the_plain_twin_in_turns(tiny_checkpoint):
    path = bench_classification.main(
        [
            "--model",
            str(tiny_checkpoint / "model"),
            "--data",
            str(tiny_checkpoint / "dev.tsv"),
            "--plain_timing",
            "--batch_sizes",
            "1",
            "4",
            "--max_samples_batch1",
            "3",
            "--repeats",
            "1",
            "--policies",
            "halting",
            "--halting",
            "0.3",
            "--name",
            "tiny",
            "--results_dir",
            str(tiny_checkpoint / "results"),
        ]
    )
    rows = json.loads(path.read_text())["rows"]
    assert [row["policy"] for row in rows] == ["none (full depth)", bench_classification.PLAIN_TIMING_ROW, "halting"]
    assert rows[1]["accuracy"] is None and all(math.isfinite(rows[2][f"speedup_vs_plain_b{size}"]) for size in (1, 4))
    with pytest.raises(SystemExit):  # one plain arm at most
        bench_classification.main(
            [
                "--model",
                str(tiny_checkpoint / "model"),
                "--data",
                str(tiny_checkpoint / "dev.tsv"),
                "--plain_timing",
                "--reference",
                "plain",
            ]
        )


def test_overhead_benchmark_times_adnet_at_full_depth_against_its_plain_twin(tiny_checkpoint):
    from benchmarks import bench_overhead

    out_dir = tiny_checkpoint / "results"
    path = bench_overhead.main(
        [
            "--model",
            str(tiny_checkpoint / "model"),
            "--tokenizer",
            str(tiny_checkpoint / "model"),
            "--data",
            str(tiny_checkpoint / "dev.tsv"),
            "--batch_sizes",
            "1",
            "4",
            "--samples_batch1",
            "3",
            "--samples",
            "8",
            "--repeats",
            "2",
            "--profile",
            "--name",
            "tiny_overhead",
            "--results_dir",
            str(out_dir),
        ]
    )
    rows = json.loads(path.read_text())["rows"]
    assert [(row["task"], row["batch_size"], row["forwards"]) for row in rows] == [("text", 1, 3), ("text", 4, 2)]
    assert all(
        row["plain_ms"] > 0 and row["adnet_ms"] > 0 and row[key] > 0
        for row in rows
        for key in ("ratio", "ratio_fastest", "ratio_paired", "ratio_cpu")
    )
    profile = (out_dir / "tiny_overhead_profile.md").read_text()
    assert "## text, batch 1 (3 forwards)" in profile and "adnet_hf/engine_adnet.py" in profile
    model = ADNetForSequenceClassification.from_pretrained(tiny_checkpoint / "model")
    plain = bench_overhead.plain_twin(model, AutoModelForSequenceClassification)
    for name, tensor in model.adnet.backbone.state_dict().items():
        assert torch.equal(plain.base_model.state_dict()[name], tensor), name


def test_halting_transfer_halves_split_the_rows_training_held_out():
    """The two halves are disjoint and together exactly the rows `--fit_halting_split` held out with that seed."""
    halves = halting_transfer.held_out_halves(200, 0.1, split_seed=42, seed=0)
    held_out = hold_out(datasets.Dataset.from_dict({"row": range(200)}), 0.1, 42)[1]["row"]
    assert sorted(np.concatenate(halves).tolist()) == sorted(held_out) and [len(half) for half in halves] == [10, 10]
    other = halting_transfer.held_out_halves(200, 0.1, split_seed=42, seed=1)
    assert sorted(other[0].tolist()) != sorted(halves[0].tolist())


def test_halting_transfer_halves_are_the_fit_rows_that_run_glue_style_holds_out_after_calibration():
    """With --calibration_split, training holds the fit rows out of what calibration left: the halves are those."""
    rows = datasets.Dataset.from_dict({"row": range(200)})
    train = CalibrationArguments(calibration_split=0.2).split(rows, 42)[0]
    fit = HaltingFitArguments(fit_halting_split=0.1).split(train, 42)[1]
    halves = halting_transfer.held_out_halves(200, 0.1, split_seed=42, seed=0, calibration_fraction=0.2)
    assert sorted(np.concatenate(halves).tolist()) == sorted(fit["row"]) and [len(half) for half in halves] == [8, 8]


@pytest.mark.slow
def test_halting_transfer_fits_on_one_half_and_scores_real_exits_on_the_other_and_the_evaluation_data(tiny_checkpoint):
    path = halting_transfer.main(
        [
            "--model",
            str(tiny_checkpoint / "model"),
            "--fit_data",
            str(tiny_checkpoint / "dev.tsv"),
            "--fit_split",
            "0.5",
            "--data",
            str(tiny_checkpoint / "dev.tsv"),
            "--grid_size",
            "3",
            "--batch_size",
            "4",
            "--budgets",
            "0.1",
            "--name",
            "tiny_transfer",
            "--results_dir",
            str(tiny_checkpoint / "results"),
        ]
    )
    rows = json.loads(path.read_text())["rows"]
    assert [(row["fitted_on"], row["scored_on"], row["policy"]) for row in rows] == [
        (fitted, scored, policy)
        for fitted, other in (("half 0", "half 1"), ("half 1", "half 0"))
        for scored in (other, "evaluation")
        for policy in ("halting", "confidence")
    ]
    assert all(1 <= row["executed_layers"] <= 4 for row in rows)  # the tiny backbone has 4 layers


def test_classification_benchmark_maps_word_labels_of_a_pair_task_through_the_models_label2id(word_pair_task):
    path = bench_classification.main(
        [
            "--model",
            str(word_pair_task / "rte"),
            "--data",
            str(word_pair_task / "rte.tsv"),
            "--batch_sizes",
            "4",
            "--repeats",
            "1",
            "--policies",
            "confidence",
            "--confidence",
            "0.6",
            "--name",
            "rte",
            "--results_dir",
            str(word_pair_task / "results"),
        ]
    )
    result = json.loads(path.read_text())
    assert result["samples"] == 12 and result["rows"][0]["accuracy"] == 0.75
    model = ADNetForSequenceClassification.from_pretrained(word_pair_task / "rte").eval()
    batches = labelled_text_batches(word_pair_task / "rte", word_pair_task / "rte.tsv", 4, RTE_LABELS.__getitem__)
    assert_rows_match_direct_evaluation(result["rows"], model, batches, "accuracy")


def test_labelled_inputs_give_each_plain_checkpoint_its_own_label_ids(word_pair_task):
    """Plain classifiers scored on the same data: each gets the labels as its own label2id numbers them, and its own
    tokenizer."""
    from transformers import BertForSequenceClassification

    args = input_args("--data", str(word_pair_task / "rte.tsv"))
    words = read_tsv(word_pair_task / "rte.tsv")[1]
    for label2id in (RTE_LABELS, {"not_entailment": 0, "entailment": 1}):
        model = BertForSequenceClassification(
            bert_config(label2id=label2id, id2label={i: n for n, i in label2id.items()})
        )
        folder = save_classifier(model, word_pair_task / "model", word_pair_task / "plain")
        batches_by_size, labels = bench_classification.labelled_inputs(
            args, AutoModelForSequenceClassification.from_pretrained(folder)
        )
        assert labels.tolist() == [label2id[word] for word in words]
        assert [len(batch["input_ids"]) for batch in batches_by_size[4]] == [4, 4, 4]


def test_a_label_the_model_does_not_know_is_an_error_naming_it_its_row_file_and_the_known_labels(word_pair_task):
    data = word_pair_task / "rte.tsv"
    data.write_text(data.read_text() + "12\tw1 w2\tw3 w4\tneutral\n")
    model = AutoModelForSequenceClassification.from_pretrained(word_pair_task / "rte")
    with pytest.raises(ValueError) as error:
        bench_classification.labelled_inputs(input_args("--data", str(data)), model)
    message = str(error.value)
    assert f"{data}: row 13 " in message and "'neutral'" in message and "['entailment', 'not_entailment']" in message


def test_model_label_ids_follow_the_names_training_saved():
    """Numbers by the name training gives them (`1.0` is class `1`), integers as ids for a model without names,
    floats for a regression model."""
    from transformers import PreTrainedConfig

    named = PreTrainedConfig(label2id={"-1": 0, "1": 1}, id2label={0: "-1", 1: "1"})
    assert model_label_ids(["1.0", "-1", "1"], named, "dev.tsv").tolist() == [1, 0, 1]
    unnamed = PreTrainedConfig(num_labels=3)
    assert model_label_ids(np.array([2, 0], dtype=np.uint8), unnamed, "labels.idx").tolist() == [2, 0]
    assert model_label_ids(["LABEL_1"], unnamed, "dev.tsv").tolist() == [1]
    with pytest.raises(
        ValueError, match=r"labels.idx: row 1 .*'3'.* \['LABEL_0', 'LABEL_1', 'LABEL_2', '0', '1', '2'\]"
    ):
        model_label_ids(np.array([3]), unnamed, "labels.idx")
    regression = PreTrainedConfig(num_labels=1)
    assert model_label_ids(["0.5", "4"], regression, "dev.tsv").tolist() == [0.5, 4.0]


def test_costs_and_lora_train_a_fresh_head_on_the_classes_of_the_data(word_pair_task):
    """A head trained afresh has no label2id: its classes are the data's sorted labels, as `run_glue_style.py`
    finds them, and the batches' labels their ids."""
    tokenizer = BertTokenizer.from_pretrained(word_pair_task / "rte")
    data = str(word_pair_task / "rte.tsv")
    batches, settings = bench_costs.training_batches(tokenizer, data, 2, 4, 32)
    assert settings["label2id"] == RTE_LABELS and settings["num_labels"] == 2
    words = read_tsv(Path(data))[1][:8]
    assert torch.cat([batch["labels"] for batch in batches]).tolist() == [RTE_LABELS[word] for word in words]


def write_image_folder(root: Path, counts: dict[str, int]) -> Path:
    """An image folder: a sub-folder per class of as many small grey PNGs as `counts` says."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            PIL.Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_classification_benchmark_reads_an_image_folder_by_class_name(tmp_path):
    """Class names map through the model's label2id (here not the folders' sorted order), the grey images through
    the model's saved processor, converted to its three channels."""
    from conftest import resnet_config

    from adnet_examples.data import default_image_processor, read_image_folder
    from adnet_hf import ADNetForImageClassification

    folder = write_image_folder(tmp_path / "photos", {"cat": 3, "dog": 5})
    label2id = {"dog": 0, "cat": 1}
    config = ADNetConfig(
        backbone_config=resnet_config(num_channels=3), label2id=label2id, id2label={0: "dog", 1: "cat"}
    )
    model = ADNetForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--image_folder", str(folder), "--batch_sizes", "4", "--repeats", "1"]
    argv += ["--policies", "confidence", "--confidence", "0.6", "--results_dir", str(tmp_path / "results")]
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'model'} has no saved image processor")):
        bench_classification.main(argv)
    images = read_image_folder(str(folder))
    processor = default_image_processor([image.convert("RGB") for image in images["image"]], 3, size=12)
    processor.save_pretrained(tmp_path / "model")
    result = json.loads(bench_classification.main(argv).read_text())
    assert result["samples"] == 8 and result["data"] == str(folder)
    labels = torch.tensor([label2id[name] for name in images.features["label"].int2str(images["label"])])
    loaded = ADNetForImageClassification.from_pretrained(tmp_path / "model")
    assert torch.equal(
        bench_classification.labelled_inputs(input_args("--image_folder", str(folder)), loaded)[1], labels
    )
    pixels = processor([image.convert("RGB") for image in images["image"]], return_tensors="pt")["pixel_values"]
    batches = [{"pixel_values": part} for part in pixels.split(4)]
    assert_rows_match_direct_evaluation(
        result["rows"], model, bench_classification.with_labels(batches, labels), "accuracy"
    )


def test_classification_benchmarks_take_exactly_one_kind_of_data(word_pair_task, capsys):
    model, data = ["--model", str(word_pair_task / "rte")], ["--data", str(word_pair_task / "rte.tsv")]
    for argv, error in [
        ([], "one of the arguments --data --images --image_folder is required"),
        ([*data, "--image_folder", str(word_pair_task)], "--image_folder: not allowed with argument --data"),
        (["--images", "x.idx"], "--images and --image_labels go together"),
    ]:
        with pytest.raises(SystemExit):
            bench_classification.main([*model, *argv])
        assert error in capsys.readouterr().err
