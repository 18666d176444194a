"""Readers of local data for the example scripts and the benchmarks, offline: GLUE-style text files, MNIST-style
images, and plain text cut into token blocks. Each reads its format as distributed, so that a training script and
the benchmark of its model see the same inputs.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

# GLUE on the Hub: the text columns of each task.
TASK_TO_KEYS = {
    "cola": ("sentence", None), "mnli": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None), "stsb": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}
# Local files: the column names of the GLUE distribution (`#1 String` and `Quality` are MRPC's, `score` STS-B's).
TEXT_COLUMNS = (("sentence1", "sentence2"), ("#1 String", "#2 String"), ("sentence", None))
LABEL_COLUMNS = ("label", "Quality", "score")
# MNIST's pixel mean and standard deviation after scaling to [0, 1].
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

TextKeys = tuple[str, str | None]  # the first text column, and the second one of sentence pairs (or None)
Texts = tuple[list[str], list[str] | None]  # the first sentences, and the second ones of pairs (or None)


def detect_columns(columns: list[str], task_name: str | None = None) -> tuple[TextKeys, str | None]:
    """The text column(s) and the label column (None for unlabelled data) of a GLUE task or of local files."""
    label = next((name for name in LABEL_COLUMNS if name in columns), None)
    if task_name is not None:
        return TASK_TO_KEYS[task_name], label
    keys = next((keys for keys in TEXT_COLUMNS if all(k in columns for k in keys if k is not None)), None)
    if keys is None:
        expected = [" + ".join(key for key in pair if key) for pair in TEXT_COLUMNS]
        raise ValueError(f"No text columns among {columns}: expected one of {expected}.")
    return keys, label


def load_text_datasets(task_name: str | None, files: dict[str, str]) -> datasets.DatasetDict:
    """GLUE `task_name` from the Hub, or local `files` (split name -> .csv, .tsv or .json(l) path)."""
    if task_name is not None:
        try:
            raw = datasets.load_dataset("nyu-mll/glue", task_name)
        except Exception as error:
            raise RuntimeError(f"--task_name {task_name} loads GLUE from the Hugging Face Hub, which is not reachable "
                               f"here ({type(error).__name__}). Pass local copies instead, e.g. "
                               "--train_file train.tsv --validation_file dev.tsv.") from error
        if task_name == "mnli":
            raw["validation"], raw["test"] = raw["validation_matched"], raw["test_matched"]
        return raw
    extension = Path(next(iter(files.values()))).suffix.lstrip(".")
    if extension == "tsv":  # GLUE's TSVs hold unescaped quotes
        return datasets.load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    if extension in ("csv", "json", "jsonl"):
        return datasets.load_dataset("json" if extension == "jsonl" else extension, data_files=files)
    raise ValueError(f"Data files must be .csv, .tsv or .json(l), got .{extension}.")


def read_tsv(path: Path, max_samples: int | None = None) -> tuple[Texts, list[str]]:
    """The texts and the raw labels of a labelled GLUE-style TSV, as lists (for batching by hand)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:  # MRPC's TSVs start with a byte-order mark
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:max_samples] if max_samples else rows
    (first, second), label = detect_columns(list(rows[0]) if rows else [])
    if label is None:
        raise ValueError(f"{path} has no label column: it needs one of {', '.join(LABEL_COLUMNS)}.")
    texts = [row[first] for row in rows], None if second is None else [row[second] for row in rows]
    return texts, [row[label] for row in rows]


@dataclass
class LabelInfo:
    """Regression, or the class labels of the data and their ids."""

    is_regression: bool
    to_id: dict | None = None  # raw label value -> id; None when the data already holds ids (a ClassLabel)
    names: list[str] | None = None

    def config_kwargs(self) -> dict:
        """The model config's label settings."""
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": {name: i for i, name in enumerate(self.names)}}


def label_info(reference: datasets.Dataset, label_column: str, source: str = "the training data") -> LabelInfo:
    """As `run_glue.py`: a float label column is regression; otherwise the sorted distinct values are the classes, of
    which there must be two at least (one class would make a one-output model, which Transformers treats as
    regression). `source` names the data in errors."""
    feature = reference.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return LabelInfo(is_regression=False, names=feature.names)
    if feature.dtype in ("float32", "float64"):
        return LabelInfo(is_regression=True)
    values = sorted(set(reference[label_column]))
    if len(values) < 2:
        raise ValueError(f"{source}: every {label_column!r} value is {values[0]!r}, and classification needs at least "
                         "two classes. For regression, write the labels as floats (such as 1.0).")
    return LabelInfo(is_regression=False, to_id={v: i for i, v in enumerate(values)}, names=[str(v) for v in values])


