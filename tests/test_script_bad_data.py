"""The example scripts on bad data and on output folders that already hold a run: each case is refused with a message
naming the file, row or flag, or handled as Transformers' examples handle it; no run loses saved work.

Checks that live in a function are tested on the function (quick); the scripts themselves run in the slow tier.
"""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import TINY_BERT, gpt2_config
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

from adnet_examples.arguments import GlueDataArguments, resume_checkpoint, start_afresh, train_wordpiece_tokenizer
from adnet_examples.data import (
    check_known_labels,
    check_text_cells,
    label_info,
    load_text_datasets,
    token_blocks,
    tokenize_texts,
)
from adnet_hf import ADNetConfig, ADNetForCausalLM
from adnet_hf.trainer_adnet import ADNetTrainingArguments
from examples import run_clm, run_glue_style, train_accelerate

EXAMPLES = Path(run_glue_style.__file__).resolve().parent
SAMPLE = EXAMPLES / "data" / "sst2_sample"
FAST = [
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "8",
    "--max_seq_length",
    "32",
    "--unit_hidden_size",
    "8",
    "--learning_rate",
    "1e-3",
    "--seed",
    "0",
]


def sst2_rows(count: int, split: str = "train") -> list[list[str]]:
    """The first rows of the SST-2 sample shipped with the examples: `[sentence, label]`."""
    with open(SAMPLE / f"{split}.tsv", encoding="utf-8") as file:
        return list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : count + 1]


def write_tsv(path: Path, rows: list[list[str]], header=("sentence", "label")) -> str:
    path.write_text("\n".join("\t".join(row) for row in [list(header), *rows]) + "\n", encoding="utf-8")
    return str(path)


def load(**files: str) -> datasets.DatasetDict:
    return load_text_datasets(None, files)


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer([sentence for sentence, _ in sst2_rows(40)], 200, 64)


# ---- run_glue_style.py: labels, cells, splits, lengths (quick, on the functions) ----


@pytest.mark.parametrize(
    "rows", [[["a fine film", "1"], ["a good film", "1"]], [["a fine film", "1"]]], ids=["one-class", "one-example"]
)
def test_one_class_training_file_is_refused_not_turned_into_regression(tmp_path, rows):
    train = write_tsv(tmp_path / "train.tsv", rows)
    with pytest.raises(ValueError, match=r"train\.tsv: every 'label' value is 1, .*at least two classes.*floats"):
        label_info(load(train=train)["train"], "label", train)


def test_float_labels_are_regression_even_from_one_example(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [["a fine film", "0.5"]])
    assert label_info(load(train=train)["train"], "label", train).config_kwargs()["problem_type"] == "regression"


@pytest.mark.parametrize(
    "row, column", [(["", "1"], "sentence"), (["a film", ""], "label")], ids=["empty-sentence", "empty-label"]
)
def test_empty_cell_is_refused_with_its_file_and_row(tmp_path, row, column):
    train = write_tsv(tmp_path / "train.tsv", [["a fine film", "1"], ["a dull film", "0"], row])
    with pytest.raises(ValueError, match=rf"train\.tsv: row 3 \(not counting the header\) has an empty '{column}'"):
        check_text_cells(load(train=train), {"train": train}, ("sentence", None), "label")


def test_unlabelled_test_rows_are_allowed_and_a_missing_text_column_is_named(tmp_path):
    test = write_tsv(tmp_path / "test.tsv", [["a fine film", ""], ["a dull film", ""]])
    check_text_cells(load(test=test), {"test": test}, ("sentence", None), "label")
    dev = write_tsv(tmp_path / "dev.tsv", [["a fine film", "1"]], header=("text", "label"))
    with pytest.raises(ValueError, match=r"dev\.tsv has no 'sentence' column; its columns are \['text', 'label'\]"):
        check_text_cells(load(validation=dev), {"validation": dev}, ("sentence", None), "label")


def test_dev_label_unseen_in_training_is_refused(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [["a fine film", "1"], ["a dull film", "0"]])
    dev = write_tsv(tmp_path / "dev.tsv", [["a film", "0"], ["a film", "2"]])
    raw, sources = load(train=train, validation=dev), {"train": train, "validation": dev}
    labels = label_info(raw["train"], "label", train)
    with pytest.raises(
        ValueError,
        match=r"dev\.tsv: row 2 .* has the label 2, which the training data does not "
        r"have; its classes are \['0', '1'\]",
    ):
        check_known_labels(raw, sources, "label", labels)


