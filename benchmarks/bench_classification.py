"""Text or image classification (or text regression): quality, executed layers and measured wall-clock speed-up of
each exit policy.

Every number is measured in this process against the same weights at full depth (`exit_policy="none"`), at
batch 1 and batch 32, on a GLUE-style TSV (single sentences or pairs, e.g. SST-2, MRPC or STS-B dev), on IDX
images (e.g. the MNIST test set) or on an image folder (one sub-folder per class). Labels, words (`entailment`) or
numbers, are read as the model's training named them (its `label2id`). Quality is accuracy, or Pearson's
correlation for a regression model (one output; only `halting` exits then, as `confidence` and `patience` need
classes), with the executed layers from `adnet_hf.evaluation_adnet.sweep_exits`: each setting is passed per call,
never written into the config. A plain fine-tuned model (e.g. `BertForSequenceClassification`) can be given as a
second reference (`--reference`); without one, `--plain_timing` times the plain Transformers model of the same
architecture holding the ADNet backbone's weights (its head random: wall-clock does not depend on the weights'
values, so its quality is not reported). Either plain arm is then timed in turns with every exit setting too, for
the `speedup_vs_plain_b*` columns.

    python -m benchmarks.bench_classification --model outputs/sst2-adnet \
        --data data/glue/SST-2/dev.tsv --name sst2_minilm
    python -m benchmarks.bench_classification --model outputs/mnist-adnet --name mnist_resnet \
        --images data/mnist/t10k-images-idx3-ubyte.gz \
        --image_labels data/mnist/t10k-labels-idx1-ubyte.gz
    python -m benchmarks.bench_classification --model outputs/photos-adnet --image_folder photos/validation \
        --name photos_resnet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

import adnet_hf  # noqa: F401  (registers the Auto classes)
from adnet_examples.data import (
    ImageDataset,
    backbone_channels,
    image_batches,
    make_batches,
    model_label_ids,
    read_idx,
    read_image_folder,
    read_tsv,
    saved_image_processor,
    select,
)
from adnet_hf.evaluation_adnet import quality_metric, sweep_exits, task_metrics
from adnet_hf.exits_adnet import EXIT_RULES, FULL_DEPTH

from .common import (
    benchmark_parser,
    interleaved_seconds,
    parse_benchmark_args,
    row_policy,
    run_batches,
    save_figure,
    write_results,
)

# The settings of each exit rule (`EXIT_RULES`) measured by default, from the most cautious to the most aggressive.
DEFAULT_SETTINGS = {
    "halting": [0.02, 0.1, 0.2, 0.4, 0.6],
    "confidence": [0.99, 0.95, 0.9, 0.8, 0.7],
    "patience": [3, 2, 1],
}
# The plain arm's row with `--plain_timing`: the backbone's plain model on the ADNet weights, timed, not scored.
PLAIN_TIMING_ROW = "plain model, ADNet backbone weights (timing only)"


def with_labels(batches: list[dict], labels: torch.Tensor) -> list[dict]:
    """`batches` (of every sample, in order) with their labels, as `evaluation_adnet` takes them."""
    sizes = [len(next(iter(batch.values()))) for batch in batches]
    return [{**batch, "labels": part} for batch, part in zip(batches, labels.split(sizes))]


def is_regression(model) -> bool:
    """One output: scores, judged by Pearson's r, and only exit rules that need no classes apply."""
    return model.config.num_labels == 1


@torch.inference_mode()
def plain_quality(reference, batches: list[dict], labels: torch.Tensor) -> dict[str, float]:
    """`task_metrics` of a plain model, which has no exits to count."""
    logits = torch.cat([reference(**batch).logits for batch in batches])
    return task_metrics(logits.float().numpy(), labels.numpy())


def quality_row(record: dict, full: dict, num_blocks: int) -> dict:
    """A `sweep_exits` record as a results row: quality, its drop from the `full`-depth record's in points, and the
    executed layers."""
    metric, layers = quality_metric(full), record["executed_layers"]
    return {
        "policy": row_policy(record["exit_policy"]),
        "setting": record["exit_threshold"],
        metric: record[metric],
        f"{metric}_drop_pts": 100 * (full[metric] - record[metric]),
        "executed_layers": layers,
        "ideal_speedup": num_blocks / layers,
    }


def plain_twin(model, auto_class):
    """The plain Transformers model of `model`'s backbone, holding the ADNet backbone's weights (its own head, e.g.
    BERT's pooler and classifier, random)."""
    config = model.config.backbone_config.__class__.from_dict(model.config.backbone_config.to_dict())
    config.num_labels = model.config.num_labels
    plain = auto_class.from_config(config)
    _, unexpected = plain.base_model.load_state_dict(model.base_model.backbone.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"The plain {config.model_type} model does not hold the ADNet backbone's {unexpected}")
    return plain.eval()


