"""Training ADNet with the Transformers `Trainer`: the paper's optimisation recipe and ADNet's own metrics.

- Per-group AdamW learning rates (backbone, calculation units, output layer), each decaying to a floor that is a
  fixed ratio of its own initial rate; weight decay is the L2 term (none on biases and norms, as Transformers does).
- Max-norm constraint on unit and output-layer weight rows after every optimiser step (`MaxNormCallback`).
- Training logs: expected exit step (`exit_steps`) and halting entropy under the halting distribution, accuracy of
  every step.
- Evaluation: the exits actually taken (`exit_steps`, `executed_layers`), whatever `compute_metrics` is.
- A draft unit on a frozen causal LM (`DraftUnitTrainer`), trained on its top features computed once and cached on
  disk as safetensors shards (`cache_top_features`, `TopFeatureShards`).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import (
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    get_scheduler,
)
from transformers.trainer_utils import SchedulerType
from transformers.utils import logging

from .evaluation_adnet import exit_items, task_metrics
from .losses_adnet import DRAFT_FEATURE_WEIGHT, DRAFT_TOKEN_WEIGHT

if TYPE_CHECKING:
    from .modeling_adnet import ADNetForCausalLM

logger = logging.get_logger(__name__)

PARAMETER_GROUPS = ("backbone", "unit", "output")


@dataclass
class ADNetTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the paper's per-group learning rates and their terminal floor.

    The backbone, the calculation units and the output layers each get their own initial learning rate (a pretrained
    backbone wants a small one, new units a larger one), and each decays to the same fraction of its own rate.
    `ADNetTrainer` also takes a plain `TrainingArguments`, with which these take their defaults. Every argument of
    `TrainingArguments` applies as usual.

    Args:
        backbone_learning_rate (float | None): Initial learning rate of the backbone (LoRA's weights in it
            included). Defaults to `None` (`learning_rate`).
        unit_learning_rate (float | None): Initial learning rate of the calculation units. Defaults to `None`
            (`learning_rate`).
        output_learning_rate (float | None): Initial learning rate of the output layers, e.g. an untied LM head.
            Defaults to `None` (`learning_rate`).
        min_learning_rate_ratio (float): Terminal learning rate of every group as a fraction of its own initial
            rate, in [0, 1]; the `linear` or `cosine` schedule decays to it (other schedules take 0 only). Defaults
            to `0.0` (plain decay to zero).
        overwrite_output_dir (bool): The example scripts' flag (Transformers 4's, gone from `TrainingArguments`
            5): train into a non-empty `output_dir` from scratch instead of resuming from its last checkpoint,
            removing the checkpoints already there. Defaults to `False`.
    """

    backbone_learning_rate: float | None = field(
        default=None, metadata={"help": "Initial learning rate of the backbone (default: `learning_rate`)."}
    )
    unit_learning_rate: float | None = field(
        default=None, metadata={"help": "Initial learning rate of the calculation units (default: `learning_rate`)."}
    )
    output_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Initial learning rate of the output layer(s), e.g. an untied LM head (default: `learning_rate`)."
        },
    )
    min_learning_rate_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Terminal learning rate of every group as a ratio of its own initial rate; the linear or "
            "cosine schedule decays to it. 0 is plain decay to zero."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty output_dir from scratch instead of resuming from its last "
            "checkpoint; the checkpoints already there are removed (Transformers 4's flag, which the "
            "example scripts keep)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.min_learning_rate_ratio <= 1.0:
            raise ValueError(f"min_learning_rate_ratio must be in [0, 1], got {self.min_learning_rate_ratio}.")
        if self.min_learning_rate_ratio > 0 and self.lr_scheduler_type not in (
            SchedulerType.LINEAR,
            SchedulerType.COSINE,
        ):
            raise ValueError(
                "min_learning_rate_ratio > 0 needs lr_scheduler_type 'linear' or 'cosine', got "
                f"{self.lr_scheduler_type.value!r}."
            )