@pytest.mark.parametrize(
    "flag, split", [("--do_eval", "validation"), ("--do_train", "train"), ("--do_predict", "test")]
)
def test_a_split_without_its_file_is_refused(flag, split):
    files = {name: f"{name}.tsv" for name in ("train", "validation", "test") if name != split}
    data_args = GlueDataArguments(**{f"{name}_file": path for name, path in files.items()})
    with pytest.raises(ValueError, match=f"{flag} needs --{split}_file"):
        data_args.require_files({split: flag})
    GlueDataArguments(task_name="sst2").require_files({split: flag})  # a GLUE task has every split


@pytest.mark.parametrize("max_seq_length, pair, minimum", [(1, False, 3), (2, False, 3), (4, True, 5)])
def test_max_seq_length_below_the_special_tokens_is_refused(tmp_path, tokenizer, max_seq_length, pair, minimum):
    header = ("sentence1", "sentence2", "label") if pair else ("sentence", "label")
    rows = (
        [["a fine film", "a film", "1"], ["a dull film", "a film", "0"]]
        if pair
        else [["a fine film", "1"], ["a dull film", "0"]]
    )
    raw = load(train=write_tsv(tmp_path / "train.tsv", rows, header))
    keys = ("sentence1", "sentence2") if pair else ("sentence", None)
    with pytest.raises(
        ValueError,
        match=rf"--max_seq_length {max_seq_length} leaves no room for text.*at least "
        rf"{minimum}\.",
    ):
        tokenize_texts(raw, tokenizer, keys, "label", label_info(raw["train"], "label"), max_seq_length)
    tokenized = tokenize_texts(raw, tokenizer, keys, None, None, minimum)
    assert len(tokenized["train"][0]["input_ids"]) == minimum


def test_learnt_wordpiece_vocabulary_is_the_same_every_time():
    """The tokenizers trainer numbers `##` pieces in hash-map order: without declaring them, 4 of 5 trainings on these
    texts differed."""
    texts = [sentence for sentence, _ in sst2_rows(200)]
    vocabularies = [train_wordpiece_tokenizer(texts, 500, 64).get_vocab() for _ in range(5)]
    assert all(vocabulary == vocabularies[0] for vocabulary in vocabularies)


# ---- run_clm.py (quick) ----


def test_text_shorter_than_one_block_is_refused(tmp_path, tokenizer):
    path = tmp_path / "valid.txt"
    path.write_text("a fine film", encoding="utf-8")
    count = len(tokenizer("a fine film").input_ids)
    with pytest.raises(
        ValueError,
        match=rf"valid\.txt holds {count} tokens, fewer than one block: pass a --block_size "
        rf"of {count} or less",
    ):
        token_blocks(tokenizer, path, count + 1)
    assert token_blocks(tokenizer, path, count).shape == (1, count)


def test_block_size_beyond_the_position_table_is_refused():
    model = ADNetForCausalLM(ADNetConfig(backbone_config=gpt2_config(), unit_hidden_size=8))
    with pytest.raises(ValueError, match=r"--block_size 65 is longer than the backbone's 64 positions"):
        run_clm.check_block_size(model, 65)
    run_clm.check_block_size(model, 64)
    with pytest.raises(ValueError, match="--block_size must be at least 2"):
        run_clm.DataArguments(block_size=1)


# ---- output folders that already hold a run (quick, on `resume_checkpoint`) ----


def training_args(output_dir: Path, **kwargs) -> ADNetTrainingArguments:
    return ADNetTrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", **kwargs)


