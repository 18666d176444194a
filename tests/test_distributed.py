"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the same global batch, through
the Trainer script and the accelerate loop, and no loss type trips DDP's unused-parameters check."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import text_metrics
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

import examples
from adnet_examples.arguments import train_wordpiece_tokenizer

EXAMPLES = Path(examples.__file__).resolve().parent
SAMPLE = EXAMPLES / "data" / "sst2_sample"
GLOBAL_BATCH = 8
TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """A tiny dropout-free BERT checkpoint (dropout masks would differ between processes) and 32 SST-2 rows."""
    root = tmp_path_factory.mktemp("distributed")
    with open(SAMPLE / "train.tsv", encoding="utf-8") as file:
        rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[:33]
    (root / "train.tsv").write_text("\n".join("\t".join(row) for row in rows) + "\n", encoding="utf-8")
    tokenizer = train_wordpiece_tokenizer((sentence for sentence, _ in rows[1:]), 200, 64)
    BertModel(BertConfig(**TINY_BERT, vocab_size=len(tokenizer))).save_pretrained(root / "backbone")
    tokenizer.save_pretrained(root / "backbone")
    return {"backbone": root / "backbone", "train": root / "train.tsv", "root": root}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(task: dict[str, Path], script: str, processes: int, output: str, loss_type: str = "gpsl") -> Path:
    """Run `script` on `processes` CPU processes for 2 optimiser steps of `GLOBAL_BATCH` samples."""
    out = task["root"] / output
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={free_port()}",
        ]
    )
    args = [
        "--model_name_or_path",
        str(task["backbone"]),
        "--train_file",
        str(task["train"]),
        "--validation_file",
        str(task["train"]),
        "--output_dir",
        str(out),
        "--do_train",
        "--do_eval",
        "--num_train_epochs",
        "0.5",
        "--per_device_train_batch_size",
        str(GLOBAL_BATCH // processes),
        "--per_device_eval_batch_size",
        "8",
        "--max_seq_length",
        "32",
        "--unit_hidden_size",
        "8",
        "--classifier_dropout",
        "0",
        "--loss_type",
        loss_type,
        "--learning_rate",
        "1e-3",
        "--use_cpu",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [*launcher, str(EXAMPLES / script), *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


def assert_same_weights(one: Path, two: Path) -> None:
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_glue_style.py", "train_accelerate.py"])
def test_two_processes_match_one_with_the_same_global_batch(task, script):
    single = train(task, script, 1, f"{script}-1")
    double = train(task, script, 2, f"{script}-2")
    assert_same_weights(single, double)
    untrained = load_file(task["backbone"] / "model.safetensors")
    trained = load_file(single / "model.safetensors")
    assert not torch.equal(
        trained["adnet.backbone.encoder.layer.0.output.dense.weight"], untrained["encoder.layer.0.output.dense.weight"]
    )
    # evaluated over the samples of both processes: the saved model's metrics on the whole set, in 8-sample batches
    results = json.loads((double / "eval_results.json").read_text())
    reference = text_metrics(double, task["train"], 8)
    for name in ("accuracy", "f1", "exit_steps", "executed_layers"):
        assert results[f"eval_{name}"] == pytest.approx(reference[name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, loss_type",
    [
        ("train_accelerate.py", "pondernet"),
        ("train_accelerate.py", "deep_supervision"),
        ("train_accelerate.py", "last"),
        ("run_glue_style.py", "last"),
    ],
)
def test_every_loss_type_trains_on_two_processes(task, script, loss_type):
    """`last` and `deep_supervision` leave the halting layers (and `last` the earlier step heads) without gradient."""
    out = train(task, script, 2, f"{script}-{loss_type}", loss_type)
    assert (out / "model.safetensors").exists()