# ADNet's own arguments and their documented defaults, which a plain `TrainingArguments` takes (as `Seq2SeqTrainer`
# reads its generation arguments).
_PLAIN_ARGUMENTS = {f.name for f in fields(TrainingArguments)}
ADNET_ARGUMENT_DEFAULTS = {f.name: f.default for f in fields(ADNetTrainingArguments) if f.name not in _PLAIN_ARGUMENTS}


def adnet_argument(args: TrainingArguments, name: str):
    """ADNet's argument `name` from `args`: its own value, or the default a plain `TrainingArguments` takes."""
    return getattr(args, name, ADNET_ARGUMENT_DEFAULTS[name])


def group_learning_rate(args: TrainingArguments, group: str) -> float:
    """Initial learning rate of a parameter group (`backbone`, `unit` or `output`): `learning_rate` by default."""
    value = adnet_argument(args, f"{group}_learning_rate")
    return args.learning_rate if value is None else value


def adnet_base_model(model: nn.Module) -> nn.Module:
    """The `ADNetModel` of a task model, also when PEFT wraps it (a `PeftModel`'s `base_model` is its tuner)."""
    get_base_model = getattr(model, "get_base_model", None)
    return (model if get_base_model is None else get_base_model()).base_model


def adnet_parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by group: the backbone (LoRA's weights in it included), the calculation units, and the
    rest (the output layers).

    Groups go by identity, so a LM head tied to the input embeddings counts once, as backbone.
    """
    base = adnet_base_model(model)
    owner = {id(p): "backbone" for p in base.backbone.parameters()}
    owner.update({id(p): "unit" for p in base.units.parameters()})
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {group: [] for group in PARAMETER_GROUPS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[owner.get(id(param), "output")].append((name, param))
    return groups


def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """The paper's max-norm constraint, for a training loop of your own: scale every row of a trained unit or
    output-layer `nn.Linear` weight whose L2 norm exceeds `max_norm` back to it (`MaxNormCallback` does it for
    `Trainer`). Call it after each optimiser step.

    Backbone weights (a tied LM head included) are left alone: the constraint is on ADNet's own layers. So are
    frozen ones (`freeze_full_depth`), which must stay exactly as loaded.

    Args:
        model (nn.Module): An ADNet task model, or a PEFT model wrapping one (unwrapped from any distributed
            wrapper).
        max_norm (float): The largest L2 norm a weight row may keep, e.g. `config.max_weight_norm`.
    """
    backbone = {id(p) for p in adnet_base_model(model).backbone.parameters()}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad and id(module.weight) not in backbone:
                module.weight.copy_(torch.renorm(module.weight, p=2, dim=0, maxnorm=max_norm))


class MaxNormCallback(TrainerCallback):
    """The paper's max-norm constraint: after every optimiser step, rescale each trained weight row of the units and
    output layers whose L2 norm exceeds `config.max_weight_norm` back to it.

    Nothing happens while `max_weight_norm` is `None` (the default). Backbone weights, a tied LM head among them,
    and frozen weights are left alone. `ADNetTrainer` adds it; add it to a plain `Trainer` with
    `callbacks=[MaxNormCallback]`.
    """

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        max_norm = getattr(model.config, "max_weight_norm", None)
        if max_norm is not None:
            apply_max_norm(model, max_norm)


class _RunningMeans:
    """Weighted sums of per-item statistics since the last `pop`, kept on the device: no host sync per batch."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        values = values.detach().float()
        weights = torch.ones_like(values) if weights is None else weights.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + (values * weights).sum()
        self.weights[name] = self.weights.get(name, 0.0) + weights.sum()

    def pop(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The means (summed over processes by `reduce`), then start again."""
        if not self.sums:
            return {}
        names = list(self.sums)
        sums = reduce(torch.stack([self.sums[n] for n in names]))
        weights = reduce(torch.stack([self.weights[n] for n in names]))
        self.sums, self.weights = {}, {}
        return dict(zip(names, (sums / weights.clamp(min=1e-12)).tolist()))


def _step_correct(step_logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None) -> torch.Tensor | None:
    """N x B: whether each variable step's prediction is right (classification only)."""
    if problem_type == "single_label_classification":
        return step_logits.argmax(-1) == labels
    if problem_type == "multi_label_classification":
        return ((step_logits > 0) == (labels > 0.5)).all(-1)
    return None


class ADNetTrainer(Trainer):
    """`Trainer` for ADNet task models: per-group learning rates with a floor, max-norm, ADNet logs and metrics.

    The loss is the model's configured ADNet loss (`config.loss_type`, GPSL by default). Under gradient
    accumulation a classifier's per-batch mean is divided by the accumulation steps (exact for equal micro-batches);
    a causal LM's token mean is weighted by the micro-batch's share of the accumulated tokens, as Transformers' own
    causal LMs are.

    Training logs add the expected exit step (`exit_steps`) and the halting entropy under the halting distribution,
    and each variable step's accuracy (`step_{n}_accuracy`) for classifiers. Evaluation runs with real exits and
    adds `eval_exit_steps` and `eval_executed_layers` (steps and blocks run per sample, or per predicted token),
    whatever `compute_metrics` is; the predictions `compute_metrics` gets are `(logits, exit_steps)`.

    It warns when the loss trains no halting units while `exit_policy="halting"`, and when the units are frozen (a
    PEFT model without them in `modules_to_save`: use `adnet_lora_config`).

    Args:
        model (nn.Module | None): An ADNet task model, or a PEFT model wrapping one. Defaults to `None`.
        args (TrainingArguments | None): `ADNetTrainingArguments` for per-group learning rates and a floor, or a
            plain `TrainingArguments` (one learning rate, plain decay). Defaults to `None`
            (`ADNetTrainingArguments()`). `label_smoothing_factor` is refused: the loss is the model's own.
        **kwargs (Any): `Trainer`'s other arguments (`train_dataset`, `eval_dataset`, `data_collator`,
            `compute_metrics`, `callbacks`, ...).
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, **kwargs):
        if args is not None and args.label_smoothing_factor:
            raise ValueError(
                "label_smoothing_factor is not used by ADNetTrainer: the loss is the model's "
                "configured ADNet loss (ADNetConfig.loss_type)."
            )
        super().__init__(model=model, args=args or ADNetTrainingArguments(), **kwargs)
        loss_fn = getattr(self.model, "loss_fn", None)
        if not getattr(loss_fn, "trains_halting", True) and self.model.config.exit_policy == "halting":
            logger.warning(
                f"loss_type={self.model.config.loss_type!r} trains no halting units, yet "
                "exit_policy='halting' exits by them: set exit_policy='none' (or 'confidence' / "
                "'patience' after training the exits)."
            )
        units = list(adnet_base_model(self.model).units.parameters())
        if units and not any(param.requires_grad for param in units):
            logger.warning(
                "The calculation units are frozen (no unit parameter requires a gradient), so halting "
                "stays as initialised. Under PEFT, put them in modules_to_save: "
                "get_peft_model(model, adnet_hf.peft_adnet.adnet_lora_config(model, r=...)) does."
            )
        self.add_callback(MaxNormCallback)
        self._train_stats = _RunningMeans()
        self._exit_stats = _RunningMeans()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        """`Trainer`'s loss (the model's own ADNet loss, scaled under gradient accumulation as the model declares
        with `accepts_loss_kwargs`); in training, also gathers the halting statistics for the next log."""
        loss, outputs = super().compute_loss(
            model, {**inputs, "return_dict": True}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            self._record_training_outputs(outputs, inputs.get("labels"))
        return (loss, outputs) if return_outputs else loss

    def _record_training_outputs(self, outputs, labels: torch.Tensor | None) -> None:
        """Training runs every step, so exits are expectations under the halting distribution: `exit_steps`
        (backbone steps, fixed ones included) and `halting_entropy` (nats); plus `step_{k}_accuracy` for each
        variable backbone step k when the step predictions are classes."""
        config = self.model.config
        probs = outputs.halting_probs.detach().flatten(0, -2)  # items x N; padding tokens are all-zero rows
        real = probs.sum(-1)
        steps = torch.arange(1, probs.shape[-1] + 1, device=probs.device) + config.num_fixed_steps
        self._train_stats.add("exit_steps", (probs * steps).sum(-1), real)
        self._train_stats.add("halting_entropy", -(probs * probs.clamp(min=1e-12).log()).sum(-1), real)
        if outputs.step_logits is None or labels is None:
            return
        correct = _step_correct(outputs.step_logits.detach(), labels, config.problem_type)
        for n, step_correct in enumerate(() if correct is None else correct, start=config.num_fixed_steps + 1):
            self._train_stats.add(f"step_{n}_accuracy", step_correct)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs (those with `loss`) also get the halting statistics averaged since the previous log."""
        if "loss" in logs:
            logs = {**logs, **self._train_stats.pop(self._sum_over_processes)}
        super().log(logs, start_time)

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Predictions are `(logits, exit_steps)`, so `compute_metrics` sees where each sample exited.

        Only these two: the per-step outputs have the steps first (they cannot be concatenated over batches) and the
        rest is large, so `ignore_keys` has nothing left to choose from.
        """
        inputs = self._prepare_inputs(inputs)
        labels = tuple(inputs.get(name) for name in self.label_names)
        has_labels = bool(labels) and all(label is not None for label in labels)
        loss = None
        with torch.no_grad(), self.compute_loss_context_manager():
            if has_labels:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach().mean()
            else:
                outputs = model(**inputs, return_dict=True)
        for name, values in exit_items(outputs, inputs.get("labels")).items():
            self._exit_stats.add(name, values)
        if prediction_loss_only:
            return loss, None, None
        labels = (labels[0] if len(labels) == 1 else labels) if has_labels else None
        return loss, (outputs.logits, outputs.exit_steps), labels

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Adds `{prefix}_exit_steps` and `{prefix}_executed_layers`: the backbone steps and blocks actually run per
        sample (per predicted token) with exits."""
        self._exit_stats = _RunningMeans()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._exit_stats.pop(self._sum_over_processes).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """One parameter group per (ADNet group, weight decay or not), each with its group's initial rate."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            param_groups = adnet_optimizer_groups(opt_model, self.args, self.get_decay_parameter_names(opt_model))
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """With `min_learning_rate_ratio > 0`, `floor_scheduler`: each group decays to its own floor."""
        if self.lr_scheduler is None and adnet_argument(self.args, "min_learning_rate_ratio") > 0:
            self.lr_scheduler = floor_scheduler(optimizer or self.optimizer, self.args, num_training_steps)
            self._created_lr_scheduler = True  # rebuilt by the next `train()`, as Trainer's own schedulers are
        return super().create_scheduler(num_training_steps, optimizer)


def adnet_optimizer_groups(model: nn.Module, args: TrainingArguments, decay_names) -> list[dict]:
    """Optimizer parameter groups as `ADNetTrainer` makes them, for a training loop of your own.

    One group per (ADNet group, weight decay or not): the backbone (LoRA's weights in it included), the calculation
    units and the output layers, each at its initial learning rate (`backbone_learning_rate`, `unit_learning_rate`,
    `output_learning_rate`, or `learning_rate`), with `args.weight_decay` on the decayed ones. Frozen parameters are
    left out, and a LM head tied to the input embeddings counts once, as backbone.

    Args:
        model (nn.Module): An ADNet task model, or a PEFT model wrapping one.
        args (TrainingArguments): `ADNetTrainingArguments`, or a plain `TrainingArguments` (one learning rate).
        decay_names (Iterable[str]): The parameter names that get weight decay, e.g.
            `Trainer.get_decay_parameter_names(None, model)` (none on biases and norms).

    Returns:
        Groups for a `torch.optim` optimizer, each with `params`, `name`, `lr` and `weight_decay`.
    """
    decay = set(decay_names)
    param_groups = []
    for group, named in adnet_parameter_groups(model).items():
        for decays in (True, False):
            params = [param for name, param in named if (name in decay) == decays]
            if params:
                param_groups.append(
                    {
                        "params": params,
                        "name": group,
                        "lr": group_learning_rate(args, group),
                        "weight_decay": args.weight_decay if decays else 0.0,
                    }
                )
    return param_groups


def floor_scheduler(
    optimizer: torch.optim.Optimizer,
    args: ADNetTrainingArguments,
    num_training_steps: int,
    num_warmup_steps: int | None = None,
) -> LambdaLR:
    """The learning-rate schedule `ADNetTrainer` uses with a floor, for a training loop of your own.

    Transformers' scheduler for `args`: linear warm-up from 0, then linear or cosine decay to
    `min_learning_rate_ratio` of each group's initial rate (the multiplier applies per parameter group, so each
    group decays to its own floor). Linear decay to a floor is the polynomial decay of power 1, whose absolute end
    rate is taken as the ratio of the optimizer's default rate. With nothing to decay (a floor of 1, or warm-up to
    the last step) the rate stays after warm-up.

    Args:
        optimizer (torch.optim.Optimizer): The optimizer, e.g. over `adnet_optimizer_groups`.
        args (ADNetTrainingArguments): The warm-up, `lr_scheduler_type` (`linear` or `cosine`) and
            `min_learning_rate_ratio`.
        num_training_steps (int): Scheduler steps in the whole run.
        num_warmup_steps (int | None): Scheduler steps of warm-up. Defaults to `None`: `args`' warm-up of
            `num_training_steps` (give it where the scheduler steps more than once per update, as `accelerate`'s
            prepared scheduler does on several processes, so that a fractional warm-up counts updates).

    Returns:
        The scheduler; call its `step()` after each optimiser step.
    """
    warmup = args.get_warmup_steps(num_training_steps) if num_warmup_steps is None else num_warmup_steps
    ratio = args.min_learning_rate_ratio
    if ratio == 1.0 or warmup >= num_training_steps:
        name, kwargs = SchedulerType.CONSTANT_WITH_WARMUP, {}
    elif args.lr_scheduler_type == SchedulerType.COSINE:
        name, kwargs = SchedulerType.COSINE_WITH_MIN_LR, {"min_lr_rate": ratio}
    else:
        name, kwargs = SchedulerType.POLYNOMIAL, {"lr_end": ratio * optimizer.defaults["lr"], "power": 1.0}
    return get_scheduler(name, optimizer, warmup, num_training_steps, scheduler_specific_kwargs=kwargs)


def compute_classification_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """A `compute_metrics` for sequence and image classification: `task_metrics` of the logits.

    The logits lead the predictions of `ADNetTrainer` (`(logits, exit_steps)`) and are the whole of a plain
    `Trainer`'s, so it serves both. The exit statistics come from `ADNetTrainer` itself (`eval_exit_steps`,
    `eval_executed_layers`).

    Args:
        eval_pred (EvalPrediction): What `Trainer` passes: the predictions and `label_ids`.

    Returns:
        The metrics `task_metrics` gives for the task (accuracy, F1, micro-F1, Pearson, ...).
    """
    predictions = eval_pred.predictions
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    return task_metrics(logits, np.asarray(eval_pred.label_ids))


_SHARD_PATTERN = "features-{:05d}.safetensors"
_SHARD_INDEX = "shards.json"


def cache_top_features(
    model: ADNetForCausalLM, blocks: torch.Tensor, cache_dir: str | Path, shard_size: int = 256, batch_size: int = 8
) -> list[Path]:
    """Compute the frozen model's top features of token blocks once and write them to `cache_dir` as safetensors
    shards (`features`, `input_ids`) with an index of them (`shards.json`), for a draft unit to train on without
    running the model again.

    Resumable: a shard already written (written whole, then renamed) is skipped once it is checked to hold these
    blocks' tokens and this model's features (its first block is recomputed), so a stopped run goes on where it
    stopped and a cache of other text, or of another model, is refused.

    Args:
        model (ADNetForCausalLM): The frozen model; it runs at full depth under `torch.inference_mode`, in eval mode
            (its mode is restored after).
        blocks (torch.Tensor): `(num_blocks, block_size)` token ids, e.g. consecutive blocks of a corpus.
        cache_dir (str | Path): The folder of the shards (created where missing).
        shard_size (int): Blocks per shard. Defaults to `256`.
        batch_size (int): Blocks per forward pass. Defaults to `8`.

    Returns:
        The shard paths, in order.
    """
    folder, training = Path(cache_dir), model.training
    folder.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(blocks), shard_size)
    paths = [folder / _SHARD_PATTERN.format(index) for index in range(len(starts))]
    model.eval()
    try:
        for start, path in zip(tqdm(starts, desc="caching top features", unit="shard"), paths):
            _write_feature_shard(model, blocks[start : start + shard_size].contiguous(), path, batch_size)
    finally:
        model.train(training)
    (folder / _SHARD_INDEX).write_text(json.dumps([path.name for path in paths]), encoding="utf-8")
    return paths


def _top_features(model: ADNetForCausalLM, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The top features (`ADNetForCausalLM.top_features`) of every token of `ids` (blocks x length), on the CPU."""
    with torch.inference_mode():
        return torch.cat(
            [
                model.top_features(
                    model.adnet(input_ids=batch.to(model.device), exit_policy="none").last_hidden_state
                ).cpu()
                for batch in ids.split(batch_size)
            ]
        )


