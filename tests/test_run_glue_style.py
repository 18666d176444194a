"""The example script end to end on tiny TSV/CSV files, with tiny random backbones (no MiniLM, no Hub)."""

import csv
import json
import math
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pytest
from conftest import TINY_BERT, assert_loads_as_remote_code, text_metrics
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizer

from adnet_examples import arguments as arguments_adnet
from adnet_examples.arguments import build_model, train_wordpiece_tokenizer
from adnet_examples.data import detect_columns, load_text_datasets
from adnet_hf import ADNetForSequenceClassification
from examples import run_glue_style

SAMPLE = Path(run_glue_style.__file__).resolve().parent / "data" / "sst2_sample"
FAST = [
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "16",
    "--max_seq_length",
    "32",
    "--unit_hidden_size",
    "8",
    "--learning_rate",
    "1e-3",
    "--seed",
    "0",
]


def sst2_rows(split: str, count: int) -> list[list[str]]:
    """The first rows of the SST-2 sample shipped with the examples: `[sentence, label]`."""
    with open(SAMPLE / f"{split}.tsv", encoding="utf-8") as file:
        return list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : count + 1]


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> str:
    path.write_text("\n".join("\t".join(row) for row in [header, *rows]) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_sst2_tsv_train_eval_predict_then_reload(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], sst2_rows("train", 48))
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sst2_rows("dev", 24))
    test = write_tsv(tmp_path / "test.tsv", ["sentence"], [[s] for s, _ in sst2_rows("dev", 8)])
    out = tmp_path / "out"
    metrics = run_glue_style.main(
        [
            "--backbone_config",
            json.dumps(TINY_BERT),
            "--train_file",
            train,
            "--validation_file",
            dev,
            "--test_file",
            test,
            "--output_dir",
            str(out),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--num_train_epochs",
            "1",
            "--max_weight_norm",
            "1.0",
            "--unit_learning_rate",
            "3e-3",
            "--min_learning_rate_ratio",
            "0.1",
            *FAST,
        ]
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert results == metrics  # what the run returns is what it saved
    saved = text_metrics(out, dev, 16)
    for name in ("accuracy", "f1", "exit_steps", "executed_layers"):
        assert results[f"eval_{name}"] == pytest.approx(saved[name]), name
    assert results["eval_num_blocks"] == 4 and results["eval_samples"] == 24
    assert math.isfinite(results["eval_samples_per_second"])
    predictions = (out / "predict_results.tsv").read_text().splitlines()
    assert len(predictions) == 9 and predictions[1].split("\t")[1] in ("0", "1")
    assert (out / "README.md").exists()

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.model_type == "adnet" and model.config.max_weight_norm == 1.0
    assert model.config.id2label == {0: "0", 1: "1"}

    # an ADNet checkpoint loads as it is, with config overrides: full depth now
    reloaded = run_glue_style.main(
        [
            "--model_name_or_path",
            str(out),
            "--validation_file",
            dev,
            "--do_eval",
            "--exit_policy",
            "none",
            "--output_dir",
            str(tmp_path / "eval"),
            *FAST,
        ]
    )
    full_depth = text_metrics(out, dev, 16, exit_policy="none")
    assert reloaded["eval_accuracy"] == full_depth["accuracy"] and reloaded["eval_executed_layers"] == 4

    # the second stage: only the exits train, so full-depth predictions stay exactly the first stage's
    second = run_glue_style.main(
        [
            "--model_name_or_path",
            str(out),
            "--freeze_full_depth",
            "--loss_type",
            "pondernet",
            "--train_file",
            train,
            "--validation_file",
            dev,
            "--do_train",
            "--do_eval",
            "--num_train_epochs",
            "1",
            "--exit_policy",
            "none",
            "--output_dir",
            str(tmp_path / "second"),
            *FAST,
        ]
    )
    assert second["eval_loss"] == pytest.approx(reloaded["eval_loss"], abs=1e-6)
    assert second["eval_accuracy"] == reloaded["eval_accuracy"]
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "second").config.loss_type == "pondernet"


