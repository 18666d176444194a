"""The causal LM and image example scripts end to end on tiny models and small slices of the real data."""

import json
import math

import pytest
import torch
from conftest import image_metrics
from transformers import AutoModelForCausalLM, GPT2Tokenizer

from adnet_examples.data import read_idx, token_blocks
from examples import run_clm, run_image_classification


@torch.no_grad()
def saved_lm_reference(folder, tokenizer_folder, text, block_size: int, batch_size: int, **exit_setting) -> dict:
    """What the causal LM saved in `folder` gives on `text` in blocks, batched as the script's evaluation: perplexity
    from the model's own per-batch losses weighted by their tokens (not by batch), and the layers run per predicted
    token from the exit steps of its forward calls (an ADNet model's)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    blocks = token_blocks(GPT2Tokenizer.from_pretrained(tokenizer_folder), text, block_size)
    outputs = [model(input_ids=batch, labels=batch, **exit_setting) for batch in blocks.split(batch_size)]
    loss = sum(out.loss.item() * (len(out.logits) / len(blocks)) for out in outputs)  # every block: equal tokens
    reference = {"perplexity": math.exp(loss)}
    if model.config.model_type == "adnet":
        layers = torch.cat([out.executed_layers[:, :-1] for out in outputs])  # the last token predicts nothing
        reference["executed_layers"] = layers.double().mean().item()
    return reference


TRAINING = [
    "--num_train_epochs",
    "1",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "8",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--learning_rate",
    "1e-3",
    "--seed",
    "0",
]


@pytest.mark.slow
def test_run_clm_from_scratch_reports_perplexities(tmp_path, shared_data):
    text = (shared_data / "ptb" / "ptb.valid.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:6000])
    (tmp_path / "valid.txt").write_text(text[6000:9000])
    results = run_clm.main(
        [
            "--backbone_config",
            '{"model_type": "gpt2", "n_layer": 4, "n_embd": 16, "n_head": 2, "n_positions": 32}',
            "--tokenizer_name",
            str(shared_data / "gpt2-tokenizer"),
            "--train_file",
            str(tmp_path / "train.txt"),
            "--validation_file",
            str(tmp_path / "valid.txt"),
            "--block_size",
            "16",
            "--num_fixed_steps",
            "1",
            "--unit_hidden_size",
            "8",
            "--halting_epsilon",
            "0.6",
            "--output_dir",
            str(tmp_path / "out"),
            "--do_train",
            "--do_eval",
            *TRAINING,
        ]
    )
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["eval_perplexity"] == pytest.approx(results["eval_perplexity"])
    tokenizer = shared_data / "gpt2-tokenizer"
    for prefix, exit_setting in (("eval", {}), ("eval_full_depth", {"exit_policy": "none"})):
        reference = saved_lm_reference(tmp_path / "out", tokenizer, tmp_path / "valid.txt", 16, 8, **exit_setting)
        assert saved[f"{prefix}_perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
        assert saved[f"{prefix}_executed_layers"] == pytest.approx(reference["executed_layers"])
    assert saved["eval_full_depth_executed_layers"] == 4 and saved["eval_exit_policy"] == "halting"


@pytest.mark.slow
def test_run_clm_plain_baseline_trains_the_backbone_own_lm(tmp_path, shared_data):
    text = (shared_data / "ptb" / "ptb.valid.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:3000])
    (tmp_path / "valid.txt").write_text(text[3000:5000])
    results = run_clm.main(
        [
            "--plain_baseline",
            "--backbone_config",
            '{"model_type": "gpt2", "n_layer": 3, "n_embd": 16, "n_head": 2, "n_positions": 32}',
            "--tokenizer_name",
            str(shared_data / "gpt2-tokenizer"),
            "--train_file",
            str(tmp_path / "train.txt"),
            "--validation_file",
            str(tmp_path / "valid.txt"),
            "--block_size",
            "16",
            "--output_dir",
            str(tmp_path / "out"),
            "--do_train",
            "--do_eval",
            *TRAINING,
        ]
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    reference = saved_lm_reference(tmp_path / "out", shared_data / "gpt2-tokenizer", tmp_path / "valid.txt", 16, 8)
    assert results["eval_perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    assert results["eval_num_blocks"] == 3 and "eval_full_depth_perplexity" not in results
    with pytest.raises(ValueError, match="--freeze_full_depth"):
        run_clm.main(["--plain_baseline", "--freeze_full_depth", "--output_dir", str(tmp_path / "x")])


@pytest.mark.slow
def test_run_clm_freezes_full_depth(tmp_path, shared_data):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_layer=2, n_embd=16, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    text = (shared_data / "ptb" / "ptb.valid.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:3000])
    run_clm.main(
        [
            "--model_name_or_path",
            str(tmp_path / "gpt2"),
            "--tokenizer_name",
            str(shared_data / "gpt2-tokenizer"),
            "--freeze_full_depth",
            "--train_file",
            str(tmp_path / "train.txt"),
            "--block_size",
            "16",
            "--num_fixed_steps",
            "0",
            "--output_dir",
            str(tmp_path / "out"),
            "--do_train",
            *TRAINING,
        ]
    )
    from safetensors.torch import load_file

    before = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").transformer.state_dict()
    after = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in before.items():
        if f"adnet.backbone.{name}" in after:
            assert after[f"adnet.backbone.{name}"].equal(tensor), name


@pytest.mark.slow
def test_run_image_classification_on_mnist_slices(tmp_path, shared_data):
    results = run_image_classification.main(
        [
            "--backbone_config",
            '{"model_type": "resnet", "num_channels": 1, "embedding_size": 8, '
            '"hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}',
            "--train_file",
            str(shared_data / "mnist" / "mnist_5k.csv.gz"),
            "--max_train_samples",
            "64",
            "--validation_file",
            str(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz"),
            "--validation_labels_file",
            str(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz"),
            "--max_eval_samples",
            "32",
            "--num_fixed_steps",
            "0",
            "--unit_hidden_size",
            "8",
            "--output_dir",
            str(tmp_path / "out"),
            "--do_train",
            "--do_eval",
            "--fit_halting_split",
            "0.25",
            *TRAINING,
        ]
    )
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
    reference = image_metrics(
        tmp_path / "out",
        shared_data / "mnist" / "t10k-images-idx3-ubyte.gz",
        shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz",
        32,
        8,
    )
    for name in ("accuracy", "exit_steps", "executed_layers"):
        assert saved[f"eval_{name}"] == pytest.approx(reference[name]), name
    assert saved["eval_num_blocks"] == 2
    # a quarter of the 64 training digits held out of training, the units fitted on them
    fit = json.loads((tmp_path / "out" / "halting_fit_results.json").read_text())
    assert (fit["halting_fit_samples"], fit["halting_fit_held_out"]) == (16, True)


@pytest.mark.slow
def test_run_image_classification_plain_baseline(tmp_path, shared_data):
    results = run_image_classification.main(
        [
            "--plain_baseline",
            "--backbone_config",
            '{"model_type": "resnet", "num_channels": 1, "embedding_size": 8, '
            '"hidden_sizes": [8, 16], "depths": [1, 2], "layer_type": "basic"}',
            "--train_file",
            str(shared_data / "mnist" / "mnist_5k.csv.gz"),
            "--max_train_samples",
            "64",
            "--validation_file",
            str(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz"),
            "--validation_labels_file",
            str(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz"),
            "--max_eval_samples",
            "32",
            "--output_dir",
            str(tmp_path / "out"),
            "--do_train",
            "--do_eval",
            *TRAINING,
        ]
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["ResNetForImageClassification"] and len(config["id2label"]) == 10
    reference = image_metrics(
        tmp_path / "out",
        shared_data / "mnist" / "t10k-images-idx3-ubyte.gz",
        shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz",
        32,
        8,
    )
    assert results["eval_accuracy"] == pytest.approx(reference["accuracy"]) and results["eval_num_blocks"] == 3


def test_idx_reader_matches_the_label_count(shared_data):
    labels = read_idx(str(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz"))
    images = read_idx(str(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz"))
    assert labels.shape == (10000,) and images.shape == (10000, 28, 28) and set(labels.tolist()) == set(range(10))