def timed_arms(model, reference, batches: list[dict], **exit_setting) -> dict:
    """What `interleaved_seconds` takes turns at: ADNet at full depth, with `exit_setting` when given, and the plain
    `reference` when there is one."""
    arms = {"none": lambda: run_batches(model, batches, exit_policy=FULL_DEPTH)}
    if exit_setting:
        arms["exit"] = lambda: run_batches(model, batches, **exit_setting)
    if reference is not None:
        arms["plain"] = lambda: run_batches(reference, batches)
    return arms


def plain_row(model, reference, largest: list[dict], labels: torch.Tensor, metric: str, timing_only: bool) -> dict:
    """The plain arm's row: the reference's quality, or none for the timing-only twin (`--plain_timing`)."""
    quality = None if timing_only else plain_quality(reference, largest, labels)[metric]
    return {
        "policy": PLAIN_TIMING_ROW if timing_only else "plain reference",
        "setting": None,
        metric: quality,
        f"{metric}_drop_pts": None,
        "executed_layers": float(model.config.num_blocks),
        "ideal_speedup": 1.0,
    }


def measure(model, reference, batches_by_size, labels, settings, repeats, timing_only: bool = False) -> list[dict]:
    """The full-depth row, the plain arm's and one per exit setting: quality and executed layers from `sweep_exits`
    on the largest batches, and the measured speed-up at every batch size against full depth (`speedup_b*`) and
    against the plain arm timed in the same turns (`speedup_vs_plain_b*`)."""
    num_blocks = model.config.num_blocks
    largest = batches_by_size[max(batches_by_size)]
    records = sweep_exits(model, with_labels(largest, labels), [(FULL_DEPTH, None)] + settings)
    full, *exits = [quality_row(record, records[0], num_blocks) for record in records]
    rows = [full]
    if reference is not None:
        plain = plain_row(model, reference, largest, labels, quality_metric(full), timing_only)
        for size, batches in batches_by_size.items():
            seconds = interleaved_seconds(timed_arms(model, reference, batches), repeats)
            plain[f"speedup_b{size}"] = seconds["none"] / seconds["plain"]
        rows.append(plain)
    for row in exits:
        exit_setting = {"exit_policy": row["policy"], "exit_threshold": row["setting"]}
        for size, batches in batches_by_size.items():
            seconds = interleaved_seconds(timed_arms(model, reference, batches, **exit_setting), repeats)
            row[f"speedup_b{size}"] = seconds["none"] / seconds["exit"]
            row[f"efficiency_b{size}"] = row[f"speedup_b{size}"] / row["ideal_speedup"]
            if reference is not None:
                row[f"speedup_vs_plain_b{size}"] = seconds["plain"] / seconds["exit"]
        rows.append(row)
        print(row, flush=True)
    return rows


def plot(rows: list[dict], sizes: list[int]):
    metric = quality_metric(rows[0])
    scale = 100 if metric == "accuracy" else 1

    def draw(axis, index: int) -> None:
        size = sizes[index]
        for policy in DEFAULT_SETTINGS:
            points = [(r[f"speedup_b{size}"], scale * r[metric]) for r in rows if r["policy"] == policy]
            if points:
                axis.plot(*zip(*points), marker="o", label=policy)
        axis.axhline(scale * rows[0][metric], color="gray", linestyle="--", label="full depth")
        axis.set_xlabel(f"measured speed-up vs full depth (batch {size})")
        axis.set_ylabel("accuracy (%)" if metric == "accuracy" else metric)

    return lambda path: save_figure(path, len(sizes), draw)


def timed_samples(args: argparse.Namespace, size: int) -> int | None:
    """How many samples the batches of `size` hold: batch 1 only the first `max_samples_batch1` (timing), unless it
    is the largest size, whose batches the quality sweep reads over every sample."""
    return args.max_samples_batch1 if size == 1 < max(args.batch_sizes) else None


def labelled_inputs(args: argparse.Namespace, model: PreTrainedModel) -> tuple[dict[int, list[dict]], torch.Tensor]:
    """Batches of each size (`timed_samples`) of the data the arguments name, and its labels as `model`'s ids
    (`model_label_ids`), for any loaded sequence or image classifier, ADNet or plain: each model is scored on the
    labels it was trained with. Text goes through `--tokenizer` or the model's own, images through the model's saved
    image processor."""
    if args.data is None:
        dataset = image_dataset(args, model)
        batches_by_size = {size: image_batches(dataset, size, timed_samples(args, size)) for size in args.batch_sizes}
        return batches_by_size, dataset.labels
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model.name_or_path)
    texts, raw_labels = read_tsv(Path(args.data), args.max_samples)
    batches_by_size = {
        size: make_batches(tokenizer, texts, size, args.max_length, timed_samples(args, size))
        for size in args.batch_sizes
    }
    return batches_by_size, model_label_ids(raw_labels, model.config, args.data)