@pytest.mark.slow
def test_exits_calibrated_on_held_out_training_data_are_saved_and_evaluated(tmp_path):
    """`--calibration_split`: a quarter of the training rows is held out of training, the saved `halting` setting
    and its guarantee are chosen on it, and `eval_results.json` reports the dev set under that setting and at full
    depth; `--fit_halting_split` holds a quarter of the rest out too, and the units are fitted on it."""
    train = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], sst2_rows("train", 64))
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sst2_rows("dev", 24))
    out = tmp_path / "out"
    metrics = run_glue_style.main(
        [
            "--backbone_config",
            json.dumps(TINY_BERT),
            "--train_file",
            train,
            "--validation_file",
            dev,
            "--output_dir",
            str(out),
            "--do_train",
            "--do_eval",
            "--num_train_epochs",
            "1",
            "--calibration_split",
            "0.25",
            "--calibration_budget",
            "0.25",
            "--calibration_delta",
            "0.1",
            "--fit_halting_split",
            "0.25",
            *FAST,
        ]
    )
    calibration = json.loads((out / "calibration_results.json").read_text())
    train_results = json.loads((out / "train_results.json").read_text())
    assert calibration["calibration_samples"] == 16 and train_results["train_samples"] == 36
    fit = json.loads((out / "halting_fit_results.json").read_text())
    assert (fit["halting_fit_samples"], fit["halting_fit_held_out"], fit["halting_fit_objective"]) == (
        12,
        True,
        "settled_by",
    )
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert all(unit.halting.weight.abs().sum() == 0 for unit in model.base_model.units[:-1]), "fitted before saving"
    guarantee = model.config.exit_guarantee
    assert guarantee == calibration["guarantee"] and guarantee["calibration_size"] == 16
    assert (guarantee["budget"], guarantee["delta"], guarantee["metric"]) == (0.25, 0.1, "accuracy")
    assert model.config.exit_policy == guarantee["policy"] == calibration["policy"] == metrics["eval_exit_policy"]
    if guarantee["policy"] == "halting":
        assert model.config.halting_epsilon == guarantee["value"] == metrics["eval_exit_setting"]
    saved, full = text_metrics(out, dev, 16), text_metrics(out, dev, 16, exit_policy="none")
    for name in ("accuracy", "executed_layers"):
        assert metrics[f"eval_{name}"] == pytest.approx(saved[name]), name
        assert metrics[f"eval_full_depth_{name}"] == pytest.approx(full[name]), name
    assert metrics["eval_full_depth_executed_layers"] == 4
    assert json.loads((out / "eval_results.json").read_text()) == metrics