def _write_feature_shard(model: ADNetForCausalLM, ids: torch.Tensor, path: Path, batch_size: int) -> None:
    """One shard of `cache_top_features`, unless it is there already (with the same tokens and model)."""
    if path.exists():
        _check_feature_shard(model, ids, path)
        return
    partial = path.with_suffix(".partial")
    save_file({"features": _top_features(model, ids, batch_size), "input_ids": ids}, str(partial))
    partial.rename(path)


def _check_feature_shard(model: ADNetForCausalLM, ids: torch.Tensor, path: Path) -> None:
    """Refuse a shard written from other tokens, or by another model (its first block's features differ)."""
    with safe_open(str(path), "pt") as shard:
        same_tokens = torch.equal(shard.get_tensor("input_ids"), ids)
        cached = shard.get_slice("features")[0:1]
    if not same_tokens:
        raise ValueError(
            f"{path} holds the features of other tokens than these blocks (another text, block size or shard "
            "size): pass an empty cache_dir, or the one made from this data."
        )
    fresh = _top_features(model, ids[:1], 1).to(cached.dtype)
    if (fresh - cached).float().norm() > 1e-2 * cached.float().norm():  # beyond rounding, even in bfloat16
        raise ValueError(
            f"{path} holds the features another model made of these tokens (or this model in another dtype): pass "
            "an empty cache_dir, or the one made with this model."
        )


