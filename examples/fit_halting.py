#!/usr/bin/env python
"""Fit a trained ADNet classifier's halting units to its own step predictions on the given data (`fit_halting`) and
save the fitted model, for a checkpoint trained without the example scripts' own fit. Data the model was not
trained on fits best (the training scripts' `--fit_halting_split` holds some out for it).

    python examples/fit_halting.py --model outputs/sst2-adnet --data data/glue/SST-2/train.tsv \\
        --max_samples 20000 --max_length 64 --output_dir outputs/sst2-adnet-fitted
    python examples/fit_halting.py --model outputs/mnist-adnet --images data/mnist/mnist_5k.csv.gz \\
        --output_dir outputs/mnist-adnet-fitted

Text: a GLUE-style TSV (`--data`, its first `--max_samples` rows); images: MNIST-style digits (a CSV of pixels then
label, or an IDX pair with `--image_labels`), through the checkpoint's saved image processor. The TSV needs a label
column, but its values are not read.
The fitted model (with the checkpoint's tokenizer or image processor) and `halting_fit.json` (the command and, per
unit, the items at risk and the fit's loss) go to `--output_dir`; choose the exit setting afterwards on held-out
data (`calibrate_exit`, or `benchmarks.pareto_exits` to compare policies).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer

import adnet_hf  # noqa: F401  (registers the Auto classes)
from adnet_examples.data import (
    ImageDataset,
    image_batches,
    make_batches,
    read_idx,
    read_image_csv,
    read_tsv,
    saved_image_processor,
)
from adnet_hf.halting_adnet import OBJECTIVES, fit_halting


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained ADNet classifier checkpoint folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data", help="GLUE-style TSV of the texts to fit on")
    parser.add_argument("--images", help="digits to fit on: a CSV (pixels, then label) or an IDX images file")
    parser.add_argument("--image_labels", help="IDX labels of --images (needed to read an IDX pair)")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--weight_decay", type=float, default=1e-3, help="L2 penalty of the fit")
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="settled_by",
        help="what the units are fitted to (adnet_hf.fit_halting's docstring compares them)",
    )
    args = parser.parse_args(argv)
    if (args.data is None) == (args.images is None):
        parser.error("pass either --data (a TSV) or --images")
    return args


def text_inputs(args: argparse.Namespace):
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts, _ = read_tsv(Path(args.data), args.max_samples)
    batches = make_batches(tokenizer, texts, args.batch_size, args.max_length)
    return AutoModelForSequenceClassification.from_pretrained(args.model), batches, tokenizer


def image_inputs(args: argparse.Namespace):
    images, labels = (
        read_image_csv(args.images)
        if args.image_labels is None
        else (read_idx(args.images), read_idx(args.image_labels))
    )
    processor = saved_image_processor(args.model)
    batches = image_batches(ImageDataset(images, np.asarray(labels), args.max_samples, processor), args.batch_size)
    return AutoModelForImageClassification.from_pretrained(args.model), batches, processor


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model, batches, preprocessor = (text_inputs if args.data else image_inputs)(args)
    fit = fit_halting(model, batches, weight_decay=args.weight_decay, objective=args.objective)
    model.save_pretrained(args.output_dir)
    if preprocessor is not None:
        preprocessor.save_pretrained(args.output_dir)
    command = shlex.join(["python", "examples/fit_halting.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, **dataclasses.asdict(fit)}
    (Path(args.output_dir) / "halting_fit.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
