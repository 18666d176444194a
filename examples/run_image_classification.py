#!/usr/bin/env python
"""Train ADNet for image classification on a ResNet (after Transformers' `run_image_classification.py`).

    # An image folder (one sub-folder per class) on a ResNet checkpoint saved with `save_pretrained`
    python examples/run_image_classification.py --model_name_or_path path/to/resnet \\
        --train_dir photos/train --validation_dir photos/validation \\
        --output_dir outputs/photos-adnet --do_train --do_eval

    # MNIST: the 5k training CSV and the official 10k test set (idx files), a small ResNet from scratch
    python examples/run_image_classification.py \\
        --backbone_config '{"model_type": "resnet", "num_channels": 1, "embedding_size": 32,
                            "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2], "layer_type": "basic"}' \\
        --train_file data/mnist/mnist_5k.csv.gz \\
        --validation_file data/mnist/t10k-images-idx3-ubyte.gz \\
        --validation_labels_file data/mnist/t10k-labels-idx1-ubyte.gz \\
        --output_dir outputs/mnist-adnet --do_train --do_eval

Data, read with `datasets`: an image folder per split (`--train_dir` / `--validation_dir`), a dataset
(`--dataset_name`: a local folder or a Hub id, its `train` and `validation` splits), or MNIST-style grey digits (a
CSV of pixels then label, or a pair of IDX files). The classes are the training split's (an image folder's
sub-folder names), one `ClassLabel` for every split; a validation class unknown to training is an error.

Channels: the backbone's `num_channels` decides. For 3, every image is converted to RGB (grey ones repeated, as
Transformers' pipelines do); for 1, images must be grey (a colour image is an error rather than silently turned grey).
A `--backbone_config` without `num_channels` gets 1 when the training images are grey, else 3.

Preprocessing: the checkpoint's image processor (or `--image_processor_name`'s). Without one, a default: the ResNet
checkpoints' processor class (resize the shorter side, centre crop) at `--image_size` (default: the training images'
side when they share a square one, else 224), normalised with the training images' own mean and standard deviation;
the script says so. Training images are augmented as in Transformers' example (random resized crop, horizontal
flip) unless `--augment False`; digit files are not by default (a flip changes a digit). The output folder holds the
model and its image processor, so `pipeline("image-classification", model=output_dir)` runs it (after
`import adnet_hf`). Evaluation reports accuracy and the mean number of residual blocks executed per image to
`eval_results.json`. After training the halting units are fitted to the trained model's settling steps
(`fit_halting`, as `run_glue_style.py` does) on the images `--fit_halting_split F` holds out of training, or, without
it, on the training images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import transformers
from transformers import AutoConfig, set_seed

from adnet_examples.arguments import (
    ADNetArguments,
    HaltingFitArguments,
    ImageModelArguments,
    build_task_model,
    end_run,
    num_blocks,
    parse_arguments,
    read_json_argument,
    resume_checkpoint,
    save_results,
    saved_if_failing,
    start_afresh,
)
from adnet_examples.data import (
    align_class_labels,
    backbone_channels,
    default_image_processor,
    image_transform,
    is_grey,
    load_image_dataset,
    read_digits,
    read_image_folder,
    sample_images,
    saved_image_processor,
    select,
    to_channels,
)
from adnet_hf.trainer_adnet import ADNetTrainingArguments, compute_classification_metrics

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """Images and labels: an image folder per split, a dataset, or MNIST-style CSV / IDX files."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset for `datasets.load_dataset` (a local folder or a Hub id): its train and validation "
            "splits."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder: one sub-folder of images per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder, like train_dir."})
    train_file: str | None = field(
        default=None, metadata={"help": "Grey digits: a CSV(.gz) of pixels then label, or IDX images."}
    )
    train_labels_file: str | None = field(default=None, metadata={"help": "IDX labels for an IDX train_file."})
    validation_file: str | None = field(default=None, metadata={"help": "Like train_file."})
    validation_labels_file: str | None = field(default=None, metadata={"help": "IDX labels for validation_file."})
    image_column_name: str = field(default="image", metadata={"help": "The dataset's image column."})
    label_column_name: str = field(default="label", metadata={"help": "The dataset's label column."})
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the square input when no image processor is saved (default: the training images' side if "
            "they share a square one, else 224)."
        },
    )
    augment: bool | None = field(
        default=None,
        metadata={
            "help": "Random resized crop and horizontal flip of training images (default: on, except for digit files)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep N training images, drawn at random (--seed), as Transformers' example."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation images."})

    def __post_init__(self):
        sources = {
            "--dataset_name": self.dataset_name,
            "--train_dir / --validation_dir": self.train_dir or self.validation_dir,
            "--train_file / --validation_file": self.train_file or self.validation_file,
        }
        given = [name for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise ValueError(f"Pass the images one way: {', '.join(sources)} (got {given or 'none'}).")
        for labels, images in (
            (self.train_labels_file, self.train_file),
            (self.validation_labels_file, self.validation_file),
        ):
            if labels is not None and images is None:
                raise ValueError(
                    f"{labels} labels IDX images: pass those images too (--train_file / --validation_file)."
                )
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be a positive number of pixels, got {self.image_size}.")
        if self.augment is None:
            self.augment = self.train_file is None

    def load(self, seed: int) -> datasets.DatasetDict:
        """The train and validation splits given, with `image` and `label` columns: `max_train_samples` training
        images drawn with `seed`, the first `max_eval_samples` validation images."""
        if self.train_file is not None or self.validation_file is not None:
            files = {
                "train": (self.train_file, self.train_labels_file),
                "validation": (self.validation_file, self.validation_labels_file),
            }
            return datasets.DatasetDict(
                {
                    split: read_digits(*paths, self.limit(split), seed if split == "train" else None)
                    for split, paths in files.items()
                    if paths[0] is not None
                }
            )
        if self.dataset_name is None:
            folders = {"train": self.train_dir, "validation": self.validation_dir}
            raw = {split: read_image_folder(path) for split, path in folders.items() if path is not None}
        else:
            loaded = load_image_dataset(self.dataset_name, self.dataset_config_name)
            raw = {
                split: self.standard_columns(split, loaded[split])
                for split in ("train", "validation")
                if split in loaded
            }
        if "train" in raw and self.max_train_samples is not None:
            raw["train"] = raw["train"].shuffle(seed=seed)
        return datasets.DatasetDict({split: select(dataset, self.limit(split)) for split, dataset in raw.items()})

    def limit(self, split: str) -> int | None:
        return self.max_train_samples if split == "train" else self.max_eval_samples

    def standard_columns(self, split: str, dataset: datasets.Dataset) -> datasets.Dataset:
        """`dataset` with its image and label columns named `image` and `label`."""
        names = {self.image_column_name: "image", self.label_column_name: "label"}
        for column, flag in zip(names, ("--image_column_name", "--label_column_name")):
            if column not in dataset.column_names:
                raise ValueError(
                    f"The {split} split has no column {column!r} ({flag}); its columns: {dataset.column_names}."
                )
        return dataset.rename_columns({old: new for old, new in names.items() if old != new})


def checkpoint_classes(model_args: ImageModelArguments) -> list[str] | None:
    """The class names of a checkpoint's classifier (`id2label`), for evaluating it without training images."""
    if model_args.model_name_or_path is None:
        return None
    id2label = AutoConfig.from_pretrained(model_args.model_name_or_path).id2label
    return [id2label[i] for i in range(len(id2label))]


def load_backbone_config(model_args: ImageModelArguments, sample: list) -> dict | None:
    """`--backbone_config`, its `num_channels` from the training images where it does not set it (1 when all the
    sampled images are grey, else 3)."""
    if model_args.backbone_config is None:
        return None
    backbone = read_json_argument(model_args.backbone_config)
    if "num_channels" not in backbone:
        backbone["num_channels"] = 1 if all(is_grey(image) for image in sample) else 3
        logger.info(f"--backbone_config sets no num_channels: {backbone['num_channels']}, from the training images.")
    return backbone


def image_processor(model_args: ImageModelArguments, data_args: DataArguments, sample: list, num_channels: int):
    """The checkpoint's image processor (or --image_processor_name's), else a default built from `sample`."""
    name = model_args.image_processor_name or model_args.model_name_or_path
    processor = saved_image_processor(name)
    if processor is None and model_args.image_processor_name is not None:
        raise ValueError(f"--image_processor_name {name}: no image processor saved there.")
    if processor is not None:
        if data_args.image_size is not None:
            raise ValueError(f"--image_size sets the default image processor's size; {name} has its own processor.")
        return processor
    processor = default_image_processor(sample, num_channels, data_args.image_size)
    logger.warning(
        f"No image processor saved with {name or '--backbone_config'}: using a default, "
        f"{type(processor).__name__}(size={processor.size['shortest_edge']}, "
        f"image_mean={processor.image_mean}, image_std={processor.image_std}) from the training images. "
        "Pass --image_processor_name for another, or --image_size for another size."
    )
    return processor


def check_channels(processor, num_channels: int, sample: list) -> None:
    """Refuse a processor normalising another number of channels, and sampled images the backbone cannot take."""
    mean = processor.image_mean if getattr(processor, "do_normalize", False) else None
    if isinstance(mean, (list, tuple)) and len(mean) != num_channels:
        raise ValueError(
            f"The image processor normalises {len(mean)} channels (image_mean={list(mean)}), the "
            f"backbone takes num_channels={num_channels}."
        )
    for image in sample:
        to_channels(image, num_channels)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, adnet_args, data_args, training_args, fit_args = parse_arguments(
        (ImageModelArguments, ADNetArguments, DataArguments, ADNetTrainingArguments, HaltingFitArguments), argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    checkpoint = resume_checkpoint(training_args) if training_args.do_train else None
    raw = data_args.load(training_args.seed)
    for split, flag, wanted in (
        ("train", "--do_train", training_args.do_train),
        ("validation", "--do_eval", training_args.do_eval),
    ):
        if wanted and split not in raw:
            raise ValueError(
                f"{flag} needs {split} images: --{split}_dir, --{split}_file, or a dataset with a {split} split."
            )
    raw = align_class_labels(raw, "label", None if "train" in raw else checkpoint_classes(model_args))
    names = next(iter(raw.values())).features["label"].names
    sample = sample_images(raw["train" if "train" in raw else "validation"])
    labels = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }
    model, trainer_class = build_task_model(
        "image-classification",
        model_args,
        adnet_args,
        labels,
        load_backbone_config(model_args, sample),
        {"ignore_mismatched_sizes": True} if model_args.ignore_mismatched_sizes else None,
    )
    fit_args.resolve(model, training_args.do_train, len(raw["train"]) if training_args.do_train else 0)
    fit_raw = None
    if training_args.do_train:
        raw["train"], fit_raw = fit_args.split(raw["train"], training_args.seed)
    num_channels = backbone_channels(model)
    processor = image_processor(model_args, data_args, sample, num_channels)
    check_channels(processor, num_channels, sample)
    splits = {
        split: dataset.with_transform(image_transform(processor, num_channels, data_args.augment and split == "train"))
        for split, dataset in raw.items()
    }
    training_args.remove_unused_columns = False  # the transform reads the `image` column, which forward does not
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=splits.get("train"),
        eval_dataset=splits.get("validation"),
        processing_class=processor,
        compute_metrics=compute_classification_metrics,
    )
    results: dict[str, float] = {}
    if training_args.do_train:
        start_afresh(training_args, inputs=(model_args.model_name_or_path, model_args.image_processor_name))
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        # fitted without augmentation: the step predictions inference will see
        fit_images = raw["train"] if fit_raw is None else fit_raw
        with saved_if_failing(trainer, "Fitting the halting units"):
            fit_args.fit(trainer, fit_images.with_transform(image_transform(processor, num_channels)))
        trainer.save_model()
        results.update(save_results(trainer, "train", train_result.metrics))
    if training_args.do_eval:
        results.update(save_results(trainer, "eval", {**trainer.evaluate(), "eval_num_blocks": num_blocks(model)}))
    end_run(trainer.accelerator)
    return results


if __name__ == "__main__":
    main()
