"""Readers of local data for the example scripts and the benchmarks, offline: GLUE-style text files, images (image
folders, datasets, MNIST-style files) with their preprocessing, and plain text cut into token blocks. Each reads its
format as distributed, so that a training script and the benchmark of its model see the same inputs.
"""

from __future__ import annotations

import collections
import csv
import gzip
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    ConvNextImageProcessorPil,
    GPT2Tokenizer,
    PreTrainedConfig,
    PreTrainedModel,
)

# GLUE on the Hub: the text columns of each task.
TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
# Local files: the text columns of GLUE's distributed files, in the order they are looked for: a pair before a single
# sentence (QNLI has `question` and `sentence`). `#1 String` is MRPC's, `question1` QQP's, `question` QNLI's.
TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("#1 String", "#2 String"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("sentence", None),
    ("text", None),
)
# The label column: `Quality` is MRPC's, `score` STS-B's, `gold_label` MNLI's, `is_duplicate` QQP's.
LABEL_COLUMNS = ("label", "Quality", "score", "gold_label", "is_duplicate")
# CoLA's files have no header: source, label, the original annotation, sentence.
COLA_COLUMNS = ("source", "label", "original_label", "sentence")
# MNIST's pixel mean and standard deviation after scaling to [0, 1].
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# PIL's modes of grey images (1-bit, 8-bit, with transparency, 32-bit integer, 16-bit, float).
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")

logger = logging.getLogger(__name__)

TextKeys = tuple[str, str | None]  # the first text column, and the second one of sentence pairs (or None)
Texts = tuple[list[str], list[str] | None]  # the first sentences, and the second ones of pairs (or None)


def detect_columns(columns: list[str], task_name: str | None = None) -> tuple[TextKeys, str | None]:
    """The text column(s) and the label column (None for unlabelled data) of a GLUE task or of local files: the first
    of `TEXT_COLUMNS` whose columns are all present, and the first of `LABEL_COLUMNS` present."""
    label = detect_label(columns)
    if task_name is not None:
        return TASK_TO_KEYS[task_name], label
    keys = next((keys for keys in TEXT_COLUMNS if all(k in columns for k in keys if k is not None)), None)
    if keys is None:
        expected = [" + ".join(key for key in pair if key) for pair in TEXT_COLUMNS]
        raise ValueError(
            f"No text columns among {columns}: expected one of {expected}, or name them with --text_columns."
        )
    return keys, label


def detect_label(columns: list[str]) -> str | None:
    """The first of `LABEL_COLUMNS` among `columns` (None: unlabelled data)."""
    return next((name for name in LABEL_COLUMNS if name in columns), None)


def csv_format(path: str) -> dict:
    """How a .tsv or .csv file is read (`csv.reader`'s and `datasets`' csv builder's keyword arguments): a .csv file's
    quoted fields may hold commas; GLUE's .tsv files hold unescaped quotes, so a .tsv file is read without quoting."""
    if Path(path).suffix == ".tsv":
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return {"delimiter": ","}


def csv_rows(handle, path: str):
    """The rows of an open .tsv or .csv file, read as `csv_format` says."""
    return csv.reader(handle, **csv_format(path))


def read_header(path: str) -> list[str] | None:
    """The column names of a local .tsv or .csv file: its first row, or CoLA's names (`COLA_COLUMNS`) for a file in
    CoLA's headerless layout (four fields, the second a 0 / 1 label); None for other formats."""
    if Path(path).suffix not in (".tsv", ".csv"):
        return None
    with open(path, newline="", encoding="utf-8-sig") as handle:  # MRPC's TSVs start with a byte-order mark
        first = next(csv_rows(handle, path), [])
    if len(first) == len(COLA_COLUMNS) and first[1] in ("0", "1") and not set(first) & set(LABEL_COLUMNS):
        return list(COLA_COLUMNS)
    return first


