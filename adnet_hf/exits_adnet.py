"""The halting distribution and the inference exit rules, one small registered class per rule.

Each rule owns its `ADNetConfig` field, the values that field may take, its calibration grid, whether it needs the
step predictions and whether it works for regression. Every rule decides per item (a sample, or a token of a causal
LM) from that item's own history, so an item's exit never depends on the rest of the batch.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

FULL_DEPTH = "none"  # the exit policy that runs every step: not a rule, the full-depth pass
MAX_PATIENCE = 10_000  # more steps than any backbone has; larger values would overflow the int64 step counters


class HaltingDistribution:
    """PonderNet's halting distribution, built step by step: `p_n = lambda_n prod_{k<n}(1 - lambda_k)`, and the last
    step takes the mass not yet halted, so every item's `p` sums to 1.

    `not_halted` is `prod_{k<=n}(1 - lambda_k)` after the latest step: what the `halting` rule compares with
    epsilon, and the mass an item that stops now takes (`halt`).
    """

    def __init__(self):
        self.not_halted: torch.Tensor | float = 1.0

    def step(self, lambdas: torch.Tensor, last: bool = False) -> torch.Tensor:
        """`p_n` of this step for every item (`lambdas`: items)."""
        before = self.not_halted
        self.not_halted = before * (1 - lambdas)
        return before * torch.ones_like(lambdas) if last else before * lambdas

    def halt(self, probs: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
        """`probs` of this step, where the items that `stop` take all the mass not halted before it."""
        return torch.where(stop, probs + self.not_halted, probs)

    def select(self, keep: torch.Tensor) -> None:
        """Keep the items of the samples at indices `keep` only."""
        if isinstance(self.not_halted, torch.Tensor):
            self.not_halted = self.not_halted[keep]


def halting_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """PonderNet's halting distribution from the units' halting probabilities, as the model computes it.

    `p_n = lambda_n prod_{k<n}(1 - lambda_k)` for every step but the last, which takes the mass not yet halted, so
    each item's `p` sums to 1 (the last `lambda` is not read: the last unit always halts).

    Args:
        lambdas (torch.Tensor): items x N: each variable step's halting probability `lambda_n` per item.

    Returns:
        The probability `p_n` of halting at each step, items x N.
    """
    distribution = HaltingDistribution()
    steps = lambdas.unbind(-1)
    return torch.stack([distribution.step(step, last=n == len(steps) - 1) for n, step in enumerate(steps)], dim=-1)


class ExitRule:
    """An inference exit rule: decides, step after step, which items (samples, or a causal LM's tokens) stop.

    A rule is a subclass registered under its policy `name` (`register_exit_rule`); the model builds one per
    exiting forward pass, set to the value of its config field or to the call's `exit_threshold`. Each item's
    decision reads that item's own history only, so its exit never depends on the rest of the batch. A subclass
    sets the class attributes below and implements `is_valid`, `candidates` and `step` (and `select` if it keeps
    state between steps).

    Attributes:
        name (str): The policy's name, the value of `ADNetConfig.exit_policy` that selects it.
        config_field (str): The `ADNetConfig` field holding its setting (`halting_epsilon`, ...); the config
            checks that field with the rule's `check`.
        allowed (str): The values that field may take, as an error message states them.
        needs_predictions (bool): Whether `step` reads the step predictions (the task head then runs at every
            step). Defaults to `False`.
        supports_regression (bool): Whether the rule works for a regressor, which has no classes to be confident
            or patient about. Defaults to `True`.

    Args:
        threshold (float | int): The rule's setting, checked by `check`.
        problem_type (str | None): The config's problem type; `'multi_label_classification'` makes the rule read
            every label. Defaults to `None`.
    """

    name: ClassVar[str]
    config_field: ClassVar[str]
    allowed: ClassVar[str]  # the values `config_field` may take, as an error message states them
    needs_predictions: ClassVar[bool] = False
    supports_regression: ClassVar[bool] = True

    def __init__(self, threshold, problem_type: str | None = None):
        self.check(threshold)
        self.threshold = threshold
        self.multi_label = problem_type == "multi_label_classification"

    @classmethod
    def is_valid(cls, value) -> bool:
        """Whether `value` is an allowed setting of the rule's config field.

        Args:
            value (float | int): The setting.
        """
        raise NotImplementedError

    @classmethod
    def check(cls, value, owner: str | None = None) -> None:
        """Raise a `ValueError` naming `owner` and the allowed values unless `value` is allowed.

        Args:
            value (float | int): The setting.
            owner (str | None): What to name in the error, e.g. a config field. Defaults to `None` (the per-call
                `exit_threshold`).
        """
        owner = owner or f"exit_threshold (the {cls.config_field} of exit_policy={cls.name!r})"
        require(cls.is_valid(value), owner, cls.allowed, value)

    @staticmethod
    def candidates(num_variable_steps: int) -> list[float | int]:
        """The calibration grid `calibrate_exit` tries by default, from the most cautious setting to the most
        aggressive (risk control tests them in that order).

        Args:
            num_variable_steps (int): The model's steps that carry a unit.
        """
        raise NotImplementedError

    def step(self, not_halted: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """Which of the items still running stop after this step.

        Args:
            not_halted (torch.Tensor): Per item, the halting mass not yet halted after this step,
                `prod_{k<=n}(1 - lambda_k)`.
            logits (torch.Tensor | None): The step's predictions, items x classes; `None` unless
                `needs_predictions`.

        Returns:
            A boolean per item.
        """
        raise NotImplementedError

    def select(self, keep: torch.Tensor) -> None:
        """Keep the state of the items at indices `keep` only, once the others have left the batch (for rules that
        remember past steps).

        Args:
            keep (torch.Tensor): Indices of the items still running.
        """


EXIT_RULES: dict[str, type[ExitRule]] = {}
"""Every registered exit rule by policy name: `halting`, `confidence`, `patience`, then any `register_exit_rule`
adds. The allowed values of `ADNetConfig.exit_policy` are these names and `'none'` (full depth)."""


def register_exit_rule(cls: type[ExitRule]) -> type[ExitRule]:
    """Register an exit rule under its `name` (a class decorator), replacing a rule of that name.

    From then on `exit_policy=cls.name` selects it, in the config or per call, its `config_field` is checked by its
    `check`, and `calibrate_exit` calibrates it over its `candidates`.

    Args:
        cls (type[ExitRule]): The rule.

    Returns:
        `cls`, unchanged.
    """
    EXIT_RULES[cls.name] = cls
    return cls


def require(valid: bool, owner: str, allowed: str, value) -> None:
    """Raise a `ValueError` naming `owner` and the values it may take unless `valid`."""
    if not valid:
        raise ValueError(f"{owner} must be {allowed}, got {value!r}.")


def is_number(value) -> bool:
    """A finite int or float (not a bool): NaN and infinities reach no loss or threshold sensibly."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_exit_rule
class HaltingExit(ExitRule):
    """ACT's rule on the learned units: stop once the cumulative halting probability reaches `1 - epsilon`.

    The `halting` policy, and the default. Its setting is `ADNetConfig.halting_epsilon`, in (0, 1); works for every
    task.

    Args:
        threshold (float): `epsilon`: an item stops once the halting mass not yet halted is at most this.
        problem_type (str | None): The config's problem type (not read by this rule). Defaults to `None`.
    """

    name, config_field, allowed = "halting", "halting_epsilon", "a number in (0, 1)"

    @classmethod
    def is_valid(cls, value) -> bool:
        return is_number(value) and 0 < value < 1

    @staticmethod
    def candidates(num_variable_steps: int) -> list[float]:
        # from 0.001: fitted units (`fit_halting`) already exit most samples early at 0.01, and risk control tests
        # the most cautious setting first
        return [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]

    def step(self, not_halted: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        return not_halted <= self.threshold


@register_exit_rule
class ConfidenceExit(ExitRule):
    """DeeBERT's rule: stop once the step's prediction is confident enough.

    The `confidence` policy. Its setting is `ADNetConfig.confidence_threshold`, in (0, 1]; classifiers only.

    Args:
        threshold (float): The top class probability at which an item stops; for multi-label, every label's
            probability of its predicted value (`max(p, 1 - p)`) must reach it.
        problem_type (str | None): The config's problem type; `'multi_label_classification'` reads every label.
            Defaults to `None`.
    """

    name, config_field, allowed = "confidence", "confidence_threshold", "a number in (0, 1]"
    needs_predictions, supports_regression = True, False

    @classmethod
    def is_valid(cls, value) -> bool:
        return is_number(value) and 0 < value <= 1

    @staticmethod
    def candidates(num_variable_steps: int) -> list[float]:
        return [0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55]

    def step(self, not_halted: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            probs = torch.sigmoid(logits.float())
            confidence = torch.maximum(probs, 1 - probs).amin(-1)
        else:
            confidence = torch.softmax(logits.float(), dim=-1).amax(-1)
        return confidence >= self.threshold


@register_exit_rule
class PatienceExit(ExitRule):
    """PABEE's rule: stop once the prediction has not changed for `patience` consecutive steps.

    The `patience` policy. Its setting is `ADNetConfig.patience`, an integer in [1, 10000]; classifiers only.

    Args:
        threshold (int): The number of consecutive unchanged steps at which an item stops.
        problem_type (str | None): The config's problem type; for `'multi_label_classification'` every label's
            prediction must stay unchanged. Defaults to `None`.
    """

    name, config_field, allowed = "patience", "patience", f"an integer in [1, {MAX_PATIENCE}]"
    needs_predictions, supports_regression = True, False

    def __init__(self, threshold, problem_type: str | None = None):
        super().__init__(threshold, problem_type)
        self.previous: torch.Tensor | None = None
        self.unchanged: torch.Tensor | None = None

    @classmethod
    def is_valid(cls, value) -> bool:
        return is_int(value) and 1 <= value <= MAX_PATIENCE

    @staticmethod
    def candidates(num_variable_steps: int) -> list[int]:
        return list(range(num_variable_steps - 1, 0, -1))

    def step(self, not_halted: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        prediction = logits > 0 if self.multi_label else logits.argmax(-1, keepdim=True)
        if self.previous is None:
            self.unchanged = torch.zeros(prediction.shape[:-1], dtype=torch.long, device=logits.device)
        else:
            same = (prediction == self.previous).all(-1)
            self.unchanged = torch.where(same, self.unchanged + 1, torch.zeros_like(self.unchanged))
        self.previous = prediction
        return self.unchanged >= self.threshold

    def select(self, keep: torch.Tensor) -> None:
        if self.previous is not None:
            self.previous, self.unchanged = self.previous[keep], self.unchanged[keep]


def exit_decision(
    distribution: HaltingDistribution,
    rule: ExitRule | None,
    lambdas: torch.Tensor,
    logits: torch.Tensor | None,
    last: bool,
    done: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One variable step's decision for the items still running: which stop now (`rule`'s choice, every item at the
    `last` step; `None`: full depth, the last step only), and their `p_n`, where an item that stops takes all the
    mass not yet halted and an item already `done` gets 0. The one place the eager engine and the exported-steps
    runner (`export_adnet`) decide."""
    probs = distribution.step(lambdas)
    stop = torch.full_like(done, last) if rule is None or last else rule.step(distribution.not_halted, logits)
    stop = stop & ~done
    return stop, distribution.halt(probs, stop).masked_fill(done, 0.0)


def exit_policies() -> tuple[str, ...]:
    """Every registered rule's policy name, and full depth: read when needed, so later registrations count."""
    return (*EXIT_RULES, FULL_DEPTH)


def exit_rule(policy: str, config, threshold=None) -> ExitRule:
    """The rule of `policy`, set to `threshold` (default: the config's value of the rule's field)."""
    rule = task_exit_rule(policy, config)
    if threshold is None and not hasattr(config, rule.config_field):
        raise ValueError(
            f"exit_policy={policy!r} reads ADNetConfig.{rule.config_field}, which this config lacks: "
            "set it, or pass exit_threshold."
        )
    return rule(getattr(config, rule.config_field) if threshold is None else threshold, config.problem_type)


def regression_policies() -> tuple[str, ...]:
    """The exit policies that work for a regressor (no class predictions to be confident or patient about)."""
    return (*(name for name, rule in EXIT_RULES.items() if rule.supports_regression), FULL_DEPTH)


def task_exit_rule(policy: str, config, owner: str = "exit_policy") -> type[ExitRule]:
    """The rule class of `policy`, refused (naming `owner`) unless registered and usable for `config`'s task."""
    require(isinstance(policy, str) and policy in EXIT_RULES, owner, f"one of {tuple(EXIT_RULES)}", policy)
    if config.is_regression and not EXIT_RULES[policy].supports_regression:
        raise ValueError(
            f"{owner}={policy!r} needs class predictions, and this config is a regressor "
            f"(problem_type={config.problem_type!r}, num_labels={config.num_labels}): for regression "
            f"use one of {regression_policies()}."
        )
    return EXIT_RULES[policy]
