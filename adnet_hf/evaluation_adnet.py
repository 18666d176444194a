"""The one place where adnet_hf measures a model: task quality and the computation its exits used.

- Quality: accuracy (with F1 of class 1 for two classes), subset accuracy and micro-F1 for multi-label, Pearson /
  Spearman / MSE for regression, computed with numpy alone to the values of scikit-learn's and scipy's functions
  (GLUE's metric), so that the core package needs neither; perplexity for causal LMs.
- Exit statistics: the means of the model's `exit_steps` (backbone steps executed, fixed steps included) and
  `executed_layers` (blocks executed), per sample, or per predicted token whose label is not -100 for a causal LM.

Metrics pool over a whole evaluation set, so each batch is first reduced to its items (`prediction_items`), items
are concatenated (`pooled_items`), and `evaluation_metrics` turns them into numbers. `evaluate_batches` runs that
loop for one exit setting and `sweep_exits` for several, with the setting passed per call (`exit_threshold`), never
written into the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .losses_adnet import IGNORE_INDEX

EXIT_STATISTICS = ("exit_steps", "executed_layers")
# The metric an exit setting is judged by, in order of precedence: a causal LM's, a regressor's, a classifier's.
QUALITY_METRICS = ("perplexity", "pearson", "accuracy")


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """The share of samples predicted right: every label of a sample, for multi-label (subset accuracy)."""
    right = predictions == references
    return float(right.reshape(len(right), -1).all(-1).mean())


def positive_f1(predictions: np.ndarray, references: np.ndarray, undefined: float) -> float:
    """F1 of the 1s over every entry: 2 TP / (2 TP + FP + FN), micro-averaged where entries are labels. `undefined`
    is its value where no 1 is predicted nor present (scikit-learn's `zero_division`: 0 for its binary F1)."""
    predicted, present = predictions == 1, references == 1
    total = predicted.sum() + present.sum()
    return float(2 * (predicted & present).sum() / total) if total else undefined


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r as scipy computes it: undefined (nan) where either side is constant, which is tested exactly
    (a constant's mean can differ from it by rounding, and would give a spurious r)."""
    if (x == x[0]).all() or (y == y[0]).all():
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    return float(np.clip(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)), -1.0, 1.0))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing their average rank (Spearman's convention); all nan if a value is nan, as
    scipy propagates it."""
    if np.isnan(values).any():
        return np.full(values.shape, math.nan)
    _, groups, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[groups]


def regression_metrics(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Pearson's and Spearman's correlations (GLUE's STS-B metric) and the mean squared error, in float64."""
    predictions, references = predictions.astype(np.float64), references.astype(np.float64)
    return {
        "pearson": pearson(predictions, references),
        "spearman": pearson(average_ranks(predictions), average_ranks(references)),
        "mse": float(np.mean((predictions - references) ** 2)),
    }


def task_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Quality of a classifier's or regressor's predictions, with numpy alone.

    The values equal scikit-learn's and scipy's functions (GLUE's metrics), so the core package needs neither.

    Args:
        logits (np.ndarray): samples x num_labels.
        labels (np.ndarray): samples (class indices or regression targets), or samples x num_labels (multi-label).

    Returns:
        The metrics by name. With one output (regression) `pearson`, `spearman` and `mse`. With labels shaped like
            the logits (multi-label) `accuracy`, every label right (a label is predicted when its logit is > 0 and
            present when its label is > 0.5), and `micro_f1` over every label (1 where none is predicted nor
            present). Otherwise `accuracy` of the argmax and, for two classes, `f1` of class 1 (GLUE's metric for
            MRPC and QQP; 0 where class 1 is neither predicted nor present).
    """
    if logits.shape[-1] == 1:
        return regression_metrics(logits.reshape(-1), labels.reshape(-1))
    if labels.ndim == logits.ndim:
        predictions, references = (logits > 0).astype(np.int64), (labels > 0.5).astype(np.int64)
        return {
            "accuracy": accuracy(predictions, references),
            "micro_f1": positive_f1(predictions, references, undefined=1.0),
        }
    predictions = logits.argmax(-1)
    metrics = {"accuracy": accuracy(predictions, labels)}
    if logits.shape[-1] == 2:
        metrics["f1"] = positive_f1(predictions, labels, undefined=0.0)
    return metrics


def predicted_tokens(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's per-position `values` (batch x tokens x ...) at the positions that predict a label other than
    -100: position t predicts the label at t + 1, as the model shifts them."""
    return values[:, :-1][labels[:, 1:] != IGNORE_INDEX]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each predicted token whose label is not -100 (`logits` batch x tokens x vocab)."""
    targets = labels[:, 1:]
    return F.cross_entropy(predicted_tokens(logits, labels).float(), targets[targets != IGNORE_INDEX], reduction="none")


def perplexity(losses: torch.Tensor) -> float:
    """exp of the mean token cross-entropy: `losses` are `token_losses` pooled over an evaluation set."""
    return math.exp(losses.double().mean().item())


def exit_items(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """`exit_steps` and `executed_layers` of the evaluated items of a batch: every sample, or for a causal LM (exit
    steps batch x tokens) every predicted token whose label is not -100 (without labels: every non-padding token)."""
    items = {name: outputs[name] for name in EXIT_STATISTICS}
    if outputs["exit_steps"].dim() == 1:
        return items
    if labels is None:
        real = outputs["exit_steps"] > 0  # padding tokens report 0 steps
        return {name: values[real] for name, values in items.items()}
    return {name: predicted_tokens(values, labels) for name, values in items.items()}


def prediction_items(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch reduced to what its metrics need, per item: a classifier keeps its `logits` and `labels`, a causal
    LM (too large to keep its logits) each predicted token's loss; both keep their exit statistics.

    `outputs` is a model output, or any mapping with `logits`, `exit_steps` and `executed_layers`.
    """
    if outputs["exit_steps"].dim() == 1:
        quality = {"logits": outputs["logits"], "labels": labels}
    else:
        quality = {"token_losses": token_losses(outputs["logits"], labels)}
    return {**quality, **exit_items(outputs, labels)}


def evaluation_metrics(items: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Quality and mean exit statistics of `prediction_items` pooled (concatenated) over an evaluation set."""
    if not items or not len(items["executed_layers"]):
        raise ValueError("No item to evaluate: the batches are empty (or, for a causal LM, every label is -100).")
    if "token_losses" in items:
        metrics = {"perplexity": perplexity(items["token_losses"])}
    else:
        metrics = task_metrics(items["logits"].float().cpu().numpy(), items["labels"].cpu().numpy())
    return {**metrics, **{name: items[name].double().mean().item() for name in EXIT_STATISTICS}}


def quality_metric(metrics: Mapping[str, float]) -> str:
    """The name of the metric that judges an exit setting: perplexity (lower is better), Pearson or accuracy."""
    return next(name for name in QUALITY_METRICS if name in metrics)


@torch.no_grad()
def pooled_items(
    model,
    batches: Iterable[dict],
    exit_policy: str | None = None,
    exit_threshold: float | int | None = None,
    gather: Callable[[dict], dict] | None = None,
) -> dict[str, torch.Tensor]:
    """The `prediction_items` of `model` on every batch (model inputs with `labels`), concatenated on the CPU.

    Kept per item, so that a subset (e.g. the items that exit at one step) can be scored too. `gather` (e.g.
    `accelerator.gather_for_metrics`) collects each batch's items from every process first; it needs items of the
    same count on every process, so samples, not a causal LM's token losses. The model is put in eval mode (exits
    are an inference pass).
    """
    model.eval()
    pooled: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        inputs = {name: value.to(model.device) for name, value in batch.items()}
        labels = inputs.pop("labels")
        outputs = model(**inputs, exit_policy=exit_policy, exit_threshold=exit_threshold)
        items = prediction_items(outputs, labels)
        for name, values in (items if gather is None else gather(items)).items():
            pooled.setdefault(name, []).append(values.cpu())
    return {name: torch.cat(values) for name, values in pooled.items()}


def evaluate_batches(
    model, batches: Iterable[dict], exit_policy: str | None = None, exit_threshold: float | int | None = None
) -> dict[str, float]:
    """Quality and computation of `model` on `batches` with one exit setting, pooled over every batch.

    The model is put in eval mode and runs with real exits; the setting applies to these calls only and is never
    written into the config.

    Args:
        model (ADNetPreTrainedModel): An ADNet task model.
        batches (Iterable[dict]): Model inputs with `labels`.
        exit_policy (str | None): The exit policy. Defaults to `None` (the config's).
        exit_threshold (float | int | None): The policy's setting (`halting_epsilon`, `confidence_threshold` or
            `patience`). Defaults to `None` (the config's).

    Returns:
        The metrics by name. `task_metrics` for a classifier or regressor, `perplexity` for a causal LM (over the
            predicted tokens whose label is not -100); and the means of `exit_steps` (backbone steps run, fixed
            ones included) and `executed_layers` (blocks run), per sample or per predicted token.
    """
    return evaluation_metrics(pooled_items(model, batches, exit_policy, exit_threshold))


def sweep_exits(
    model, batches: Iterable[dict], settings: Iterable[tuple[str, float | int | None]], return_items: bool = False
) -> list[dict]:
    """`evaluate_batches` for several exit settings: one record per setting, in order.

    The config is left as it was, so the sweep can be compared, saved or timed against the configured model
    afterwards.

    Args:
        model (ADNetPreTrainedModel): An ADNet task model.
        batches (Iterable[dict]): Model inputs with `labels` (read once into a list, then once per setting).
        settings (Iterable[tuple[str, float | int | None]]): `(exit_policy, exit_threshold)` pairs; put
            `("none", None)` first for the full-depth reference.
        return_items (bool): Also keep, under `items`, the per-sample outcomes each record's metrics come from
            (one real exiting pass: what risk control reads). Defaults to `False`.

    Returns:
        Per setting, `exit_policy`, `exit_threshold` and its `evaluate_batches` metrics.
    """
    batches = list(batches)
    records = []
    for policy, threshold in settings:
        items = pooled_items(model, batches, policy, threshold)
        record = {"exit_policy": policy, "exit_threshold": threshold, **evaluation_metrics(items)}
        records.append({**record, "items": items} if return_items else record)
    return records


def sample_errors(items: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Whether a single-label classifier's prediction (the argmax of its pooled `logits`) is wrong, per sample
    (bool); samples labelled -100 count in no metric, and are left out."""
    labels = items["labels"]
    if labels.dim() != 1 or items["logits"].shape[-1] < 2:
        raise ValueError(
            f"sample_errors needs a single-label classifier's items (labels of shape (samples,) and "
            f"logits with >= 2 classes), got labels {tuple(labels.shape)} and logits "
            f"{tuple(items['logits'].shape)}."
        )
    kept = labels != IGNORE_INDEX
    return items["logits"][kept].argmax(-1) != labels[kept]


__all__ = [
    "EXIT_STATISTICS",
    "evaluate_batches",
    "evaluation_metrics",
    "exit_items",
    "perplexity",
    "pooled_items",
    "prediction_items",
    "predicted_tokens",
    "quality_metric",
    "sample_errors",
    "sweep_exits",
    "task_metrics",
    "token_losses",
]