def check_data_files(files: dict[str, str]) -> dict[str, list[str] | None]:
    """Each local data file (split name -> path) exists and holds rows, and a .tsv / .csv file's rows each have as
    many fields as its header: checked before `datasets` reads them, so that each error names the file (and row) to
    fix. Returns each file's columns (`read_header`; None for JSON)."""
    for split, path in files.items():
        if not Path(path).is_file():
            raise ValueError(f"--{split}_file {path}: no such file.")
        if Path(path).stat().st_size == 0:
            raise ValueError(f"--{split}_file {path} is empty.")
    headers = {split: read_header(path) for split, path in files.items()}
    for split, path in files.items():
        if headers[split] is not None:
            check_rows(path, headers[split], split)
    return headers


def check_rows(path: str, header: list[str], split: str) -> None:
    """A .tsv / .csv file has at least one row below its header, and each row as many fields as the header."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = csv_rows(handle, path)
        if header != list(COLA_COLUMNS):
            next(rows, None)
        count = 0
        for count, row in enumerate(rows, start=1):
            if len(row) != len(header) and any(row):
                raise ValueError(
                    f"--{split}_file {path}: row {count} (not counting the header) has {len(row)} "
                    f"fields, the header {len(header)} ({header}). A text with a "
                    f"{'tab' if csv_format(path)['delimiter'] == chr(9) else 'comma'} in it needs quoting (.csv), "
                    "or the row is missing a field."
                )
    if count == 0:
        raise ValueError(f"--{split}_file {path} has a header but no rows.")


def load_text_datasets(task_name: str | None, files: dict[str, str]) -> datasets.DatasetDict:
    """GLUE `task_name` from the Hub, or local `files` (split name -> .csv, .tsv or .json(l) path). Files in CoLA's
    headerless layout are read with CoLA's column names."""
    if task_name is not None:
        try:
            raw = datasets.load_dataset("nyu-mll/glue", task_name)
        except Exception as error:
            raise RuntimeError(
                f"--task_name {task_name} loads GLUE from the Hugging Face Hub, which is not reachable "
                f"here ({type(error).__name__}). Pass local copies instead, e.g. "
                "--train_file train.tsv --validation_file dev.tsv."
            ) from error
        if task_name == "mnli":
            raw["validation"], raw["test"] = raw["validation_matched"], raw["test_matched"]
        return raw
    extension = Path(next(iter(files.values()))).suffix.lstrip(".")
    if extension in ("tsv", "csv"):
        return datasets.DatasetDict({split: load_table(split, path) for split, path in files.items()})
    if extension in ("json", "jsonl"):
        return datasets.load_dataset("json", data_files=files)
    raise ValueError(f"Data files must be .csv, .tsv or .json(l), got .{extension}.")


def load_table(split: str, path: str) -> datasets.Dataset:
    """One .tsv / .csv file as a dataset: CoLA's headerless layout with CoLA's column names (its test file, which has
    a header, as it stands); a .tsv file without quoting, as GLUE's hold unescaped quotes."""
    names = {"column_names": list(COLA_COLUMNS)} if read_header(path) == list(COLA_COLUMNS) else {}
    return datasets.load_dataset("csv", data_files={split: path}, split=split, **names, **csv_format(path))


def read_tsv(path: Path, max_samples: int | None = None) -> tuple[Texts, list[str]]:
    """The texts and the raw labels of a labelled GLUE-style TSV, as lists (for batching by hand)."""
    header = read_header(str(path))
    names = header if header == list(COLA_COLUMNS) else None
    with open(path, newline="", encoding="utf-8-sig") as handle:  # MRPC's TSVs start with a byte-order mark
        rows = list(csv.DictReader(handle, fieldnames=names, delimiter="\t", quoting=csv.QUOTE_NONE))
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
        return {
            "num_labels": len(self.names),
            "id2label": dict(enumerate(self.names)),
            "label2id": {name: i for i, name in enumerate(self.names)},
        }


PROBLEM_TYPES = ("single_label_classification", "regression")