def image_dataset(args: argparse.Namespace, model: PreTrainedModel) -> ImageDataset:
    """The images of `--image_folder` (class names from its sub-folders), or of `--images` with `--image_labels`,
    as `model` reads them; IDX images without a saved processor are normalised as MNIST's."""
    processor = saved_image_processor(model.name_or_path)
    if args.image_folder is None:
        images, labels, source = read_idx(args.images), read_idx(args.image_labels), args.image_labels
    else:
        if processor is None:
            raise ValueError(
                f"{model.name_or_path} has no saved image processor, which --image_folder images need: save the "
                "one it was trained with beside it (run_image_classification.py does)."
            )
        folder = select(read_image_folder(args.image_folder), args.max_samples)
        images, labels, source = folder["image"], folder.features["label"].int2str(folder["label"]), args.image_folder
    labels = model_label_ids(labels[: args.max_samples], model.config, source)
    return ImageDataset(images, labels, args.max_samples, processor, backbone_channels(model))


def input_data(args: argparse.Namespace) -> str:
    """The data the arguments name (`--data`, `--images` or `--image_folder`), for the results."""
    return args.data or args.images or args.image_folder


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and the labelled data (a text TSV, IDX images or an image folder) a classification benchmark
    reads: exactly one kind of data."""
    parser.add_argument("--model", required=True, help="fine-tuned ADNet checkpoint folder")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="GLUE-style TSV: `sentence` (or a pair of sentence columns) and a label column")
    data.add_argument(
        "--images",
        help="IDX grey images, through the model's saved image processor (without one, normalised with MNIST's "
        "statistics); with --image_labels",
    )
    data.add_argument(
        "--image_folder",
        help="one sub-folder of images per class (as run_image_classification.py --validation_dir), through the "
        "model's saved image processor",
    )
    parser.add_argument("--image_labels", help="IDX labels of --images")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=128)


def load_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The batches of each size and labels (`labelled_inputs`) of the data the arguments name, the ADNet model and
    its plain arm (`load_models`)."""
    if (args.images is None) != (args.image_labels is None):
        parser.error("--images and --image_labels go together")
    model, reference = load_models(task_auto_class(args), args)
    return *labelled_inputs(args, model), model, reference


def task_auto_class(args: argparse.Namespace):
    """The Auto class of the models that read the data the arguments name: text or images."""
    return AutoModelForSequenceClassification if args.data else AutoModelForImageClassification


def load_models(auto_class, args: argparse.Namespace):
    """The ADNet model and its plain arm: `--reference`, the `--plain_timing` twin, or none."""
    model = auto_class.from_pretrained(args.model).eval()
    if args.reference:
        return model, auto_class.from_pretrained(args.reference).eval()
    return model, plain_twin(model, auto_class) if getattr(args, "plain_timing", False) else None


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "classification")
    add_input_arguments(parser)
    plain = parser.add_mutually_exclusive_group()
    plain.add_argument("--reference", help="plain fine-tuned checkpoint of the same backbone (optional)")
    plain.add_argument(
        "--plain_timing",
        action="store_true",
        help="time the plain model of the backbone's architecture with the ADNet backbone's weights",
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--max_samples_batch1",
        type=int,
        default=200,
        help="samples timed at batch 1 when a larger batch size is measured too (accuracy always uses all samples)",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        choices=list(DEFAULT_SETTINGS),
        help="default: all three, or those that need no classes for a regression model",
    )
    for policy, values in DEFAULT_SETTINGS.items():
        parser.add_argument(
            f"--{policy}",
            type=type(values[0]),
            nargs="+",
            default=values,
            help=f"{EXIT_RULES[policy].config_field} values",
        )
    args = parse_benchmark_args(parser, argv)
    batches_by_size, labels, model, reference = load_inputs(parser, args)
    regression = is_regression(model)
    policies = args.policies or [p for p in DEFAULT_SETTINGS if EXIT_RULES[p].supports_regression or not regression]
    needing_classes = [p for p in policies if not EXIT_RULES[p].supports_regression]
    if regression and needing_classes:
        parser.error(f"a regression model cannot exit by {', '.join(needing_classes)} (they need class predictions)")
    settings = [(policy, value) for policy in policies for value in getattr(args, policy)]
    rows = measure(model, reference, batches_by_size, labels, settings, args.repeats, args.plain_timing)
    payload = {
        "benchmark": "regression" if regression else "classification",
        "model": args.model,
        "reference": PLAIN_TIMING_ROW if args.plain_timing else args.reference,
        "data": input_data(args),
        "samples": len(labels),
        "samples_timed_batch1": args.max_samples_batch1,
        "num_blocks": model.config.num_blocks,
    }
    return write_results(args.name, payload, rows, plot(rows, sorted(batches_by_size)), args.results_dir)


if __name__ == "__main__":
    print(main())