def test_calibration_arguments_are_checked_before_training():
    from adnet_examples.arguments import CalibrationArguments, TextModelArguments

    for bad, match in [
        ({"calibration_split": 1.0}, "--calibration_split must be a fraction in"),
        ({"calibration_split": -0.1}, "--calibration_split must be a fraction in"),
        ({"calibration_policy": "none"}, "--calibration_policy must be one of"),
        ({"calibration_delta": 1.0}, r"--calibration_delta must be in \[0, 1\)"),
        ({"calibration_budget": -0.01}, "--calibration_budget must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            CalibrationArguments(**bad)
    model = build_model(ADNetForSequenceClassification, None, dict(TINY_BERT), {"unit_hidden_size": 8, "num_labels": 1})
    adnet = TextModelArguments(backbone_config="{}")
    with pytest.raises(ValueError, match="--calibration_split holds data out of training.*--do_train"):
        CalibrationArguments(calibration_split=0.2).resolve(model, adnet, do_train=False, rows=1000)
    with pytest.raises(ValueError, match=r"--calibration_split .* \(not --plain_baseline\)"):
        CalibrationArguments(calibration_split=0.2).resolve(
            model, TextModelArguments(backbone_config="{}", plain_baseline=True), do_train=True, rows=1000
        )
    with pytest.raises(ValueError, match="--calibration_policy='confidence' needs class predictions"):
        CalibrationArguments(calibration_policy="confidence").resolve(model, adnet, do_train=True, rows=1000)
    with pytest.raises(
        ValueError, match="--calibration_policy confidence would save .* replacing --exit_policy patience"
    ):
        CalibrationArguments(calibration_policy="confidence").check_exit_policy("patience")
    CalibrationArguments(calibration_policy="confidence", calibration_split=0).check_exit_policy("patience")


@pytest.mark.parametrize(
    "given, do_train, plain, rows, expected",
    [
        (None, True, False, 1000, 0.2),  # the default: a fifth held out
        (None, True, False, 499, None),  # too few rows to hold out
        (None, False, False, 1000, None),  # nothing trained
        (None, True, True, 1000, None),  # a plain model has no exits
        (0.0, True, False, 1000, None),  # turned off
        (0.3, True, False, 100, 0.3),  # given: taken whatever the size
    ],
)
def test_calibration_split_default(given, do_train, plain, rows, expected):
    from adnet_examples.arguments import CalibrationArguments, TextModelArguments

    model = build_model(ADNetForSequenceClassification, None, dict(TINY_BERT), {"unit_hidden_size": 8})
    if plain:  # the backbone's own model: no exit policy to read
        model = AutoModelForSequenceClassification.from_config(
            BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"})
        )
    args = CalibrationArguments(calibration_split=given)
    args.resolve(model, TextModelArguments(backbone_config="{}", plain_baseline=plain), do_train, rows)
    assert args.calibration_split == expected
    assert args.calibration_policy == (None if plain or not do_train else "halting")
    assert (args.skipped is None) == (expected is not None)


def test_calibration_policy_defaults_to_the_models_exit_policy():
    from adnet_examples.arguments import CalibrationArguments, TextModelArguments

    model = build_model(
        ADNetForSequenceClassification, None, dict(TINY_BERT), {"unit_hidden_size": 8, "exit_policy": "confidence"}
    )
    args = CalibrationArguments()
    args.resolve(model, TextModelArguments(backbone_config="{}"), do_train=True, rows=1000)
    assert (args.calibration_policy, args.calibration_split) == ("confidence", 0.2)
    model.config.exit_policy = "none"
    args = CalibrationArguments()
    args.resolve(model, TextModelArguments(backbone_config="{}"), do_train=True, rows=1000)
    assert args.calibration_split is None and "exit policy is `none`" in args.skipped


def test_halting_fit_arguments_are_checked_before_training():
    from adnet_examples.arguments import HaltingFitArguments

    for bad, match in [
        ({"fit_halting_split": 1.0}, "--fit_halting_split must be a fraction in"),
        ({"fit_halting_objective": "hazard"}, "--fit_halting_objective must be one of"),
        ({"fit_halting_samples": 0}, "--fit_halting_samples must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            HaltingFitArguments(**bad)
    classifier = build_model(ADNetForSequenceClassification, None, dict(TINY_BERT), {"unit_hidden_size": 8})
    regressor = build_model(
        ADNetForSequenceClassification, None, dict(TINY_BERT), {"unit_hidden_size": 8, "num_labels": 1}
    )
    args = HaltingFitArguments(fit_halting_split=0.1)
    args.resolve(classifier, do_train=True, rows=100)
    for model, do_train, fit, match in [
        (classifier, False, True, "needs --do_train and --fit_halting"),
        (classifier, True, False, "needs --do_train and --fit_halting"),
        (regressor, True, True, "fit_halting needs a classifier"),
    ]:
        with pytest.raises(ValueError, match=f"--fit_halting_split holds data out of training.*{match}"):
            HaltingFitArguments(fit_halting=fit, fit_halting_split=0.1).resolve(model, do_train, rows=1000)
    train = datasets.Dataset.from_dict({"x": list(range(100))})
    kept, held_out = args.split(train, seed=0)
    assert (len(kept), len(held_out)) == (90, 10) and not set(kept["x"]) & set(held_out["x"])
    assert held_out["x"] == args.split(train, seed=0)[1]["x"], "the same rows for every stage of a recipe"
    assert HaltingFitArguments().split(train, seed=0) == (train, None)
    for model, rows, expected in [(classifier, 1000, 0.1), (classifier, 499, None), (regressor, 1000, None)]:
        automatic = HaltingFitArguments()
        automatic.resolve(model, do_train=True, rows=rows)
        assert automatic.fit_halting_split == expected


def test_saved_exit_policy_follows_what_is_trained(tmp_path):
    """`--loss_type last` trains no exits, so its model is saved to run at full depth; a `--freeze_full_depth` run
    trains only the exits and saves `halting`; a given `--exit_policy` always wins."""

    def build(name_or_path, overrides, freeze=False):
        backbone = None if name_or_path else dict(TINY_BERT)
        return build_model(
            ADNetForSequenceClassification,
            name_or_path,
            backbone,
            {"unit_hidden_size": 8, **overrides},
            freeze_full_depth=freeze,
        )

    first = build(None, {"loss_type": "last"})
    assert first.config.exit_policy == "none"
    first.save_pretrained(tmp_path / "first")
    assert build(str(tmp_path / "first"), {"loss_type": "gpsl"}, freeze=True).config.exit_policy == "halting"
    assert build(str(tmp_path / "first"), {}).config.exit_policy == "none"
    assert build(None, {"loss_type": "last", "exit_policy": "confidence"}).config.exit_policy == "confidence"
    assert build(None, {}).config.exit_policy == "halting"


@pytest.mark.slow
def test_sentence_pair_regression_from_json_args_and_backbone_checkpoint(tmp_path):
    """STS-B-like pairs with a float `score`: regression; the backbone is a plain BERT checkpoint folder."""
    sentences = [s for s, _ in sst2_rows("dev", 40)]
    rows = [[a, b, f"{(i % 11) / 2:.1f}"] for i, (a, b) in enumerate(zip(sentences[:20], sentences[20:]))]
    train = write_tsv(tmp_path / "train.tsv", ["sentence1", "sentence2", "score"], rows)
    backbone = tmp_path / "backbone"
    tokenizer = train_wordpiece_tokenizer(sentences, 200, 64)
    BertModel(BertConfig(**{**TINY_BERT, "vocab_size": len(tokenizer)})).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)

    args = {
        "model_name_or_path": str(backbone),
        "train_file": train,
        "validation_file": train,
        "output_dir": str(tmp_path / "out"),
        "do_train": True,
        "do_eval": True,
        "num_train_epochs": 1,
        "use_cpu": True,
        "disable_tqdm": True,
        "report_to": "none",
        "save_strategy": "no",
        "per_device_train_batch_size": 10,
        "max_seq_length": 32,
        "unit_hidden_size": 8,
        "learning_rate": 1e-3,
        "calibration_split": 0.25,
        "calibration_budget": 0.05,
    }
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps(args))
    metrics = run_glue_style.main([str(args_file)])
    saved = text_metrics(tmp_path / "out", train, 8)  # Trainer's default evaluation batch
    for name in ("pearson", "spearman", "mse", "executed_layers"):
        assert metrics[f"eval_{name}"] == pytest.approx(saved[name]), name
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    # no risk-control bound for regression: calibrated empirically (relative MSE), with no guarantee
    calibration = json.loads((tmp_path / "out" / "calibration_results.json").read_text())
    assert (calibration["metric"], calibration["guarantee"], calibration["calibration_samples"]) == ("mse", None, 5)
    assert model.config.exit_guarantee is None and model.config.exit_policy == calibration["policy"]


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["sentence", "label"], (("sentence", None), "label")),
        (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], (("#1 String", "#2 String"), "Quality")),
        (["genre", "sentence1", "sentence2", "score"], (("sentence1", "sentence2"), "score")),
        (["index", "sentence"], (("sentence", None), None)),
        (["index", "question", "sentence", "label"], (("question", "sentence"), "label")),  # QNLI
        (
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            (("question1", "question2"), "is_duplicate"),
        ),
        (
            ["index", "genre", "sentence1", "sentence2", "label1", "gold_label"],
            (("sentence1", "sentence2"), "gold_label"),
        ),
        (["text", "label"], (("text", None), "label")),
    ],
)
def test_column_detection(columns, expected):
    assert detect_columns(columns) == expected