def label_info(
    reference: datasets.Dataset, label_column: str, source: str = "the training data", problem_type: str | None = None
) -> LabelInfo:
    """The problem type and classes of the labels in `reference` (`source` names it in errors), by a stated rule:
    integers or words are classes; floats that are all whole numbers (how pandas writes an integer column that once
    held a gap: 0.0, 1.0) are classes too, said so; other floats are regression. `problem_type` overrides the rule.
    Classes are the sorted distinct values, at least two (one class would make a one-output model, which Transformers
    treats as regression); labels that mix numbers and words are refused, and a class of a few stray rows is warned
    about."""
    feature = reference.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return LabelInfo(is_regression=False, names=feature.names)
    values = reference[label_column]
    floats = feature.dtype in ("float32", "float64")
    if problem_type == "regression" or (problem_type is None and floats and not _whole(values)):
        if not all(isinstance(value, (int, float)) for value in values):
            raise ValueError(f"{source}: --problem_type regression needs numeric {label_column!r} values.")
        return LabelInfo(is_regression=True)
    if floats:
        logger.warning(
            "%s: the %r labels are floats that are all whole numbers, read as classes (the rule: integers, "
            "words and whole floats are classes, other floats regression); pass --problem_type regression "
            "to regress on them.",
            source,
            label_column,
        )
    _check_label_spellings(values, label_column, source)
    classes = sorted(set(values))
    if len(classes) < 2:
        raise ValueError(
            f"{source}: every {label_column!r} value is {_name(classes[0])}, and classification needs "
            "at least two classes. For regression, write the labels as floats (such as 1.5) or pass "
            "--problem_type regression."
        )
    _warn_stray_classes(values, label_column, source)
    return LabelInfo(
        is_regression=False, to_id={v: i for i, v in enumerate(classes)}, names=[_name(v) for v in classes]
    )


def _whole(values: list) -> bool:
    return all(float(value).is_integer() for value in values)


