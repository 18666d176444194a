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

import logging
from dataclasses import dataclass, field

import torch
import transformers
from transformers import set_seed

from adnet_hf.arguments_adnet import (
    ADNetArguments,
    ModelArguments,
    build_task_model,
    num_blocks,
    parse_arguments,
    read_json_argument,
    save_results,
)
from adnet_hf.data_adnet import MNIST_MEAN, MNIST_STD, ImageDataset, read_images
from adnet_hf.trainer_adnet import ADNetTrainingArguments, compute_classification_metrics

logger = logging.getLogger(__name__)


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
    normalize_mean: float = field(default=MNIST_MEAN, metadata={"help": "Pixel mean after scaling to [0, 1]."})
    normalize_std: float = field(default=MNIST_STD, metadata={"help": "Pixel standard deviation after scaling."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation images."})


def load_split(data_args: DataArguments, file: str | None, labels_file: str | None, folder: str | None,
               limit: int | None) -> ImageDataset | None:
    """One split's images, normalised, or None where the split is not given."""
    read = read_images(file, labels_file, folder, data_args.image_size)
    return None if read is None else ImageDataset(*read, limit, data_args.normalize_mean, data_args.normalize_std)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, adnet_args, data_args, training_args = parse_arguments(
        (ModelArguments, ADNetArguments, DataArguments, ADNetTrainingArguments), argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    train = load_split(data_args, data_args.train_file, data_args.train_labels_file, data_args.train_dir,
                       data_args.max_train_samples)
    evaluation = load_split(data_args, data_args.validation_file, data_args.validation_labels_file,
                            data_args.validation_dir, data_args.max_eval_samples)
    labels = torch.cat([d.labels for d in (train, evaluation) if d is not None])
    backbone = None if model_args.backbone_config is None else read_json_argument(model_args.backbone_config)
    model, trainer_class = build_task_model("image-classification", model_args, adnet_args,
                                            {"num_labels": int(labels.max()) + 1}, backbone)
    trainer = trainer_class(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                            compute_metrics=compute_classification_metrics)
    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        results.update(save_results(trainer, "train", train_result.metrics))
    if training_args.do_eval and evaluation is not None:
        results.update(save_results(trainer, "eval", {**trainer.evaluate(), "eval_num_blocks": num_blocks(model)}))
    return results


if __name__ == "__main__":
    main()