def test_unknown_columns_fail_clearly():
    with pytest.raises(ValueError, match="No text columns"):
        detect_columns(["review", "label"])


def test_glue_task_without_hub_fails_clearly(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match="--train_file"):
        load_text_datasets("sst2", {})


def test_no_arguments_run_the_offline_default(monkeypatch):
    """The README's main command: the arguments shipped in examples/data on the sample, with MiniLM where it is
    installed and a small random BERT where it is not."""
    model_args, adnet_args, data_args, training_args, lora_args, fit_args, calibration_args = run_glue_style.parse_args(
        []
    )
    assert lora_args.lora_r is None  # full fine-tuning unless --lora_r
    # the demo's file holds the demo only (data, output, epochs, length); the recipe is every run's default
    shipped = json.loads(run_glue_style.OFFLINE_DEFAULT.read_text())
    assert set(shipped) == {
        "train_file",
        "validation_file",
        "output_dir",
        "overwrite_output_dir",
        "do_train",
        "do_eval",
        "max_seq_length",
        "num_train_epochs",
    }
    assert (training_args.unit_learning_rate, training_args.output_learning_rate) == (1e-3, 1e-3)
    assert (training_args.min_learning_rate_ratio, training_args.warmup_steps) == (0.1, 0.1)
    assert (training_args.weight_decay, training_args.per_device_train_batch_size) == (0.01, 32)
    assert adnet_args.max_weight_norm is None  # left to the recipe's new-model default (RECIPE_MODEL_DEFAULTS)
    # held-out splits and the calibrated policy are settled once the model and data are known (`resolve`)
    assert (fit_args.fit_halting, fit_args.fit_halting_split, fit_args.fit_halting_objective) == (
        True,
        None,
        "settled_by",
    )
    assert (calibration_args.calibration_split, calibration_args.calibration_policy) == (None, None)
    assert (calibration_args.calibration_budget, calibration_args.calibration_delta) == (0.01, 0.1)
    assert Path(data_args.train_file) == SAMPLE / "train.tsv" and Path(data_args.validation_file).exists()
    assert training_args.output_dir == "outputs/sst2-adnet" and training_args.do_train and training_args.do_eval
    assert training_args.overwrite_output_dir  # a demo: run again, it trains afresh (it saves no checkpoints)
    monkeypatch.setattr(arguments_adnet, "minilm_path", lambda: None)
    model_args = run_glue_style.parse_args([])[0]
    assert model_args.model_name_or_path is None and json.loads(model_args.backbone_config)["model_type"] == "bert"