def _name(value) -> str:
    """A class's name: a whole float as the integer it stands for (1.0 -> "1")."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def model_label_ids(labels: Sequence | np.ndarray, config: PreTrainedConfig, source: str) -> torch.Tensor:
    """Raw `labels` of a data file (`source`: text, or the integers of IDX files) as the label ids of a model with
    `config`, so that a benchmark scores a model on the ids it was trained with. The training scripts save `label2id`
    under each class's name (`label_info`: `entailment`, or `1` for both `1` and `1.0`), so a label is looked up by
    its name; a model without names (Transformers' default `LABEL_0`, ...: trained elsewhere) takes integer labels
    as its ids; a regression model (one output) takes the values as floats."""
    if config.num_labels == 1:
        return torch.tensor([float(label) for label in labels])
    known = dict(config.label2id)
    if known == {f"LABEL_{i}": i for i in range(config.num_labels)}:
        known.update({str(i): i for i in range(config.num_labels)})
    names = [label if isinstance(label, str) and not _is_number(label) else _name(float(label)) for label in labels]
    row = next((row for row, name in enumerate(names) if name not in known), None)
    if row is not None:
        raise ValueError(
            f"{source}: row {row + 1} (not counting a header) has the label {str(labels[row])!r}, which the model does "
            f"not know; its labels are {list(known)}."
        )
    return torch.tensor([known[name] for name in names])


def _check_label_spellings(values: list, label_column: str, source: str) -> None:
    """Refuse labels that mix numbers and words (`0`, `1`, `positive`): one of the spellings is a mistake, and each
    would become its own class."""
    words = sorted({value for value in values if isinstance(value, str)})
    numbers = [word for word in words if _is_number(word)]
    if numbers and len(numbers) < len(words):
        others = [word for word in words if not _is_number(word)]
        raise ValueError(
            f"{source}: the {label_column!r} labels mix numbers ({', '.join(numbers[:5])}) and words "
            f"({', '.join(others[:5])}); each spelling would be a class of its own. Write every label "
            "one way."
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# A class this rare in the training data is more likely a typo than a class: under 1% of the rows, and at most 5.
STRAY_CLASS_SHARE, STRAY_CLASS_ROWS = 0.01, 5


def _warn_stray_classes(values: list, label_column: str, source: str) -> None:
    counts = collections.Counter(values)
    for value, count in sorted(counts.items(), key=lambda item: item[1]):
        if count <= STRAY_CLASS_ROWS and count < STRAY_CLASS_SHARE * len(values):
            logger.warning(
                "%s: the %r class %s has %d of %d rows: a typo? Each distinct label is a class.",
                source,
                label_column,
                _name(value),
                count,
                len(values),
            )


def tokenize_texts(
    raw: datasets.DatasetDict,
    tokenizer,
    text_keys: TextKeys,
    label_column: str | None,
    labels: LabelInfo,
    max_seq_length: int,
) -> datasets.DatasetDict:
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

    return datasets.DatasetDict(
        {
            split: dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=f"Tokenising {split}")
            for split, dataset in raw.items()
        }
    )


def check_max_length(tokenizer, max_length: int, pair: bool) -> None:
    """Room for one text token per sentence beside the special tokens: a shorter limit fails deep in batching."""
    specials = tokenizer.num_special_tokens_to_add(pair=pair)
    minimum = specials + (2 if pair else 1)
    if max_length < minimum:
        inputs = "sentence pair" if pair else "sentence"
        raise ValueError(
            f"--max_seq_length {max_length} leaves no room for text: the tokenizer adds {specials} "
            f"special tokens to each {inputs}, so it must be at least {minimum}."
        )


def check_text_cells(
    raw: datasets.DatasetDict, sources: dict[str, str], text_keys: TextKeys, label_column: str | None
) -> None:
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
                raise ValueError(
                    f"{sources[split]}: row {row + 1} (not counting the header) has an empty {column!r} "
                    "cell; fill it or remove the row."
                )


def check_known_labels(
    raw: datasets.DatasetDict, sources: dict[str, str], label_column: str | None, labels: LabelInfo
) -> None:
    """Every label of every split is one of the classes found in the reference split: an unseen one has no id."""
    if labels.to_id is None or label_column is None:
        return
    for split, dataset in raw.items():
        if split == "test":  # test labels are optional, and GLUE's are placeholders (-1)
            continue
        values = dataset[label_column] if label_column in dataset.column_names else []
        row = next((i for i, value in enumerate(values) if value is not None and value not in labels.to_id), None)
        if row is not None:
            raise ValueError(
                f"{sources[split]}: row {row + 1} (not counting the header) has the label "
                f"{values[row]!r}, which the training data does not have; its classes are "
                f"{labels.names}."
            )


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


def read_image_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Grey square images and labels from a CSV (optionally gzipped): each row the flattened pixels, then the label."""
    with _open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise ValueError(
            f"{path}: each row must hold a square image's pixels, then the label; got {table.shape[1]} columns."
        )
    return table[:, :-1].reshape(-1, side, side).astype(np.uint8), table[:, -1]


def read_digits(
    file: str, labels_file: str | None = None, limit: int | None = None, seed: int | None = None
) -> datasets.Dataset:
    """MNIST-style grey images as an `image` / `label` dataset: from a pair of IDX files (images, labels) or from a
    CSV. With `limit`, the first `limit` images, or with a `seed` `limit` drawn at random (a file sorted by class
    would otherwise give one class)."""
    images, labels = read_image_csv(file) if labels_file is None else (read_idx(file), read_idx(labels_file))
    if len(images) != len(labels):
        raise ValueError(f"{file} holds {len(images)} images but {labels_file} {len(labels)} labels.")
    order = np.arange(len(images)) if seed is None else np.random.default_rng(seed).permutation(len(images))
    order = order[:limit]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"image": list(images[order]), "label": labels[order].tolist()}, features=features
    )


def read_image_folder(path: str) -> datasets.Dataset:
    """A folder with one sub-folder of images per class, through `datasets`' imagefolder builder: `image` and
    `label`, a `ClassLabel` named after the sub-folders (sorted)."""
    if not Path(path).is_dir():
        raise ValueError(f"{path} is not a folder: an image folder holds one sub-folder of images per class.")
    dataset = datasets.load_dataset("imagefolder", data_files={"train": str(Path(path) / "**")}, split="train")
    if "label" not in dataset.column_names:
        raise ValueError(f"{path} needs one sub-folder of images per class, and at least two classes.")
    return dataset