class TopFeatureShards(torch.utils.data.Dataset):
    """The blocks cached by `cache_top_features` in `cache_dir` (the shards its index lists), each an example
    `{"features", "input_ids"}` read from its shard when asked for, so the cache need not fit in memory.

    Args:
        cache_dir (str | Path): The folder of the shards.
    """

    def __init__(self, cache_dir: str | Path):
        index = Path(cache_dir) / _SHARD_INDEX
        if not index.is_file():
            raise ValueError(f"{cache_dir} holds no index of feature shards: write them with cache_top_features.")
        self.paths = [Path(cache_dir) / name for name in json.loads(index.read_text(encoding="utf-8"))]
        sizes = []
        for path in self.paths:
            with safe_open(str(path), "pt") as shard:
                sizes.append(shard.get_slice("input_ids").get_shape()[0])
        self.ends = list(accumulate(sizes))

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard = bisect.bisect_right(self.ends, index)
        row = index - (self.ends[shard - 1] if shard else 0)
        with safe_open(str(self.paths[shard]), "pt") as data:
            return {name: data.get_slice(name)[row : row + 1][0] for name in ("features", "input_ids")}


class DraftUnitTrainer(Trainer):
    """`Trainer` for a causal LM's draft unit on the frozen model (EAGLE): only the draft unit trains
    (`freeze_all_but_draft_unit`, called here), on cached top features (`TopFeatureShards`), with the model's
    `draft_loss`; the rest of the model stays bit-identical. `save_model` saves the whole model with its unit. It
    trains on one process and does not evaluate: a unit is judged by the tokens its drafts keep in `generate`.

    Args:
        model (ADNetForCausalLM): A model with a draft unit (`add_draft_unit`).
        args (TrainingArguments | None): As `Trainer`'s. Defaults to `None`.
        feature_weight (float): `draft_loss`'s weight of the feature regression. Defaults to `1.0`.
        token_weight (float): `draft_loss`'s weight of the cross-entropy. Defaults to `0.1`.
        feature_noise (float): `draft_loss`'s noise on the features the unit reads. Defaults to `0.0`.
        **kwargs (Any): `Trainer`'s other arguments (`train_dataset`, a `TopFeatureShards`; `callbacks`, ...);
            `data_collator` defaults to `default_data_collator`.
    """

    def __init__(
        self,
        model: ADNetForCausalLM,
        args: TrainingArguments | None = None,
        feature_weight: float = DRAFT_FEATURE_WEIGHT,
        token_weight: float = DRAFT_TOKEN_WEIGHT,
        feature_noise: float = 0.0,
        **kwargs,
    ):
        if kwargs.get("eval_dataset") is not None:
            raise ValueError(
                "DraftUnitTrainer trains only: measure a unit by generating with it (use_draft_unit=True)."
            )
        model.freeze_all_but_draft_unit()
        kwargs.setdefault("data_collator", default_data_collator)  # blocks of one length: nothing to pad
        super().__init__(model=model, args=args, **kwargs)
        self.feature_weight, self.token_weight, self.feature_noise = feature_weight, token_weight, feature_noise
        # The dataset is a torch Dataset whose columns are what the loss reads, not `forward`'s arguments:
        # without this, Trainer's column filter would drop `features`.
        self._signature_columns = ["features", "input_ids"]
        if self.args.world_size > 1:  # the loss bypasses the wrapper's forward, so no gradient would be synchronised
            raise ValueError("DraftUnitTrainer trains on one process (one device); its world size is 1 only.")

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        """`draft_loss` on a batch of cached features: a mean per batch (divided by the accumulation steps)."""
        loss = self.accelerator.unwrap_model(model).draft_loss(
            inputs["features"], inputs["input_ids"], self.feature_weight, self.token_weight, self.feature_noise
        )
        return (loss, None) if return_outputs else loss


__all__ = [
    "DraftUnitTrainer",
    "TopFeatureShards",
    "cache_top_features",
    "ADNetTrainer",
    "ADNetTrainingArguments",
    "MaxNormCallback",
    "adnet_optimizer_groups",
    "adnet_parameter_groups",
    "apply_max_norm",
    "compute_classification_metrics",
    "floor_scheduler",
]