@pytest.mark.slow
def test_plain_baseline_fine_tunes_the_backbone_head_at_full_depth(tmp_path):
    """`--plain_baseline`: the reference run, the backbone's own classification model and Trainer, no units."""
    train = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], sst2_rows("train", 32))
    test = write_tsv(tmp_path / "test.tsv", ["sentence"], [[s] for s, _ in sst2_rows("dev", 8)])
    out = tmp_path / "out"
    metrics = run_glue_style.main(
        [
            "--backbone_config",
            json.dumps(TINY_BERT),
            "--plain_baseline",
            "--train_file",
            train,
            "--validation_file",
            train,
            "--test_file",
            test,
            "--output_dir",
            str(out),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--num_train_epochs",
            "1",
            *FAST,
        ]
    )
    assert metrics["eval_accuracy"] == pytest.approx(text_metrics(out, train, 16)["accuracy"])
    assert metrics["eval_num_blocks"] == 4 and "eval_executed_layers" not in metrics
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.model_type == "bert" and not hasattr(model, "units")
    rows = (out / "predict_results.tsv").read_text().splitlines()
    assert len(rows) == 9 and rows[1].endswith("\t4")


@pytest.mark.slow
def test_push_to_hub_commits_a_folder_that_loads_as_remote_code(tmp_path, monkeypatch):
    """`--push_to_hub` with the Hub client patched to capture the upload; the captured folder then loads with
    `trust_remote_code=True` in a fresh process that cannot import adnet_hf, and predicts as the trained model."""
    captured = tmp_path / "hub"

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = sorted(str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file())
        for name in huggingface_hub.utils.filter_repo_objects(
            files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        ):
            (captured / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder_path) / name, captured / name)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    train = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], sst2_rows("train", 16))
    run_glue_style.main(
        [
            "--backbone_config",
            json.dumps(TINY_BERT),
            "--train_file",
            train,
            "--output_dir",
            str(tmp_path / "out"),
            "--do_train",
            "--num_train_epochs",
            "1",
            "--push_to_hub",
            "--hub_model_id",
            "someone/adnet-tiny",
            *FAST,
        ]
    )

    assert {"config.json", "model.safetensors", "modeling_adnet.py", "tokenizer_config.json", "README.md"} <= {
        path.name for path in captured.iterdir()
    }
    assert "adnet" in (captured / "README.md").read_text()
    assert not (captured / "pytorch_model.bin").exists() and not list(captured.glob("checkpoint-*"))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    inputs = dict(BertTokenizer.from_pretrained(captured)(["a gripping , moving film"], return_tensors="pt"))
    assert_loads_as_remote_code(model, inputs, captured, "AutoModelForSequenceClassification")