def load_image_dataset(name: str, config_name: str | None = None) -> datasets.DatasetDict:
    """A dataset through `datasets.load_dataset`: a local folder (images in class sub-folders, or data files) or a
    Hub id (not reachable offline)."""
    try:
        return datasets.load_dataset(name, config_name)
    except (ConnectionError, FileNotFoundError) as error:
        raise ValueError(
            f"--dataset_name {name} is neither a local dataset folder nor reachable on the Hugging Face "
            f"Hub ({type(error).__name__}: {error}). Pass a local folder, or --train_dir."
        ) from error


def _label_names(feature, values: list) -> list[str]:
    """The class name of each label value: its `ClassLabel` name, or the value as text."""
    return feature.int2str(values) if isinstance(feature, datasets.ClassLabel) else [str(v) for v in values]


def align_class_labels(
    raw: datasets.DatasetDict, label_column: str = "label", names: list[str] | None = None
) -> datasets.DatasetDict:
    """Every split's labels as ids of one `ClassLabel`, so that an id means the same class in every split even where
    one split lacks a class: the classes `names`, by default the training split's (its `ClassLabel`'s names, e.g.
    an image folder's sub-folders, else its sorted distinct values). A class not among them is a `ValueError` naming
    it."""
    if names is None:
        reference = raw["train"] if "train" in raw else next(iter(raw.values()))
        feature = reference.features[label_column]
        names = (
            feature.names
            if isinstance(feature, datasets.ClassLabel)
            else [str(value) for value in sorted(set(reference[label_column]))]
        )
    if len(names) < 2:
        raise ValueError(f"Classification needs at least two classes, got {names}.")
    classes = datasets.ClassLabel(names=names)

    def aligned(split: str, dataset: datasets.Dataset) -> datasets.Dataset:
        feature = dataset.features[label_column]
        unknown = sorted(set(_label_names(feature, list(dataset[label_column]))) - set(names))
        if unknown:
            raise ValueError(
                f"The {split} split has classes that the training split (or the model) lacks: "
                f"{unknown}. Its classes: {names}."
            )
        features = datasets.Features({**dataset.features, label_column: classes})
        return dataset.map(
            lambda values: {label_column: classes.str2int(_label_names(feature, values))},
            input_columns=label_column,
            batched=True,
            features=features,
            desc=f"Labelling {split}",
        )

    return datasets.DatasetDict({split: aligned(split, dataset) for split, dataset in raw.items()})


def sample_images(dataset: datasets.Dataset, image_column: str = "image", count: int = 256) -> list:
    """Up to `count` images spread evenly over `dataset` (decoded), to choose channels and statistics from."""
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int))
    return list(dataset.select(indices)[image_column])


def is_grey(image) -> bool:
    """Whether a PIL image is grey by its mode (colour palettes count as colour)."""
    return image.mode in GREY_MODES


def backbone_channels(model: PreTrainedModel) -> int:
    """The number of image channels the model's backbone takes (an ADNet model's or a plain one's)."""
    config = model.config
    return (config.backbone_config if config.model_type == "adnet" else config).num_channels


def to_channels(image, num_channels: int):
    """A PIL image as a backbone with `num_channels` takes it, upright as its EXIF says: RGB for 3 (grey repeated, as
    the image-classification pipeline converts), grey for 1. A colour image for 1 channel is refused, not turned
    grey."""
    image = PIL.ImageOps.exif_transpose(image)
    if num_channels == 3:
        return image.convert("RGB")
    if num_channels != 1:
        raise ValueError(
            f"Images are read as grey (num_channels=1) or RGB (num_channels=3); the backbone has "
            f"num_channels={num_channels}."
        )
    if not is_grey(image):
        raise ValueError(
            f"A colour image (PIL mode {image.mode}) for a backbone with num_channels=1: use a backbone "
            "with num_channels=3, or convert the images to grey beforehand."
        )
    return image.convert("L")


