"""Re-evaluating what the example scripts save: the reference their reported metrics are checked against.

The data is batched as the scripts' evaluation batches it (in order, padded per batch), so the numbers agree exactly.
"""

from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer

from adnet_hf.data_adnet import ImageDataset, read_images, read_tsv
from adnet_hf.evaluation_adnet import evaluate_batches
from benchmarks.bench_classification import image_batches, make_batches, plain_quality, with_labels


def saved_model_metrics(model, batches: list[dict], labels: torch.Tensor, **exit_setting) -> dict[str, float]:
    """`evaluate_batches` of an ADNet model (with `exit_setting`), the task metrics of a plain one."""
    if model.config.model_type == "adnet":
        return evaluate_batches(model.eval(), with_labels(batches, labels), **exit_setting)
    return plain_quality(model.eval(), batches, labels)


def text_metrics(folder: Path, tsv: Path, batch_size: int, max_length: int = 32, **exit_setting) -> dict[str, float]:
    """The metrics of the text classifier (or regressor) saved in `folder` on a GLUE-style TSV."""
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    texts, labels = read_tsv(Path(tsv))
    batches = make_batches(AutoTokenizer.from_pretrained(folder), texts, batch_size, max_length)
    kind = float if model.config.num_labels == 1 else int
    return saved_model_metrics(model, batches, torch.tensor([kind(label) for label in labels]), **exit_setting)


def image_metrics(folder: Path, images: Path, labels: Path, limit: int, batch_size: int) -> dict[str, float]:
    """The metrics of the image classifier saved in `folder` on the first `limit` IDX images."""
    dataset = ImageDataset(*read_images(str(images), str(labels), None, 28), limit)
    model = AutoModelForImageClassification.from_pretrained(folder)
    return saved_model_metrics(model, image_batches(dataset, batch_size), dataset.labels)
