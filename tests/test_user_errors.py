"""A user's own files and flags against `run_glue_style.py`, table-driven, one table per class of mistake:

- lost work: a refused run leaves the output folder exactly as it was (an earlier run's checkpoints and results);
- silently wrong: the data is read by the documented rules (columns, labels, problem type), or refused, or warned
  about, never trained on in a way the user did not mean;
- obscure: every refusal names the file, row, column or flag to change.

Each case fails before any training (tiny random BERT, a vocabulary learnt from a few rows), so the tables run in the
quick tier; the cases that train are marked slow.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT
from transformers import GPT2Tokenizer

from adnet_examples import arguments
from adnet_examples.arguments import build_model
from adnet_examples.data import check_known_labels, load_text_datasets
from adnet_hf import ADNetForCausalLM, ADNetForSequenceClassification
from examples import run_glue_style

FAST = [
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "8",
    "--max_seq_length",
    "32",
    "--unit_hidden_size",
    "8",
    "--seed",
    "0",
]
WORDS = [
    "a fine film",
    "a dull film",
    "a good story",
    "a weak plot",
    "great acting",
    "poor acting",
    "lovely music",
    "tedious scenes",
    "a warm ending",
    "a cold ending",
]


def rows(count: int = 20, labels=("1", "0")) -> list[list[str]]:
    return [[WORDS[i % len(WORDS)], labels[i % len(labels)]] for i in range(count)]


def write(path: Path, header, body) -> str:
    lines = ([] if header is None else ["\t".join(header)]) + ["\t".join(row) for row in body]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def files(tmp_path: Path, train=None, dev=None, header=("sentence", "label"), dev_header=None) -> list[str]:
    """`--train_file` / `--validation_file` flags for TSVs of `train` and `dev` rows (default: 20 labelled rows)."""
    train_file = write(tmp_path / "train.tsv", header, rows() if train is None else train)
    dev_file = write(tmp_path / "dev.tsv", dev_header or header, rows(8) if dev is None else dev)
    return ["--train_file", train_file, "--validation_file", dev_file]


def glue(
    tmp_path: Path, *extra: str, data: list[str] | None = None, output: str = "out", model: list[str] | None = None
) -> dict:
    model = model or ["--backbone_config", json.dumps(TINY_BERT)]
    return run_glue_style.main(
        [
            *model,
            *(files(tmp_path) if data is None else data),
            "--output_dir",
            str(tmp_path / output),
            "--do_train",
            "--do_eval",
            *FAST,
            *extra,
        ]
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """An output folder holding an earlier run: two checkpoints and its results."""
    out = tmp_path / "out"
    for step in (2, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (out / "train_results.json").write_text('{"train_loss": 0.5}')
    (out / "eval_results.json").write_text('{"eval_accuracy": 0.9}')
    return out


def saved_classifier(folder: Path) -> Path:
    """A tiny ADNet checkpoint with its tokenizer, as a first training stage leaves it."""
    model = build_model(ADNetForSequenceClassification, None, dict(TINY_BERT), {"unit_hidden_size": 8})
    model.save_pretrained(folder)
    tokenizer = arguments.train_wordpiece_tokenizer(WORDS, 200, 64)
    tokenizer.save_pretrained(folder)
    return folder


# ---- lost work: a refused run changes nothing in the output folder ----


def bad_train_file(tmp_path):
    return files(tmp_path, train=[["a fine film"]] * 4, dev=[["a film"]] * 2, header=("sentence",))


LOST = {
    "no-label-column": (lambda tmp: bad_train_file(tmp), [], r"No label column"),
    "misspelt-exit-policy": (None, ["--exit_policy", "haltng"], r"exit_policy"),
    "empty-train-file": (
        lambda tmp: [
            "--train_file",
            write(tmp / "e.tsv", None, []),
            "--validation_file",
            write(tmp / "d.tsv", ("sentence", "label"), rows(4)),
        ],
        [],
        r"e\.tsv is empty",
    ),
    "dev-columns-differ": (
        lambda tmp: files(tmp, dev=[["a film", "x", "1"]], dev_header=("text", "other", "label")),
        [],
        r"dev\.tsv has no 'sentence' column: its columns are \['text', 'other', 'label'\], and the run reads "
        r"\['sentence', 'label'\] \(what --train_file .*train\.tsv reads",
    ),
    "zero-epochs": (None, ["--num_train_epochs", "0"], r"--num_train_epochs 0 trains nothing"),
    "calibration-leaves-nothing": (None, ["--calibration_split", "0.99"], r"--calibration_split 0\.99 .* leaves 0"),
    "conflicting-calibration": (
        None,
        ["--exit_policy", "patience", "--calibration_policy", "confidence"],
        r"would save the model with the confidence policy, replacing --exit_policy patience",
    ),
    "unknown-text-column": (None, ["--text_columns", "review"], r"train\.tsv has no 'review' column"),
    "unknown-label-column": (
        None,
        ["--label_column", "stars"],
        r"train\.tsv has no 'stars' column: .*named by --text_columns / --label_column",
    ),
    "mixed-label-spellings": (
        lambda tmp: files(tmp, train=rows(21, ("0", "1", "positive"))),
        [],
        r"mix numbers \(0, 1\) and words \(positive\)",
    ),
    "max-seq-length-1": (None, ["--max_seq_length", "1"], r"--max_seq_length 1 leaves no room for text"),
    "zero-train-samples": (None, ["--max_train_samples", "0"], r"--max_train_samples must be at least 1"),
    "bad-problem-type": (None, ["--problem_type", "ranking"], r"--problem_type must be one of"),
    "missing-dev-file": (
        lambda tmp: [
            "--train_file",
            write(tmp / "t.tsv", ("sentence", "label"), rows()),
            "--validation_file",
            str(tmp / "nowhere.tsv"),
        ],
        [],
        r"--validation_file .*nowhere\.tsv: no such file",
    ),
}


@pytest.mark.parametrize("case", LOST)
def test_a_refused_run_leaves_the_output_folder_as_it_was(tmp_path, earlier_run, case):
    make_data, extra, message = LOST[case]
    before = snapshot(earlier_run)
    with pytest.raises(ValueError, match=message):
        glue(tmp_path, "--overwrite_output_dir", *extra, data=None if make_data is None else make_data(tmp_path))
    assert snapshot(earlier_run) == before


def test_a_second_stage_into_the_first_stages_folder_keeps_the_checkpoint_it_loads(tmp_path, earlier_run):
    """`--model_name_or_path OUT/checkpoint-4 --output_dir OUT --overwrite_output_dir`: the checkpoint is loaded, not
    removed; a refusal after loading it (here, the sequence length) leaves everything in place."""
    checkpoint = saved_classifier(earlier_run / "checkpoint-4")
    before = snapshot(earlier_run)
    with pytest.raises(ValueError, match="--max_seq_length 1 leaves no room"):
        glue(
            tmp_path, "--overwrite_output_dir", "--max_seq_length", "1", model=["--model_name_or_path", str(checkpoint)]
        )
    assert snapshot(earlier_run) == before
    arguments.start_afresh(
        arguments.RecipeTrainingArguments(output_dir=str(earlier_run), overwrite_output_dir=True, report_to="none"),
        inputs=(str(checkpoint), None),
    )
    assert sorted(path.name for path in earlier_run.glob("checkpoint-*")) == ["checkpoint-4"]


def test_an_evaluation_only_run_never_overwrites_a_training_runs_results(tmp_path, earlier_run):
    checkpoint = saved_classifier(tmp_path / "model")
    before = snapshot(earlier_run)
    with pytest.raises(
        ValueError,
        match=r"holds a training run's results \(train_results\.json\).*another "
        r"--output_dir",
    ):
        run_glue_style.main(
            [
                "--model_name_or_path",
                str(checkpoint),
                *files(tmp_path),
                "--output_dir",
                str(earlier_run),
                "--do_eval",
                *FAST,
            ]
        )
    assert snapshot(earlier_run) == before


@pytest.mark.slow
def test_a_failure_after_training_saves_the_trained_model_first(tmp_path, monkeypatch, caplog):
    def broken_fit(self, trainer, dataset):
        raise RuntimeError("the halting fit broke")

    monkeypatch.setattr(arguments.HaltingFitArguments, "fit", broken_fit)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="the halting fit broke"):
        glue(tmp_path, "--num_train_epochs", "1")
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert f"the trained model is saved in {out}" in caplog.text
    ADNetForSequenceClassification.from_pretrained(out)


# ---- silently wrong: each layout and label spelling read by the stated rule, or refused, or warned about ----


def read(tmp_path: Path, header, body, *flags: str):
    """(text columns, label column, label info) as the script reads a training file with `flags`."""
    data_args = arguments.GlueDataArguments(
        train_file=write(tmp_path / "train.tsv", header, body), **dict(zip(flags[::2], flags[1::2]))
    )
    raw = load_text_datasets(None, data_args.files())
    keys, label = data_args.columns(raw["train"].column_names)
    return keys, label, arguments.label_info(raw["train"], label, "train.tsv", data_args.problem_type)


PAIR = [["what is it", "it is a film", "entailment"], ["who made it", "a dull film", "not_entailment"]] * 5
SILENT = {
    "qnli-question-first": (
        ("index", "question", "sentence", "label"),
        [[str(i), *row] for i, row in enumerate(PAIR)],
        (),
        (("question", "sentence"), "label"),
        ["entailment", "not_entailment"],
    ),
    "qqp-layout": (
        ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        [[str(i), "1", "2", "how", "why", str(i % 2)] for i in range(10)],
        (),
        (("question1", "question2"), "is_duplicate"),
        ["0", "1"],
    ),
    "mnli-gold-label": (
        ("index", "sentence1", "sentence2", "label1", "gold_label"),
        [[str(i), "a", "b", "x", ("neutral", "contradiction", "entailment")[i % 3]] for i in range(9)],
        (),
        (("sentence1", "sentence2"), "gold_label"),
        ["contradiction", "entailment", "neutral"],
    ),
    "whole-float-labels-are-classes": (
        ("sentence", "label"),
        rows(10, ("0.0", "1.0")),
        (),
        (("sentence", None), "label"),
        ["0", "1"],
    ),
    "problem-type-regression-overrides": (
        ("sentence", "label"),
        rows(10, ("0", "1", "2")),
        ("problem_type", "regression"),
        (("sentence", None), "label"),
        None,
    ),
    "fractional-floats-are-regression": (
        ("sentence", "score"),
        rows(10, ("0.5", "3.25")),
        (),
        (("sentence", None), "score"),
        None,
    ),
    "text-columns-flag": (
        ("review", "title", "stars"),
        [["good", "t", "1"], ["bad", "t", "0"]] * 5,
        ("text_columns", ["review"], "label_column", "stars"),
        (("review", None), "stars"),
        ["0", "1"],
    ),
    "pair-text-columns-flag": (
        ("a", "b", "label"),
        [["x", "y", "1"], ["y", "x", "0"]] * 5,
        ("text_columns", ["a", "b"]),
        (("a", "b"), "label"),
        ["0", "1"],
    ),
    "text-column": (("text", "label"), rows(10), (), (("text", None), "label"), ["0", "1"]),
    "string-classes": (
        ("sentence", "label"),
        rows(10, ("pos", "neg")),
        (),
        (("sentence", None), "label"),
        ["neg", "pos"],
    ),
    "problem-type-classes-on-floats": (
        ("sentence", "label"),
        rows(10, ("0.5", "1.5")),
        ("problem_type", "single_label_classification"),
        (("sentence", None), "label"),
        ["0.5", "1.5"],
    ),
}


@pytest.mark.parametrize("case", SILENT)
def test_columns_labels_and_problem_type_follow_the_stated_rules(tmp_path, case):
    header, body, flags, expected_columns, classes = SILENT[case]
    keys, label, labels = read(tmp_path, header, body, *flags)
    assert (keys, label) == expected_columns
    assert labels.is_regression == (classes is None)
    if classes is not None:
        assert labels.names == classes


def test_gluelike_files_as_distributed_are_read(tmp_path):
    """A quoted comma in a .csv text; MNLI's dev file with more label columns than its training file; a test file
    with GLUE's -1 placeholder labels; CoLA's headerless train and dev beside its test file, which has a header."""
    csv_file = tmp_path / "train.csv"
    csv_file.write_text('sentence,label\n"a fine, long film",1\n"a dull, short film",0\n', encoding="utf-8")
    data_args = arguments.GlueDataArguments(train_file=str(csv_file))
    data_args.check_files()
    assert load_text_datasets(None, data_args.files())["train"][0]["sentence"] == "a fine, long film"
    header = ("index", "sentence1", "sentence2", "label1", "gold_label")
    body = [[str(i), "a", "b", "neutral", ("neutral", "entailment")[i % 2]] for i in range(4)]
    train = write(tmp_path / "mnli_train.tsv", header, body)
    dev = write(tmp_path / "mnli_dev.tsv", (*header[:4], "label2", "gold_label"), [[*r[:4], "x", r[4]] for r in body])
    test = write(tmp_path / "mnli_test.tsv", ("index", "sentence1", "sentence2"), [["0", "a", "b"]])
    arguments.GlueDataArguments(train_file=train, validation_file=dev, test_file=test).check_files()
    cola = [["gj04", str(i % 2), "", WORDS[i]] for i in range(6)]
    files = {
        "train": write(tmp_path / "cola_train.tsv", None, cola),
        "test": write(tmp_path / "cola_test.tsv", ("index", "sentence"), [["0", "a film"]]),
    }
    raw = load_text_datasets(None, files)
    assert raw["train"].column_names == ["source", "label", "original_label", "sentence"]
    assert raw["test"].column_names == ["index", "sentence"]
    labelled = {
        "train": write(tmp_path / "t.tsv", ("sentence", "label"), rows(4)),
        "test": write(tmp_path / "p.tsv", ("sentence", "label"), [["a film", "-1"]]),
    }
    raw = load_text_datasets(None, labelled)
    check_known_labels(raw, labelled, "label", arguments.label_info(raw["train"], "label"))


def test_cola_files_without_a_header_are_read_with_colas_columns(tmp_path):
    train = write(
        tmp_path / "train.tsv", None, [["gj04", str(i % 2), "" if i % 2 else "*", WORDS[i]] for i in range(10)]
    )
    raw = load_text_datasets(None, {"train": train})
    assert raw["train"].column_names == ["source", "label", "original_label", "sentence"]
    assert len(raw["train"]) == 10 and raw["train"][0]["sentence"] == WORDS[0]


@pytest.mark.parametrize(
    "body, message",
    [
        (rows(10, ("0.0", "1.0")), r"floats that are all whole numbers, read as classes"),
        (rows(300) + [["an odd film", "2"]], r"the 'label' class 2 has 1 of 301 rows: a typo\?"),
    ],
    ids=["whole-floats-note", "stray-class"],
)
def test_a_doubtful_label_reading_is_warned_about(tmp_path, caplog, body, message):
    with caplog.at_level(logging.WARNING, logger="adnet_examples.data"):
        read(tmp_path, ("sentence", "label"), body)
    assert caplog.records and __import__("re").search(message, caplog.text)


def test_training_on_the_evaluation_file_is_warned_about(tmp_path, caplog):
    train = write(tmp_path / "train.tsv", ("sentence", "label"), rows())
    dev = write(tmp_path / "dev.tsv", ("sentence", "label"), rows())
    with caplog.at_level(logging.WARNING, logger="adnet_examples.arguments"):
        arguments.GlueDataArguments(train_file=train, validation_file=dev).check_files()
    assert "holds the same rows as --train_file" in caplog.text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_train_epochs", "0"], r"--num_train_epochs 0 trains nothing"),
        (["--max_eval_samples", "0"], r"--max_eval_samples must be at least 1"),
        (["--fit_halting_samples", "0"], r"--fit_halting_samples must be at least 1"),
        (["--fit_halting_split", "1.5"], r"--fit_halting_split must be a fraction in \(0, 1\)"),
        (["--calibration_budget", "-1"], r"--calibration_budget must be >= 0"),
        (["--text_columns", "a", "b", "c"], r"--text_columns takes one column or the two of a pair"),
        (["--exit_policy", "confidence", "--calibration_policy", "halting"], r"replacing --exit_policy confidence"),
    ],
    ids=[
        "zero-epochs",
        "zero-eval-samples",
        "zero-fit-samples",
        "fit-split",
        "negative-budget",
        "three-text-columns",
        "calibration-replaces-policy",
    ],
)
def test_contradictory_or_impossible_flags_are_refused_at_parse_time(tmp_path, flags, message):
    """Refused before any data is read or model built: the flags come first."""
    with pytest.raises(ValueError, match=message):
        args = run_glue_style.parse_args(
            ["--backbone_config", "{}", "--train_file", "t.tsv", "--output_dir", str(tmp_path), "--do_train", *flags]
        )
        args[-1].check_exit_policy(args[1].exit_policy)


# ---- obscure: every refusal names what to change ----


def corrupt(tmp_path: Path, name: str, content: bytes) -> Path:
    folder = saved_classifier(tmp_path / "model")
    (folder / name).write_bytes(content)
    return folder


OBSCURE = {
    "header-only-file": (
        lambda tmp: [
            "--train_file",
            write(tmp / "h.tsv", ("sentence", "label"), []),
            "--validation_file",
            write(tmp / "d.tsv", ("sentence", "label"), rows(4)),
        ],
        None,
        r"--train_file .*h\.tsv has a header but no rows",
    ),
    "row-missing-a-field": (
        lambda tmp: files(tmp, train=[*rows(5), ["a film without its label"], *rows(5)]),
        None,
        r"--train_file .*train\.tsv: row 6 \(not counting the header\) has 1 fields, the header "
        r"2",
    ),
    "mistyped-local-path": (
        None,
        lambda tmp: ["--model_name_or_path", str(tmp / "outptus" / "run")],
        r"--model_name_or_path .*outptus/run: no such folder",
    ),
    "relative-mistyped-path": (
        None,
        lambda tmp: ["--model_name_or_path", "./outptus/run"],
        r"--model_name_or_path \./outptus/run: no such folder",
    ),
    "hub-id-offline": (
        None,
        lambda tmp: ["--model_name_or_path", "nobody/no-such-model-here"],
        r"--model_name_or_path nobody/no-such-model-here: not a loadable local folder, nor loadable "
        r"from the Hugging Face Hub",
    ),
    "corrupt-config": (
        None,
        lambda tmp: ["--model_name_or_path", str(corrupt(tmp, "config.json", b'{"model_'))],
        r"--model_name_or_path .*model: config\.json is not valid JSON",
    ),
    "corrupt-weights": (
        None,
        lambda tmp: ["--model_name_or_path", str(corrupt(tmp, "model.safetensors", b"\x00" * 9))],
        r"--model_name_or_path .*model: model\.safetensors is not a readable safetensors file",
    ),
    "model-path-is-a-file": (
        None,
        lambda tmp: ["--model_name_or_path", write(tmp / "weights.bin", None, [])],
        r"weights\.bin: no such folder",
    ),
    "missing-tokenizer": (
        None,
        lambda tmp: ["--backbone_config", json.dumps(TINY_BERT), "--tokenizer_name", str(tmp / "no-tokenizer")],
        r"--tokenizer_name .*no-tokenizer: no such",
    ),
    "unlabelled-train-file": (
        lambda tmp: bad_train_file(tmp),
        None,
        r"No label column among \['sentence'\]: "
        r"expected one of .*--label_column",
    ),
    "unseen-dev-label": (
        lambda tmp: files(tmp, dev=[["a film", "7"]]),
        None,
        r"dev\.tsv: row 1 \(not counting the header\) has the label 7",
    ),
    "missing-train-file": (
        lambda tmp: [
            "--train_file",
            str(tmp / "train.csv"),
            "--validation_file",
            write(tmp / "d.tsv", ("sentence", "label"), rows(4)),
        ],
        None,
        r"--train_file .*train\.csv: no such file",
    ),
}


@pytest.mark.parametrize("case", OBSCURE)
def test_every_refusal_names_what_to_change(tmp_path, case):
    make_data, make_model, message = OBSCURE[case]
    with pytest.raises(ValueError, match=message):
        glue(
            tmp_path,
            data=None if make_data is None else make_data(tmp_path),
            model=None if make_model is None else make_model(tmp_path),
        )


def test_generate_takes_a_tokenizers_output_with_assistant_early_exit(tiny_lm_and_tokenizer):
    """`model.generate(**tokenizer(prompt, return_tensors="pt"), assistant_early_exit=k)`, as Transformers' own."""
    model, tokenizer = tiny_lm_and_tokenizer
    inputs = tokenizer("the film was", return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    drafted = model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_early_exit=1)
    assert torch.equal(plain, drafted)
    with pytest.raises(ValueError, match="Pass the prompt once"):
        model.generate(inputs["input_ids"], input_ids=inputs["input_ids"], assistant_early_exit=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="does not take token_type_ids"):
        model.generate(
            **inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]), assistant_early_exit=1, max_new_tokens=2
        )


@pytest.fixture
def tiny_lm_and_tokenizer(shared_data):
    tokenizer = GPT2Tokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    torch.manual_seed(0)
    model = build_model(
        ADNetForCausalLM,
        None,
        {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 32,
            "n_head": 4,
            "n_positions": 64,
            "vocab_size": len(tokenizer),
        },
        {"unit_hidden_size": 8},
    )
    return model.eval(), tokenizer