def default_image_processor(images: list, num_channels: int, size: int | None = None) -> ConvNextImageProcessorPil:
    """An image processor for a backbone saved without one: the class of Transformers' ResNet checkpoints, resizing
    the shorter side to `size` and centre-cropping a square (default `size`: the side the `images` share if they are
    square, else 224), normalised with the per-channel mean and standard deviation of `images`."""
    total, squares, count = np.zeros(num_channels), np.zeros(num_channels), 0
    for image in images:
        pixels = np.asarray(to_channels(image, num_channels), dtype=np.float64).reshape(-1, num_channels) / 255.0
        total, squares, count = total + pixels.sum(0), squares + (pixels**2).sum(0), count + len(pixels)
    mean = (total / count).round(6)
    std = np.sqrt(np.maximum(squares / count - (total / count) ** 2, 0.0)).round(6)
    if size is None:
        sides = {image.size for image in images}
        width, height = next(iter(sides))
        size = width if len(sides) == 1 and width == height else 224
    return ConvNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_pct=1.0,
        image_mean=mean.tolist(),
        image_std=np.where(std > 0, std, 1.0).tolist(),
    )  # constant images: no scaling


def processor_size(processor) -> tuple[int, int]:
    """The (height, width) of what `processor` makes, as Transformers' image-classification example reads it."""
    size = processor.size
    if "shortest_edge" in size:
        return size["shortest_edge"], size["shortest_edge"]
    return size["height"], size["width"]


def random_resized_crop(
    image,
    size: tuple[int, int],
    resample: int = 3,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
):
    """A random part of `image` (`scale` of its area, aspect ratio in `ratio`) resized to `size` (height, width):
    torchvision's `RandomResizedCrop`, on PIL and torch's random generator."""
    width, height = image.size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = width * height * torch.empty(()).uniform_(*scale).item()
        aspect = math.exp(torch.empty(()).uniform_(*log_ratio).item())
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = torch.randint(0, height - h + 1, ()).item(), torch.randint(0, width - w + 1, ()).item()
            return image.resize(size[::-1], resample, box=(left, top, left + w, top + h))
    w, h = width, height  # no draw fitted: the centre, its aspect ratio clamped into `ratio`
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return image.resize(size[::-1], resample, box=(left, top, left + w, top + h))


def image_transform(processor, num_channels: int, augment: bool = False) -> Callable[[dict], dict]:
    """A `Dataset.with_transform` function giving `pixel_values` (and `labels`) from a batch of PIL `image`s:
    converted to the backbone's channels, then the image processor. With `augment` (training), as Transformers'
    image-classification example: a random resized crop to the processor's output size and a random horizontal flip,
    then the processor's rescaling and normalisation only."""
    size, resample = processor_size(processor), getattr(processor, "resample", 3)

    def augmented(image):
        image = random_resized_crop(image, size, resample)
        return image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(()).item() < 0.5 else image

    def transform(batch: dict) -> dict:
        images = [to_channels(image, num_channels) for image in batch["image"]]
        options = {"do_resize": False, "do_center_crop": False} if augment else {}
        images = [augmented(image) for image in images] if augment else images
        result = {"pixel_values": processor(images, return_tensors="pt", **options)["pixel_values"]}
        if "label" in batch:
            result["labels"] = batch["label"]
        return result

    return transform


def saved_image_processor(name_or_path: str | None):
    """The image processor saved with a checkpoint (folder or Hub id), or None where it has none."""
    if name_or_path is None:
        return None
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except OSError:
        return None