def make_checkpoints(output_dir: Path, *steps: int) -> None:
    for step in steps:
        (output_dir / f"checkpoint-{step}").mkdir(parents=True)
        (output_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_fresh_or_empty_output_dir_starts_a_run(tmp_path):
    assert resume_checkpoint(training_args(tmp_path / "new")) is None
    (tmp_path / "empty").mkdir()
    assert resume_checkpoint(training_args(tmp_path / "empty")) is None


def test_output_dir_with_a_run_but_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_text("an earlier run's model")
    with pytest.raises(
        ValueError,
        match=r"already exists and is not empty, and holds no checkpoint.*"
        r"--overwrite_output_dir",
    ):
        resume_checkpoint(training_args(tmp_path))
    assert resume_checkpoint(training_args(tmp_path, overwrite_output_dir=True)) is None
    assert (tmp_path / "model.safetensors").exists()  # overwritten only when the new run saves its own


def test_last_checkpoint_in_output_dir_is_resumed_and_said(tmp_path, caplog):
    make_checkpoints(tmp_path, 2, 10, 4)
    with caplog.at_level(logging.WARNING, logger="adnet_examples.arguments"):
        assert resume_checkpoint(training_args(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert f"Checkpoint detected, resuming training at {tmp_path / 'checkpoint-10'}" in caplog.text
    assert "--overwrite_output_dir to train from scratch" in caplog.text


def test_resume_from_checkpoint_true_takes_the_last_one(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"--resume_from_checkpoint True resumes from the last checkpoint-N folder "
        r"in --output_dir .*, and there is none",
    ):
        resume_checkpoint(training_args(tmp_path, resume_from_checkpoint="True"))
    make_checkpoints(tmp_path, 2, 4)
    assert resume_checkpoint(training_args(tmp_path, resume_from_checkpoint="True")) == str(tmp_path / "checkpoint-4")
    assert resume_checkpoint(
        training_args(tmp_path / "elsewhere", resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    ) == str(tmp_path / "checkpoint-2")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_text("another run's model")
    with pytest.raises(
        ValueError,
        match=r"continues a run from another folder, and --output_dir .*other already holds "
        r"files.*--save_total_limit would rotate",
    ):
        resume_checkpoint(training_args(tmp_path / "other", resume_from_checkpoint=str(tmp_path / "checkpoint-2")))
    with pytest.raises(ValueError, match="--resume_from_checkpoint .*missing: no such folder"):
        resume_checkpoint(training_args(tmp_path, resume_from_checkpoint=str(tmp_path / "missing")))


def test_overwrite_output_dir_removes_the_earlier_checkpoints_and_says_which(tmp_path, caplog):
    """Left in place, an earlier run's checkpoints would be rotated away by `--save_total_limit` among the new run's
    (by step number, whichever run they belong to) and picked up by a later resume."""
    make_checkpoints(tmp_path, 2, 4, 6)
    args = training_args(tmp_path, overwrite_output_dir=True, save_total_limit=1)
    assert resume_checkpoint(args) is None
    assert len(list(tmp_path.iterdir())) == 3, "nothing removed before the run has passed every check"
    with caplog.at_level(logging.WARNING, logger="adnet_examples.arguments"):
        start_afresh(args, inputs=(str(tmp_path / "checkpoint-6"), None))
    assert "removing the earlier run's checkpoints" in caplog.text and "checkpoint-4" in caplog.text
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint-6"], "a checkpoint this run loads is kept"
    with pytest.raises(ValueError, match="pass one of them"):
        resume_checkpoint(training_args(tmp_path, overwrite_output_dir=True, resume_from_checkpoint="True"))


@pytest.mark.parametrize(
    "strategy, steps, interval", [("steps", 4, 4), ("steps", 0.25, 5), ("epoch", 500, 0), ("no", 500, None)]
)
def test_accelerate_loop_checkpoints_when_the_trainer_would(tmp_path, strategy, steps, interval):
    args = training_args(tmp_path, save_strategy=strategy, save_steps=steps)
    assert train_accelerate.checkpoint_interval(args, 20) == interval


def test_accelerate_loop_refuses_a_checkpoint_it_did_not_write(tmp_path):
    make_checkpoints(tmp_path, 2)  # a Trainer checkpoint: no loop position
    with pytest.raises(
        ValueError,
        match=r"checkpoint-2 is not a train_accelerate\.py checkpoint: it has no "
        r"loop_state\.json",
    ):
        train_accelerate.load_checkpoint(None, str(tmp_path / "checkpoint-2"))


# ---- the scripts themselves (slow) ----


def glue_run(tmp_path: Path, train_rows, dev_rows=None, *extra: str, output: str = "out") -> dict:
    """`run_glue_style.py` on a tiny random BERT with a learnt vocabulary, trained on `train_rows`."""
    args = [
        "--backbone_config",
        json.dumps(TINY_BERT),
        "--output_dir",
        str(tmp_path / output),
        "--do_train",
        "--train_file",
        write_tsv(tmp_path / "train.tsv", train_rows),
        *FAST,
        *extra,
    ]
    if dev_rows is not None:
        args += ["--do_eval", "--validation_file", write_tsv(tmp_path / "dev.tsv", dev_rows)]
    return run_glue_style.main(args)


@pytest.mark.slow
@pytest.mark.parametrize(
    "train_rows, dev_rows, extra, message",
    [
        ([["a fine film", "1"], ["a good film", "1"]], None, [], r"train\.tsv: every 'label' value is 1"),
        ([["a fine film", "1"]], None, [], r"train\.tsv: every 'label' value is 1, and classification needs"),
        ([["a fine film", "1"], ["a dull film", "0"]], [["a film", "2"]], [], r"dev\.tsv: row 1 .* has the label 2"),
        ([["a fine film", "1"], ["a dull film", "0"]], None, ["--do_eval"], r"--do_eval needs --validation_file"),
        ([["a fine film", "1"], ["", "0"]], None, [], r"train\.tsv: row 2 .* empty 'sentence' cell"),
        ([["a fine film", "1"], ["a dull film", ""]], None, [], r"train\.tsv: row 2 .* empty 'label' cell"),
        (
            [["a fine film", "1"], ["a dull film", "0"]],
            None,
            ["--max_seq_length", "1"],
            r"--max_seq_length 1 leaves no room for text",
        ),
    ],
    ids=[
        "one-class",
        "one-example",
        "unseen-dev-label",
        "eval-without-file",
        "empty-sentence",
        "empty-label",
        "max-seq-length-1",
    ],
)
def test_run_glue_style_refuses_bad_data_by_name(tmp_path, train_rows, dev_rows, extra, message):
    with pytest.raises(ValueError, match=message):
        glue_run(tmp_path, train_rows, dev_rows, *extra)
    assert not (tmp_path / "out" / "eval_results.json").exists()


def clm_run(tmp_path: Path, shared_data: Path, *extra: str) -> dict:
    return run_clm.main(
        [
            "--backbone_config",
            json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64}),
            "--tokenizer_name",
            str(shared_data / "gpt2-tokenizer"),
            "--output_dir",
            str(tmp_path / "out"),
            "--unit_hidden_size",
            "8",
            "--use_cpu",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            *extra,
        ]
    )


@pytest.mark.slow
def test_run_clm_refuses_a_validation_file_shorter_than_a_block(tmp_path, shared_data):
    short = tmp_path / "valid.txt"
    short.write_text("a short validation text", encoding="utf-8")
    with pytest.raises(ValueError, match=r"valid\.txt holds \d+ tokens, fewer than one block: pass a --block_size"):
        clm_run(tmp_path, shared_data, "--validation_file", str(short), "--do_eval", "--block_size", "32")


@pytest.mark.slow
def test_run_clm_refuses_a_block_beyond_the_position_table(tmp_path, shared_data):
    with pytest.raises(ValueError, match=r"--block_size 128 is longer than the backbone's 64 positions"):
        clm_run(
            tmp_path,
            shared_data,
            "--train_file",
            str(shared_data / "ptb" / "ptb.valid.txt"),
            "--do_train",
            "--block_size",
            "128",
        )


def trained_rows() -> list[list[str]]:
    return sst2_rows(24)


def saved_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


@pytest.mark.slow
def test_run_glue_style_resumes_its_last_checkpoint_and_never_loses_one(tmp_path, caplog):
    """A second run into the same folder resumes from the last checkpoint and says so; `--resume_from_checkpoint
    True` does the same; a folder with only a finished model is refused; the learnt vocabulary comes from the
    checkpoint, whatever the training file now holds."""
    steps = ["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2"]
    glue_run(tmp_path, trained_rows(), None, "--max_steps", "4", *steps)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    first_vocab = AutoTokenizer.from_pretrained(out / "checkpoint-4").get_vocab()

    changed = [[sentence.upper() + " extra words", label] for sentence, label in sst2_rows(24, "dev")]
    with caplog.at_level(logging.WARNING, logger="adnet_examples.arguments"):
        glue_run(tmp_path, changed, None, "--max_steps", "6", *steps)
    assert f"Checkpoint detected, resuming training at {out / 'checkpoint-4'}" in caplog.text
    assert saved_state(out)["global_step"] == 6
    assert AutoTokenizer.from_pretrained(out).get_vocab() == first_vocab

    glue_run(tmp_path, changed, None, "--max_steps", "8", "--resume_from_checkpoint", "True", *steps)
    assert saved_state(out)["global_step"] == 8
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]

    glue_run(tmp_path, trained_rows(), None, "--max_steps", "2", "--save_strategy", "no", output="finished")
    with pytest.raises(ValueError, match="holds no checkpoint to resume from. Use --overwrite_output_dir"):
        glue_run(tmp_path, trained_rows(), None, "--max_steps", "2", "--save_strategy", "no", output="finished")


@pytest.mark.slow
def test_random_backbone_runs_with_the_same_seed_are_identical(tmp_path):
    for output in ("first", "second"):
        glue_run(tmp_path, trained_rows(), None, "--max_steps", "2", "--save_strategy", "no", output=output)
    first, second = (
        load_file(tmp_path / "first" / "model.safetensors"),
        load_file(tmp_path / "second" / "model.safetensors"),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---- train_accelerate.py: checkpoints, and a resume after SIGKILL to the weights of an unbroken run (slow) ----


@pytest.fixture(scope="module")
def accelerate_task(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT checkpoint with dropout (a resume must restore the random state too) and 24 SST-2 rows."""
    root = tmp_path_factory.mktemp("accelerate")
    rows = sst2_rows(24)
    tokenizer = train_wordpiece_tokenizer([sentence for sentence, _ in rows], 200, 64)
    config = {key: value for key, value in TINY_BERT.items() if key != "model_type"}
    BertModel(BertConfig(**{**config, "vocab_size": len(tokenizer)})).save_pretrained(root / "backbone")
    tokenizer.save_pretrained(root / "backbone")
    return {"backbone": root / "backbone", "train": Path(write_tsv(root / "train.tsv", rows)), "root": root}


def accelerate_command(task: dict[str, Path], output: Path, *extra: str) -> list[str]:
    """20 updates of 2 accumulated batches of 4 over 24 rows: 3 updates an epoch, so the run crosses epochs, and a
    checkpoint every 4 updates (mostly within an epoch), 2 kept."""
    return [
        sys.executable,
        str(EXAMPLES / "train_accelerate.py"),
        "--model_name_or_path",
        str(task["backbone"]),
        "--train_file",
        str(task["train"]),
        "--validation_file",
        str(task["train"]),
        "--output_dir",
        str(output),
        "--max_steps",
        "20",
        "--gradient_accumulation_steps",
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "4",
        "--save_total_limit",
        "2",
        *FAST,
        *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_to_end(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def kill_after_first_checkpoint(command: list[str], output: Path) -> list[str]:
    """Start `command`, SIGKILL it as soon as a checkpoint is in `output`; returns the checkpoints left."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 600
        while not list(output.glob("checkpoint-*[0-9]")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    return sorted(p.name for p in output.glob("checkpoint-*[0-9]"))


@pytest.mark.slow
def test_train_accelerate_resumes_after_sigkill_to_the_weights_of_an_unbroken_run(accelerate_task):
    root = accelerate_task["root"]
    run_to_end(accelerate_command(accelerate_task, root / "unbroken"))
    unbroken = root / "unbroken"
    assert sorted(p.name for p in unbroken.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-20"]
    assert json.loads((unbroken / "checkpoint-20" / "loop_state.json").read_text()) == {
        "updates": 20,
        "epoch": 6,
        "batches": 4,
    }
    assert (unbroken / "checkpoint-20" / "model.safetensors").exists()

    killed = root / "killed"
    left = kill_after_first_checkpoint(accelerate_command(accelerate_task, killed), killed)
    assert left and not (killed / "model.safetensors").exists(), "the run ended before it could be killed"
    # within an epoch: the resumed run skips the batches used, with the random state of the moment
    assert json.loads((killed / left[-1] / "loop_state.json").read_text())["batches"] > 0
    result = run_to_end(accelerate_command(accelerate_task, killed))
    assert f"Checkpoint detected, resuming training at {killed / left[-1]}" in result.stdout + result.stderr
    first, second = load_file(unbroken / "model.safetensors"), load_file(killed / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert (
        json.loads((killed / "eval_results.json").read_text())["eval_accuracy"]
        == json.loads((unbroken / "eval_results.json").read_text())["eval_accuracy"]
    )


@pytest.mark.slow
def test_train_accelerate_resume_from_checkpoint_true_and_refusals(accelerate_task, tmp_path):
    output = tmp_path / "run"
    run_to_end(accelerate_command(accelerate_task, output, "--max_steps", "4"))
    run_to_end(accelerate_command(accelerate_task, output, "--max_steps", "8", "--resume_from_checkpoint", "True"))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    finished = tmp_path / "finished"
    run_to_end(accelerate_command(accelerate_task, finished, "--max_steps", "2", "--save_strategy", "no"))
    again = subprocess.run(
        accelerate_command(accelerate_task, finished, "--max_steps", "2"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        check=False,
    )
    assert again.returncode != 0 and "Use --overwrite_output_dir" in again.stderr