@pytest.mark.slow
def test_the_defaults_alone_hold_out_calibrate_and_summarise(tmp_path):
    """A smoke run of the recommended recipe: only the model, data, output, epochs and length flags (the sample's
    2,000 training rows: a fifth held out for calibration, a tenth of the rest for the halting fit)."""
    out = tmp_path / "out"
    metrics = run_glue_style.main(
        [
            "--backbone_config",
            json.dumps(TINY_BERT),
            "--train_file",
            str(SAMPLE / "train.tsv"),
            "--validation_file",
            str(SAMPLE / "dev.tsv"),
            "--output_dir",
            str(out),
            "--num_train_epochs",
            "1",
            "--max_seq_length",
            "32",
            "--do_train",
            "--do_eval",
            "--use_cpu",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--save_strategy",
            "no",
            "--unit_hidden_size",
            "8",
        ]
    )
    calibration = json.loads((out / "calibration_results.json").read_text())
    fit = json.loads((out / "halting_fit_results.json").read_text())
    assert (
        calibration["calibration_samples"] == 400 and fit["halting_fit_held_out"] and fit["halting_fit_samples"] == 160
    )
    train = json.loads((out / "train_results.json").read_text())
    assert train["train_samples"] == 1440
    assert metrics["eval_guarantee"].startswith(("certified", "no halting setting certified"))
    assert 0.4 < metrics["eval_majority_class_accuracy"] < 0.6 and isinstance(metrics["eval_warnings"], list)
    config = json.loads((out / "config.json").read_text())
    assert config["max_weight_norm"] == 3.0 and config["exit_guarantee"]["calibration_size"] == 400


def test_summary_warns_when_the_model_learnt_nothing():
    baseline = run_glue_style.trivial_baseline([0, 1, 1, 1], [1, 1, 0, 1], is_regression=False)
    assert baseline == {"eval_majority_class_accuracy": 0.75}
    metrics = {**baseline, "eval_full_depth_accuracy": 0.75, "eval_accuracy": 0.70, "eval_exit_policy": "halting"}
    found = run_glue_style.run_warnings(metrics, budget=0.01)
    assert any("at full depth scores 75.00%, no better than always predicting" in text for text in found)
    assert any("loses 5.00% accuracy against full depth" in text for text in found)
    assert (
        run_glue_style.run_warnings(
            {**baseline, "eval_full_depth_accuracy": 0.9, "eval_accuracy": 0.9, "eval_exit_policy": "halting"},
            budget=0.01,
        )
        == []
    )
    regression = run_glue_style.trivial_baseline([1.0, 3.0], [2.0, 4.0], is_regression=True)
    assert regression == {"eval_mean_prediction_mse": 2.0}
    assert (
        "no better than always predicting the training mean"
        in run_glue_style.run_warnings({**regression, "eval_full_depth_mse": 2.5}, budget=0.01)[0]
    )


def test_summary_states_the_guarantee_or_why_there_is_none():
    from types import SimpleNamespace

    from adnet_examples.arguments import CalibrationArguments

    args = CalibrationArguments(calibration_policy="halting")
    args.skipped = "the training data has 120 rows, fewer than 500"
    unguaranteed = SimpleNamespace(exit_guarantee=None)
    assert run_glue_style.guarantee(unguaranteed, args).startswith("not calibrated (the training data has 120 rows")
    args.skipped = None
    assert run_glue_style.guarantee(unguaranteed, args).startswith("calibrated empirically")
    certified = {
        "policy": "halting",
        "value": 0.02,
        "delta": 0.1,
        "budget": 0.01,
        "metric": "accuracy",
        "calibration_size": 400,
    }
    assert run_glue_style.guarantee(SimpleNamespace(exit_guarantee=certified), args).startswith(
        "certified: with probability >= 0.9, the accuracy drop"
    )
    nothing = {**certified, "policy": "none", "value": None}
    assert "saved at full depth" in run_glue_style.guarantee(SimpleNamespace(exit_guarantee=nothing), args)