class ImageDataset(torch.utils.data.Dataset):
    """Images (grey N x H x W arrays, 0-255, or PIL images) as `pixel_values` with their `labels`: through
    `processor`, the image processor a model was trained with, after conversion to its backbone's `num_channels`
    (`image_transform`, as training reads them), or without one grey arrays scaled to [0, 1] and normalised with
    MNIST's statistics (the training script's before it saved a processor)."""

    def __init__(self, images, labels, limit: int | None = None, processor=None, num_channels: int = 1):
        images, labels = images[:limit], labels[:limit]
        if processor is None:
            pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
            self.pixel_values = (pixels - MNIST_MEAN) / MNIST_STD
        else:
            pil = [image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(image) for image in images]
            self.pixel_values = image_transform(processor, num_channels)({"image": pil})["pixel_values"]
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def make_batches(tokenizer, texts: Texts, batch_size: int, max_length: int, limit: int | None = None) -> list[dict]:
    """Tokenised batches of the first `limit` texts (sentences, or sentence pairs)."""
    first, second = texts
    count = len(first) if limit is None else min(limit, len(first))

    def encode(start: int) -> dict:
        pair = () if second is None else (second[start : start + batch_size],)
        return tokenizer(
            first[start : start + batch_size],
            *pair,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )

    return [encode(start) for start in range(0, count, batch_size)]


def image_batches(dataset: ImageDataset, batch_size: int, limit: int | None = None) -> list[dict]:
    """`pixel_values` batches of the first `limit` images of `dataset`, in order (labels left out)."""
    pixels = dataset.pixel_values[:limit]
    return [{"pixel_values": pixels[i : i + batch_size]} for i in range(0, len(pixels), batch_size)]


def load_tokenizer_folder(folder: str | Path, **kwargs):
    """The tokenizer saved in `folder`; a bare `vocab.json` + `merges.txt` folder (`data/gpt2-tokenizer`),
    which `AutoTokenizer` cannot read without a config, is GPT-2's."""
    if (Path(folder) / "merges.txt").exists() and not (Path(folder) / "tokenizer_config.json").exists():
        return GPT2Tokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def load_tokenizer(model_args):
    """The tokenizer of `--tokenizer_name` or of `--model_name_or_path` (a GGUF model's from its `--gguf_file`)."""
    gguf = {"gguf_file": model_args.gguf_file} if model_args.gguf_file and not model_args.tokenizer_name else {}
    return load_tokenizer_folder(model_args.tokenizer_name or model_args.model_name_or_path, **gguf)


def check_block_size(model, block_size: int) -> None:
    """A block fits the backbone's positions: beyond an absolute position table, the embeddings fail with an
    IndexError."""
    config = model.config.backbone_config if model.config.model_type == "adnet" else model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise ValueError(
            f"--block_size {block_size} is longer than the backbone's {limit} positions "
            f"(max_position_embeddings): pass --block_size {limit} or less."
        )


def chat_prompts(tokenizer, path: str | Path, count: int | None = None) -> list[list[int]]:
    """The first `count` instructions (all by default) of the JSON list of strings at `path` (`--prompts_file`), each
    a user turn of the tokenizer's chat template with the assistant's turn opened, as token ids."""
    instructions = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(instructions, list) or not instructions or not all(isinstance(x, str) for x in instructions):
        raise ValueError(f"--prompts_file must hold a non-empty JSON list of strings, got {instructions!r:.80}.")
    if not tokenizer.chat_template:
        raise ValueError(
            "--prompts_file needs a tokenizer with a chat template (chat_template); this one has none: "
            "give plain text instead (--data, --train_file)."
        )
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]
        for text in instructions[:count]
    ]


def token_blocks(tokenizer, path: Path, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """A text file as consecutive blocks of `block_size` token ids (blocks x block_size), the rest dropped."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    if len(ids) < block_size:
        raise ValueError(
            f"{path} holds {len(ids)} tokens, fewer than one block: pass a --block_size of {len(ids)} or "
            "less, or a longer file."
        )
    return as_blocks(ids, block_size, max_blocks)


def as_blocks(ids: torch.Tensor, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """A 1-D stream of token ids as its first consecutive blocks of `block_size` (at most `max_blocks`; blocks x
    block_size), the rest dropped."""
    count = len(ids) // block_size
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