def tokenize_texts(raw: datasets.DatasetDict, tokenizer, text_keys: TextKeys, label_column: str | None,
                   labels: LabelInfo, max_seq_length: int) -> datasets.DatasetDict:
    """Tokenise (padding comes later, per batch) and map the labels to ids under the name `labels`."""
    first, second = text_keys
    max_length = min(max_seq_length, tokenizer.model_max_length)
    check_max_length(tokenizer, max_length, pair=second is not None)

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


def check_max_length(tokenizer, max_length: int, pair: bool) -> None:
    """Room for one text token per sentence beside the special tokens: a shorter limit fails deep in batching."""
    specials = tokenizer.num_special_tokens_to_add(pair=pair)
    minimum = specials + (2 if pair else 1)
    if max_length < minimum:
        inputs = "sentence pair" if pair else "sentence"
        raise ValueError(f"--max_seq_length {max_length} leaves no room for text: the tokenizer adds {specials} "
                         f"special tokens to each {inputs}, so it must be at least {minimum}.")


def check_text_cells(raw: datasets.DatasetDict, sources: dict[str, str], text_keys: TextKeys,
                     label_column: str | None) -> None:
    """Every split has the text columns, and no cell of them is empty, nor a label cell outside the test split (where
    labels are optional): an empty cell reads as None, which stops tokenisation with a bare TypeError, or turns a
    label column into floats, that is, into regression. `sources` names each split's data in errors."""
    for split, dataset in raw.items():
        columns = [key for key in text_keys if key is not None]
        missing = [column for column in columns if column not in dataset.column_names]
        if missing:
            raise ValueError(f"{sources[split]} has no {missing[0]!r} column; its columns are {dataset.column_names}.")
        if label_column in dataset.column_names and split != "test":
            columns.append(label_column)
        for column in columns:
            row = next((i for i, value in enumerate(dataset[column]) if value is None), None)
            if row is not None:
                raise ValueError(f"{sources[split]}: row {row + 1} (not counting the header) has an empty {column!r} "
                                 "cell; fill it or remove the row.")


def check_known_labels(raw: datasets.DatasetDict, sources: dict[str, str], label_column: str | None,
                       labels: LabelInfo) -> None:
    """Every label of every split is one of the classes found in the reference split: an unseen one has no id."""
    if labels.to_id is None or label_column is None:
        return
    for split, dataset in raw.items():
        values = dataset[label_column] if label_column in dataset.column_names else []
        row = next((i for i, value in enumerate(values) if value is not None and value not in labels.to_id), None)
        if row is not None:
            raise ValueError(f"{sources[split]}: row {row + 1} (not counting the header) has the label "
                             f"{values[row]!r}, which the training data does not have; its classes are "
                             f"{labels.names}.")


def select(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` samples (all with None)."""
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format): a magic number giving the rank, the dimensions, then unsigned bytes."""
    with _open(path) as handle:
        data = handle.read()
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def read_image_csv(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey images and labels from a CSV (optionally gzipped): each row the flattened pixels, then the label."""
    with _open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, image_size, image_size).astype(np.uint8), table[:, -1]


def read_image_folder(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey images and labels from a folder with one sub-folder per class (labels in sorted folder order)."""
    from PIL import Image

    classes = sorted(p.name for p in Path(path).iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((Path(path) / name).iterdir()):
            images.append(np.asarray(Image.open(file).convert("L").resize((image_size, image_size))))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def read_images(file: str | None, labels_file: str | None, folder: str | None,
                image_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Images and labels from a folder, a pair of IDX files or a CSV, whichever is given (None if none is)."""
    if folder is not None:
        return read_image_folder(folder, image_size)
    if file is None:
        return None
    if labels_file is not None:
        return read_idx(file), read_idx(labels_file)
    return read_image_csv(file, image_size)


class ImageDataset(torch.utils.data.Dataset):
    """Grey images as normalised `pixel_values` (1 x H x W) with their `labels`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, limit: int | None = None, mean: float = MNIST_MEAN,
                 std: float = MNIST_STD):
        images, labels = images[:limit], labels[:limit]
        pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        self.pixel_values = (pixels - mean) / std
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def token_blocks(tokenizer, path: Path, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """A text file as consecutive blocks of `block_size` token ids (blocks x block_size), the rest dropped."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    count = len(ids) // block_size
    if count == 0:
        raise ValueError(f"{path} holds {len(ids)} tokens, fewer than one block: pass a --block_size of {len(ids)} or "
                         "less, or a longer file.")
    count = count if max_blocks is None else min(count, max_blocks)
    return ids[: count * block_size].view(count, block_size)


class TextBlocks(torch.utils.data.Dataset):
    """Token blocks as causal LM examples, each block its own labels (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}
