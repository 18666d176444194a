"""The one place where adnet_hf measures a model: task quality and the computation its exits used.

- Quality: accuracy (with F1 of class 1 for two classes), subset accuracy and micro-F1 for multi-label, Pearson /
  Spearman / MSE for regression, from the `evaluate` module shipped in `adnet_hf/metrics` (it loads offline);
  perplexity for causal LMs.
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
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .losses_adnet import IGNORE_INDEX

if TYPE_CHECKING:
    import evaluate

TASK_METRICS = Path(__file__).with_name("metrics") / "task_metrics.py"
EXIT_STATISTICS = ("exit_steps", "executed_layers")
# The metric an exit setting is judged by, in order of precedence: a causal LM's, a regressor's, a classifier's.
QUALITY_METRICS = ("perplexity", "pearson", "accuracy")


@lru_cache
def load_task_metrics(task: str) -> evaluate.EvaluationModule:
    """The `metrics/task_metrics.py` evaluate module for `task` (single_label, two_class, multi_label, regression),
    loaded once per process."""
    import evaluate  # here, not at the top: importing it takes seconds, and `import adnet_hf` should not

    return evaluate.load(str(TASK_METRICS), task, keep_in_memory=True)


def task_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Quality of a classifier's or regressor's predictions; `logits` is samples x num_labels.

    One label is regression (Pearson, Spearman, MSE); labels shaped like the logits are multi-label (accuracy: every
    label right, a label predicted when its logit is > 0); otherwise accuracy of the argmax, and for two classes the
    F1 of class 1 (GLUE's metric for MRPC and QQP).
    """
    if logits.shape[-1] == 1:
        task, predictions, references = "regression", logits.reshape(-1), labels.reshape(-1)
    elif labels.ndim == logits.ndim:
        task, predictions, references = "multi_label", (logits > 0).astype(np.int64), (labels > 0.5).astype(np.int64)
    else:
        task = "two_class" if logits.shape[-1] == 2 else "single_label"
        predictions, references = logits.argmax(-1), labels
    return load_task_metrics(task).compute(predictions=predictions, references=references)


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
def pooled_items(model, batches: Iterable[dict], exit_policy: str | None = None,
                 exit_threshold: float | int | None = None,
                 gather: Callable[[dict], dict] | None = None) -> dict[str, torch.Tensor]:
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


def evaluate_batches(model, batches: Iterable[dict], exit_policy: str | None = None,
                     exit_threshold: float | int | None = None) -> dict[str, float]:
    """`evaluation_metrics` of `model` on `batches` (model inputs with `labels`) with one exit setting.

    `exit_policy` / `exit_threshold` default to the config's; the threshold is the policy's setting
    (`halting_epsilon`, `confidence_threshold` or `patience`) for these calls only.
    """
    return evaluation_metrics(pooled_items(model, batches, exit_policy, exit_threshold))


def sweep_exits(model, batches: Iterable[dict], settings: Iterable[tuple[str, float | int | None]],
                return_items: bool = False) -> list[dict]:
    """One record per `(exit_policy, exit_threshold)` setting: the setting and its `evaluate_batches` metrics.

    Put `("none", None)` first for the full-depth reference. The config is left as it was, so the sweep can be
    compared, saved or timed against the configured model afterwards. With `return_items`, each record also holds
    the `pooled_items` its metrics come from (`items`): per-sample outcomes of one real exiting pass, which risk
    control and resampling benchmarks read (`sample_errors`).
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
        raise ValueError(f"sample_errors needs a single-label classifier's items (labels of shape (samples,) and "
                         f"logits with >= 2 classes), got labels {tuple(labels.shape)} and logits "
                         f"{tuple(items['logits'].shape)}.")
    kept = labels != IGNORE_INDEX
    return items["logits"][kept].argmax(-1) != labels[kept]


__all__ = [
    "EXIT_STATISTICS",
    "evaluate_batches",
    "evaluation_metrics",
    "exit_items",
    "load_task_metrics",
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
