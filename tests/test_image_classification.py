"""Images the Transformers way: image folders read with `datasets`, labels shared by every split, the backbone's
channels and image processor, train-time augmentation, the image-classification pipeline on the script's output."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import bert_config, resnet_config
from transformers import BertModel, ResNetConfig, ResNetForImageClassification, pipeline

from adnet_examples.data import (
    align_class_labels,
    default_image_processor,
    image_transform,
    random_resized_crop,
    read_image_csv,
    to_channels,
)
from adnet_hf import ADNetConfig, ADNetForImageClassification, ADNetForSequenceClassification

# Three classes a tiny ResNet separates in a few steps: solid colours (RGB), or dark / mid / bright (grey), with noise.
COLOURS = {"blue": (0, 0, 230), "green": (0, 230, 0), "red": (230, 0, 0)}
GREYS = {"bright": 230, "dark": 20, "mid": 125}


def image(value, height: int = 12, width: int = 12, seed: int = 0) -> PIL.Image.Image:
    """A noisy image of one colour (an RGB triple) or one grey level (an int)."""
    shape = (height, width, 3) if isinstance(value, tuple) else (height, width)
    noise = np.random.default_rng(seed).integers(0, 25, shape)
    return PIL.Image.fromarray(np.clip(np.asarray(value) + noise, 0, 255).astype(np.uint8))


def write_folder(root, classes: dict, count: int, first_seed: int = 0) -> None:
    """An image folder: a sub-folder per class, `count` PNGs each, of varying sizes."""
    for name, value in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            image(value, 12 + i % 3, 12 + i % 2, first_seed + i).save(root / name / f"{i}.png")


def split(labels: list, names: list[str] | None = None) -> datasets.Dataset:
    feature = datasets.Value("int64") if names is None else datasets.ClassLabel(names=names)
    return datasets.Dataset.from_dict({"label": labels}, features=datasets.Features({"label": feature}))


def test_validation_missing_a_class_keeps_the_training_ids():
    raw = datasets.DatasetDict(
        {"train": split([0, 1, 2], ["cat", "dog", "zebra"]), "validation": split([0, 1, 1], ["cat", "zebra"])}
    )
    aligned = align_class_labels(raw)
    assert aligned["validation"].features["label"].names == ["cat", "dog", "zebra"]
    assert aligned["validation"]["label"] == [0, 2, 2]  # zebra keeps its training id, 2
    with pytest.raises(ValueError, match=r"classes that the training split \(or the model\) lacks: \['emu'\]"):
        align_class_labels(datasets.DatasetDict({"train": raw["train"], "validation": split([0], ["emu"])}))
    with pytest.raises(ValueError, match="at least two classes"):
        align_class_labels(datasets.DatasetDict({"train": split([0, 0], ["cat"])}))


def test_plain_integer_labels_are_numbered_in_numeric_order():
    aligned = align_class_labels(datasets.DatasetDict({"train": split([10, 2, 9, 2]), "validation": split([9])}))
    assert aligned["train"].features["label"].names == ["2", "9", "10"]
    assert aligned["train"]["label"] == [2, 0, 1, 0] and aligned["validation"]["label"] == [1]


def test_channels_follow_the_backbone():
    grey, colour = image(100), image((10, 200, 30))
    assert to_channels(grey, 3).mode == "RGB" and np.array_equal(
        np.asarray(to_channels(grey, 3))[..., 1], np.asarray(grey)
    )
    assert to_channels(grey, 1).mode == "L" and to_channels(colour, 3).mode == "RGB"
    with pytest.raises(ValueError, match=r"colour image \(PIL mode RGB\) for a backbone with num_channels=1"):
        to_channels(colour, 1)
    with pytest.raises(ValueError, match="num_channels=4"):
        to_channels(colour, 4)


def test_default_processor_normalises_with_the_images_statistics():
    images = [image((10, 200, 30), seed=s) for s in range(3)]
    processor = default_image_processor(images, 3)
    pixels = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images])
    assert processor.size["shortest_edge"] == 12  # the side the images share
    assert np.allclose(processor.image_mean, pixels.mean((0, 1, 2)), atol=1e-6)
    assert np.allclose(processor.image_std, pixels.std((0, 1, 2)), atol=1e-6)
    normalised = processor(images, return_tensors="pt")["pixel_values"]
    assert normalised.shape == (3, 3, 12, 12)
    assert torch.allclose(normalised.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert default_image_processor([image(5, 12, 14)], 1).size["shortest_edge"] == 224  # not square: 224
    flat = PIL.Image.new("L", (4, 4), 3)
    constant = default_image_processor([flat], 1)
    assert list(constant.image_std) == [1.0]  # no spread to divide by
    assert torch.isfinite(constant(flat, return_tensors="pt")["pixel_values"]).all()
    assert default_image_processor(images, 3, size=20).size["shortest_edge"] == 20


def test_augmentation_crops_to_the_processor_size_and_is_seeded():
    processor = default_image_processor([image(5, 16, 16)], 1, size=8)
    batch = {"image": [image(40, 16, 24, seed=s) for s in range(4)], "label": [0, 1, 0, 1]}
    torch.manual_seed(0)
    first = image_transform(processor, 1, augment=True)(batch)
    torch.manual_seed(0)
    again = image_transform(processor, 1, augment=True)(batch)
    plain = image_transform(processor, 1)(batch)
    assert first["pixel_values"].shape == plain["pixel_values"].shape == (4, 1, 8, 8)
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and first["labels"] == [0, 1, 0, 1]
    assert torch.equal(plain["pixel_values"], processor(batch["image"], return_tensors="pt")["pixel_values"])


def test_random_resized_crop_of_the_whole_image_is_a_resize():
    picture = image((10, 100, 200), 10, 20)
    whole = random_resized_crop(picture, (5, 6), scale=(1.0, 1.0), ratio=(2.0, 2.0))
    assert whole.size == (6, 5) and np.array_equal(np.asarray(whole), np.asarray(picture.resize((6, 5), 3)))


def test_csv_rows_must_hold_square_images(tmp_path):
    (tmp_path / "digits.csv").write_text("0,1,2,3,7\n4,5,6,7,1\n0,1,2,1,5,9\n")
    with pytest.raises(ValueError):
        read_image_csv(str(tmp_path / "digits.csv"))
    (tmp_path / "digits.csv").write_text("0,1,2,3,7\n4,5,6,7,1\n")
    images, labels = read_image_csv(str(tmp_path / "digits.csv"))
    assert images.shape == (2, 2, 2) and labels.tolist() == [7, 1]


def test_heads_refuse_a_backbone_of_the_other_modality(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"ADNetForImageClassification takes pixel_values: its backbone must be one "
        r"of \('resnet',\), got 'bert', which takes input_ids",
    ):
        ADNetForImageClassification(ADNetConfig(backbone_config=bert_config()))
    BertModel(bert_config()).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="ADNetForImageClassification takes pixel_values"):
        ADNetForImageClassification.from_backbone(str(tmp_path / "bert"), num_labels=3)
    with pytest.raises(ValueError, match="ADNetForSequenceClassification takes input_ids.*got 'resnet'"):
        ADNetForSequenceClassification(ADNetConfig(backbone_config=resnet_config()))


# ---- the script, end to end -----------------------------------------------------------------------------------------

TRAINING = [
    "--num_train_epochs",
    "20",
    "--per_device_train_batch_size",
    "6",
    "--per_device_eval_batch_size",
    "4",
    "--learning_rate",
    "1e-2",
    "--unit_learning_rate",
    "1e-2",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--seed",
    "0",
    "--num_fixed_steps",
    "0",
    "--unit_hidden_size",
    "8",
]
TINY_RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}


def run_script(tmp_path, *arguments: str, output: str = "out") -> dict:
    from examples import run_image_classification

    return run_image_classification.main([*arguments, "--output_dir", str(tmp_path / output), *TRAINING])


def pipeline_accuracy(output_dir, folder, as_arrays: bool = False) -> float:
    """Accuracy of `pipeline("image-classification")` on the saved model, against the folder names of the images."""
    import adnet_hf  # noqa: F401  (registers the Auto classes)

    classify = pipeline("image-classification", model=str(output_dir))
    files = sorted(folder.glob("*/*.png"))
    inputs = [np.asarray(PIL.Image.open(f))[..., None] if as_arrays else str(f) for f in files]
    predictions = [result[0]["label"] for result in classify(inputs, top_k=1)]
    return float(np.mean([predicted == file.parent.name for predicted, file in zip(predictions, files)]))


@pytest.mark.slow
def test_rgb_folder_on_a_saved_resnet_checkpoint_trains_on_colour_and_runs_in_the_pipeline(tmp_path, caplog):
    write_folder(tmp_path / "data" / "train", COLOURS, 6)
    write_folder(tmp_path / "data" / "val", {name: COLOURS[name] for name in ("blue", "red")}, 3, 100)  # no green
    train, val = tmp_path / "data" / "train", tmp_path / "data" / "val"
    ResNetForImageClassification(ResNetConfig(num_channels=3, num_labels=5, **TINY_RESNET)).save_pretrained(
        tmp_path / "resnet"
    )  # a checkpoint without an image processor, and another number of classes
    results = run_script(
        tmp_path,
        "--model_name_or_path",
        str(tmp_path / "resnet"),
        "--train_dir",
        str(train),
        "--validation_dir",
        str(val),
        "--image_size",
        "12",
        "--do_train",
        "--do_eval",
    )
    assert "No image processor saved with" in caplog.text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["backbone_config"]["num_channels"] == 3
    assert config["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    assert config["label2id"] == {"blue": 0, "green": 1, "red": 2}
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert len(processor["image_mean"]) == 3 and processor["size"] == {"shortest_edge": 12}
    # Red is id 2 in training and in validation: numbered per folder it would be 1 (green), and accuracy would fall.
    assert results["eval_accuracy"] == 1.0
    assert pipeline_accuracy(tmp_path / "out", val) == 1.0
    # Evaluating the saved model alone: its classes from its config; or the folders as one dataset (`datasets`).
    model = ["--model_name_or_path", str(tmp_path / "out"), "--do_eval"]
    assert run_script(tmp_path, *model, "--validation_dir", str(val), output="eval")["eval_accuracy"] == 1.0
    assert run_script(tmp_path, *model, "--dataset_name", str(tmp_path / "data"), output="eval")["eval_accuracy"] == 1.0
    # The plain reference from the same checkpoint: ResNet's own classifier, re-initialised for the three classes.
    run_script(
        tmp_path,
        "--plain_baseline",
        "--ignore_mismatched_sizes",
        "--model_name_or_path",
        str(tmp_path / "resnet"),
        "--train_dir",
        str(train),
        "--image_size",
        "12",
        "--do_train",
        output="plain",
    )
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain["architectures"] == ["ResNetForImageClassification"] and plain["id2label"] == config["id2label"]
    assert (tmp_path / "plain" / "preprocessor_config.json").exists()


@pytest.mark.slow
def test_grey_folder_from_scratch_trains_on_one_channel(tmp_path):
    write_folder(tmp_path / "train", GREYS, 6)
    write_folder(tmp_path / "val", GREYS, 2, first_seed=100)
    results = run_script(
        tmp_path,
        "--backbone_config",
        json.dumps({"model_type": "resnet", **TINY_RESNET}),
        "--train_dir",
        str(tmp_path / "train"),
        "--validation_dir",
        str(tmp_path / "val"),
        "--image_size",
        "12",
        "--do_train",
        "--do_eval",
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["backbone_config"]["num_channels"] == 1  # set from the grey training images
    assert len(json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["image_mean"]) == 1
    # The pipeline turns paths and PIL images into RGB; a one-channel model takes (H, W, 1) arrays.
    assert pipeline_accuracy(tmp_path / "out", tmp_path / "val", as_arrays=True) == results["eval_accuracy"]


@pytest.mark.slow
def test_script_refuses_what_it_cannot_train_correctly(tmp_path):
    write_folder(tmp_path / "train", COLOURS, 2)
    write_folder(tmp_path / "val", {"blue": COLOURS["blue"], "purple": (120, 0, 120)}, 1)
    folders = ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val")]
    scratch = ["--backbone_config", json.dumps({"model_type": "resnet", **TINY_RESNET})]
    with pytest.raises(ValueError, match=r"lacks: \['purple'\]"):
        run_script(tmp_path, *scratch, *folders, "--do_eval")
    one_channel = ["--backbone_config", json.dumps({"model_type": "resnet", "num_channels": 1, **TINY_RESNET})]
    with pytest.raises(ValueError, match="colour image .* num_channels=1"):
        run_script(tmp_path, *one_channel, "--train_dir", str(tmp_path / "train"), "--do_train")
    BertModel(bert_config()).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="ADNetForImageClassification takes pixel_values.*got 'bert'"):
        run_script(
            tmp_path,
            "--model_name_or_path",
            str(tmp_path / "bert"),
            "--train_dir",
            str(tmp_path / "train"),
            "--do_train",
        )
    with pytest.raises(ValueError, match="--do_eval needs validation images"):
        run_script(tmp_path, *scratch, "--train_dir", str(tmp_path / "train"), "--do_eval")
