#!/usr/bin/env python
"""Train ADNet for image classification on a ResNet (after Transformers' `run_image_classification.py`).

    # MNIST: the 5k training CSV and the official 10k test set (idx files), a small ResNet from scratch
    python examples/run_image_classification.py \\
        --backbone_config '{"model_type": "resnet", "num_channels": 1, "embedding_size": 32,
                            "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2], "layer_type": "basic"}' \\
        --train_file ../shared/data/mnist/mnist_5k.csv.gz \\
        --validation_file ../shared/data/mnist/t10k-images-idx3-ubyte.gz \\
        --validation_labels_file ../shared/data/mnist/t10k-labels-idx1-ubyte.gz \\
        --output_dir outputs/mnist-adnet --do_train --do_eval

Data: a CSV (optionally gzipped) of flattened grey pixels followed by the label, a pair of IDX files (images,
labels), or an image folder with one sub-folder per class (`--train_dir` / `--validation_dir`). Evaluation
reports accuracy and the mean number of residual blocks executed per image to `eval_results.json`.
"""

from __future__ import annotations

import gzip
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForImageClassification, Trainer, set_seed

from adnet_hf import ADNetForImageClassification
from adnet_hf.trainer_adnet import ADNetTrainer, ADNetTrainingArguments, compute_classification_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adnet_arguments import (  # noqa: E402
    ADNetArguments, build_model, build_plain_model, freeze_full_depth_field, parse_arguments,
    plain_baseline_field, read_json_argument, total_layers,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to train."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A ResNet checkpoint to wrap, or a saved ADNet checkpoint."}
    )
    backbone_config: str | None = field(
        default=None,
        metadata={"help": "Instead of a checkpoint: a ResNet trained from scratch, from this config (a JSON file or "
                          "an inline JSON object with model_type resnet)."},
    )
    freeze_full_depth: bool = freeze_full_depth_field()
    plain_baseline: bool = plain_baseline_field("image-classification head")


@dataclass
class DataArguments:
    """Images and labels: CSV / IDX files or image folders."""

    train_file: str | None = field(default=None, metadata={"help": "CSV(.gz) of pixels then label, or IDX images."})
    train_labels_file: str | None = field(default=None, metadata={"help": "IDX labels for an IDX train_file."})
    validation_file: str | None = field(default=None, metadata={"help": "Like train_file."})
    validation_labels_file: str | None = field(default=None, metadata={"help": "IDX labels for validation_file."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder: one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder: one sub-folder per class."})
    image_size: int = field(default=28, metadata={"help": "Side of the square, grey images."})
    normalize_mean: float = field(default=0.1307, metadata={"help": "Pixel mean after scaling to [0, 1]."})
    normalize_std: float = field(default=0.3081, metadata={"help": "Pixel standard deviation after scaling."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation images."})


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format): a magic number giving the rank, the dimensions, then unsigned bytes."""
    with _open(path) as handle:
        data = handle.read()
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def read_csv(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    with _open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, image_size, image_size).astype(np.uint8), table[:, -1]


def read_folder(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    classes = sorted(p.name for p in Path(path).iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((Path(path) / name).iterdir()):
            images.append(np.asarray(Image.open(file).convert("L").resize((image_size, image_size))))
            labels.append(label)
    return np.stack(images), np.asarray(labels), classes


class ImageDataset(torch.utils.data.Dataset):
    """Grey images as normalised `pixel_values` (1 x H x W) with their `labels`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, data_args: DataArguments, limit: int | None):
        images, labels = images[:limit], labels[:limit]
        pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        self.pixel_values = (pixels - data_args.normalize_mean) / data_args.normalize_std
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def load_split(data_args: DataArguments, file: str | None, labels_file: str | None, folder: str | None,
               limit: int | None) -> ImageDataset | None:
    if folder is not None:
        images, labels, _ = read_folder(folder, data_args.image_size)
    elif file is None:
        return None
    elif labels_file is not None:
        images, labels = read_idx(file), read_idx(labels_file)
    else:
        images, labels = read_csv(file, data_args.image_size)
    return ImageDataset(images, labels, data_args, limit)


def load_model(model_args: ModelArguments, adnet_args: ADNetArguments, num_labels: int):
    backbone = None if model_args.backbone_config is None else read_json_argument(model_args.backbone_config)
    if model_args.plain_baseline:
        return build_plain_model(AutoModelForImageClassification, model_args.model_name_or_path, backbone,
                                 {"num_labels": num_labels})
    return build_model(ADNetForImageClassification, model_args.model_name_or_path, backbone,
                       {"num_labels": num_labels, **adnet_args.overrides()},
                       freeze_full_depth=model_args.freeze_full_depth)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, adnet_args, data_args, training_args = parse_arguments(
        (ModelArguments, ADNetArguments, DataArguments, ADNetTrainingArguments), sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    train = load_split(data_args, data_args.train_file, data_args.train_labels_file, data_args.train_dir,
                       data_args.max_train_samples)
    evaluation = load_split(data_args, data_args.validation_file, data_args.validation_labels_file,
                            data_args.validation_dir, data_args.max_eval_samples)
    labels = torch.cat([d.labels for d in (train, evaluation) if d is not None])
    model = load_model(model_args, adnet_args, int(labels.max()) + 1)
    trainer_class = Trainer if model_args.plain_baseline else ADNetTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                            compute_metrics=compute_classification_metrics)
    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_metrics("train", train_result.metrics)
        results.update(train_result.metrics)
    if training_args.do_eval and evaluation is not None:
        metrics = trainer.evaluate()
        metrics["eval_total_layers"] = total_layers(model)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


if __name__ == "__main__":
    main()
