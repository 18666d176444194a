"""Per-step task losses and the losses that combine them with the halting distribution.

Every combining loss takes `step_losses` and `halting_probs`, both rows x N (a row is a sample, or a predicted
token of a causal LM), and returns the mean over the rows it is asked to keep (`labelled_rows`: not the ones labelled
-100), 0 when none is kept, so an ignored row neither counts in the mean nor moves the halting units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# Targets of GPSL's plateau term: the first step whose prediction stays the full-depth one, or the loss curve's plateau.
PLATEAU_TARGETS = ("settled", "loss")


def resolve_problem_type(problem_type: str | None, num_labels: int, labels: torch.Tensor) -> str:
    """The problem type as Transformers' own heads infer it when the config leaves it unset."""
    if problem_type is not None:
        return problem_type
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def labelled_rows(labels: torch.Tensor, problem_type: str) -> torch.Tensor | None:
    """The rows (samples) a loss counts: for single-label classification those whose label is not -100 (None: all)."""
    if problem_type != "single_label_classification":
        return None
    return labels.reshape(labels.shape[0], -1)[:, 0] != IGNORE_INDEX


def mean_over_rows(values: torch.Tensor) -> torch.Tensor:
    """The mean of per-row `values`; 0 (with zero gradients) when there is no row, where `mean` would give NaN."""
    return values.sum() / max(values.numel(), 1)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Unreduced task loss of one step: `logits` items x C, `labels` items (x C) -> items.

    Single-label items whose label is -100 get 0 (a causal LM's ignored tokens).
    """
    logits = logits.float()
    if problem_type == "regression":
        return F.mse_loss(logits, labels.to(logits.dtype).reshape(logits.shape), reduction="none").mean(-1)
    if problem_type == "single_label_classification":
        flat = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
        )
        return flat.view(labels.shape)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)


def settled_steps(step_logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Rows x N booleans: True at the steps from which a classifier's prediction (`step_logits`: N x rows x C) no
    longer changes, so it is the full-depth one (every label, for multi-label). The last step is always settled."""
    if problem_type == "multi_label_classification":
        agrees = ((step_logits > 0) == (step_logits[-1] > 0)).all(-1)
    else:
        predictions = step_logits.argmax(-1)
        agrees = predictions == predictions[-1]
    return agrees.flip(0).long().cumprod(0).flip(0).bool().transpose(0, 1)


def distillation_loss(logits: torch.Tensor, teacher_log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unreduced KL(teacher || step) of one step's `logits` (items x vocab) from the teacher's log-probabilities
    (same shape), per item; 0 where the label is -100, as `task_loss` leaves an ignored token."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(-1)
    return kl.masked_fill(labels == IGNORE_INDEX, 0.0)


DRAFT_FEATURE_WEIGHT = 1.0
"""EAGLE's weight of the feature regression in `draft_unit_loss`."""
DRAFT_TOKEN_WEIGHT = 0.1
"""EAGLE's weight of the token term in `draft_unit_loss`, chosen there because the cross-entropy is an order of
magnitude larger than the feature regression."""


def draft_unit_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    feature_weight: float = DRAFT_FEATURE_WEIGHT,
    token_weight: float = DRAFT_TOKEN_WEIGHT,
) -> torch.Tensor:
    """EAGLE's loss of a draft unit (Li et al. 2024): `feature_weight * SmoothL1(predicted, target)` (mean over the
    features) plus `token_weight * CE(draft_logits, softmax(target_logits))`, the cross-entropy of the draft's
    next-token distribution against the frozen model's own, so the draft learns what the verification keeps.

    Args:
        predicted (torch.Tensor): `(tokens, hidden_size)`: the draft unit's predicted top features.
        target (torch.Tensor): `(tokens, hidden_size)`: the frozen model's top features there.
        draft_logits (torch.Tensor): `(tokens, vocab_size)`: the LM head on `predicted`.
        target_logits (torch.Tensor): `(tokens, vocab_size)`: the same on `target`.
        feature_weight (float): Weight of the feature regression. Defaults to `1.0`.
        token_weight (float): Weight of the cross-entropy. Defaults to `0.1`.

    Returns:
        `()`: the mean over the tokens.
    """
    features = F.smooth_l1_loss(predicted.float(), target.float())
    tokens = F.cross_entropy(draft_logits.float(), torch.softmax(target_logits.float(), -1))
    return feature_weight * features + token_weight * tokens


def _step_index(num_steps: int, like: torch.Tensor) -> torch.Tensor:
    """1-based step indices n = 1..N."""
    return torch.arange(1, num_steps + 1, device=like.device, dtype=like.dtype)


def _kl(target: torch.Tensor, probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(target || probs) over the last dim, per row."""
    return (target * (torch.log(target.clamp(min=eps)) - torch.log(probs.clamp(min=eps)))).sum(-1)


class ADNetLoss(nn.Module):
    """Base of the losses that combine the per-step task losses with the halting distribution.

    The model builds the one `ADNetConfig.loss_type` names (`loss_fn`), with the config's weights, at every call, so
    a `loss_type` or weight set after construction is the one trained with. A row is a sample, or a predicted token
    of a causal LM.

    Attributes:
        trains_halting (bool): Whether the loss trains the halting units. When it does not, they stay as
            initialised and the `halting` exit policy would follow untrained units (`ADNetTrainer` warns).
            Defaults to `True`.
    """

    trains_halting: bool = True

    def forward(
        self,
        step_losses: torch.Tensor,
        halting_probs: torch.Tensor,
        keep: torch.Tensor | None = None,
        settled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean of `row_losses` over the rows to `keep`; 0 (with zero gradients) when no row is kept.

        Args:
            step_losses (torch.Tensor): rows x N: each variable step's unreduced task loss.
            halting_probs (torch.Tensor): rows x N: the halting distribution.
            keep (torch.Tensor | None): A boolean mask over the rows, e.g. the rows not labelled -100. Defaults to
                `None` (every row).
            settled (torch.Tensor | None): rows x N booleans: the steps from which each row's prediction stays the
                full-depth one, for losses that train the halting units toward it. Defaults to `None`.

        Returns:
            The scalar loss.
        """
        if keep is not None:
            step_losses, halting_probs = step_losses[keep], halting_probs[keep]
            settled = None if settled is None else settled[keep]
        return mean_over_rows(self.row_losses(step_losses, halting_probs, settled))

    def row_losses(
        self, step_losses: torch.Tensor, halting_probs: torch.Tensor, settled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of each row (rows x N -> rows): what a subclass implements.

        Args:
            step_losses (torch.Tensor): rows x N: each variable step's unreduced task loss.
            halting_probs (torch.Tensor): rows x N: the halting distribution.
            settled (torch.Tensor | None): rows x N booleans: where each row's prediction has settled. Defaults to
                `None`.
        """
        raise NotImplementedError


class GrowingPlateauSensitiveLoss(ADNetLoss):
    r"""Growing Plateau Sensitive Loss:
    `sum_n p_n L_n + alpha sum_n w_n L_n + beta KL(q || p)` with logistic growth weights
    `w_n ∝ sigmoid(growth_rate (n - growth_midpoint))` and the plateau target
    `q = softmax(-(stopgrad(L_n) + step_cost n / N) / temperature)`.

    With `plateau="settled"` and the rows' `settled` steps given, `q` is all mass on the first settled step (where
    the prediction becomes the full-depth one for good: BERxiT's learning-to-exit and CALM's consistency target).
    `KL(q || p)` is then `-log p_first`, the log-likelihood of a discrete-time survival model whose hazards are the
    `lambda_n`, so `prod_k (1 - lambda_k)` estimates the chance the prediction has not settled yet: what the
    `halting` rule compares with epsilon. The expected-loss term then weights the step losses by a detached `p`:
    the units learn from the plateau term alone, and the step predictions from the first two terms.

    `loss_type="gpsl"`, the default; `ADNetConfig`'s `gpsl_*` fields set its arguments.

    Args:
        alpha (float): Weight of the growing deep-supervision term (`gpsl_alpha`). Defaults to `0.3`.
        beta (float): Weight of the plateau term (`gpsl_beta`). Defaults to `0.1`.
        step_cost (float): Cost of one more step in the `'loss'` plateau target (`gpsl_step_cost`). Defaults to
            `0.05`.
        temperature (float): Temperature of the `'loss'` plateau target (`gpsl_temperature`). Defaults to `0.5`.
        growth_rate (float): Slope of the growth weights' logistic curve (`gpsl_growth_rate`). Defaults to `1.0`.
        growth_midpoint (float | None): Its midpoint, a step; `None` is half the number of steps
            (`gpsl_growth_midpoint`). Defaults to `None`.
        plateau (str): The plateau target, `'loss'` or `'settled'` (`gpsl_plateau`, whose default is
            `'settled'`). Defaults to `'loss'`.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.1,
        step_cost: float = 0.05,
        temperature: float = 0.5,
        growth_rate: float = 1.0,
        growth_midpoint: float | None = None,
        plateau: str = "loss",
    ):
        super().__init__()
        if plateau not in PLATEAU_TARGETS:
            raise ValueError(f"plateau must be one of {PLATEAU_TARGETS}, got {plateau!r}.")
        self.alpha, self.beta, self.step_cost, self.temperature = alpha, beta, step_cost, temperature
        self.growth_rate, self.growth_midpoint, self.plateau = growth_rate, growth_midpoint, plateau

    def growth_weights(self, num_steps: int, like: torch.Tensor) -> torch.Tensor:
        """`w_n`: grows with depth along a logistic curve, then plateaus; sums to 1. Normalised in log space (in
        float64), so a curve whose every sigmoid underflows (a midpoint far beyond the last step) stays finite."""
        midpoint = num_steps / 2 if self.growth_midpoint is None else self.growth_midpoint
        steps = _step_index(num_steps, like.double())
        return torch.softmax(F.logsigmoid(self.growth_rate * (steps - midpoint)), dim=-1).to(like.dtype)

    def plateau_target(self, step_losses: torch.Tensor) -> torch.Tensor:
        """`q`: halting mass where this row's loss curve stops improving by more than the step cost."""
        num_steps = step_losses.shape[-1]
        cost = self.step_cost * _step_index(num_steps, step_losses) / num_steps
        return torch.softmax(-(step_losses.detach() + cost) / self.temperature, dim=-1)

    def settled_target(self, settled: torch.Tensor) -> torch.Tensor:
        """`q` for `plateau="settled"`: one-hot at each row's first settled step."""
        first = settled.shape[-1] - settled.sum(-1)  # settled steps form a suffix ending at the last step
        return F.one_hot(first, settled.shape[-1]).to(torch.float32)

    def row_losses(
        self, step_losses: torch.Tensor, halting_probs: torch.Tensor, settled: torch.Tensor | None = None
    ) -> torch.Tensor:
        by_settling = self.plateau == "settled" and settled is not None
        weights = halting_probs.detach() if by_settling else halting_probs
        expected = (weights * step_losses).sum(-1)
        growing = (self.growth_weights(step_losses.shape[-1], step_losses) * step_losses).sum(-1)
        target = self.settled_target(settled) if by_settling else self.plateau_target(step_losses)
        plateau = _kl(target.to(halting_probs.dtype), halting_probs)
        return expected + self.alpha * growing + self.beta * plateau


class PonderNetLoss(ADNetLoss):
    """PonderNet: expected task loss plus `beta KL(p || geometric(prior))`, the prior truncated to N steps.

    `loss_type="pondernet"`.

    Args:
        prior (float): The geometric prior's parameter, in (0, 1] (`pondernet_prior`). Defaults to `0.5`.
        beta (float): Weight of the KL term (`pondernet_beta`). Defaults to `0.01`.
    """

    def __init__(self, prior: float = 0.5, beta: float = 0.01):
        super().__init__()
        self.prior, self.beta = prior, beta

    def row_losses(
        self, step_losses: torch.Tensor, halting_probs: torch.Tensor, settled: torch.Tensor | None = None
    ) -> torch.Tensor:
        steps = _step_index(step_losses.shape[-1], step_losses)
        geometric = (1 - self.prior) ** (steps - 1)  # the factor `prior` cancels in the normalisation (and underflows)
        geometric = geometric / geometric.sum()
        expected = (halting_probs * step_losses).sum(-1)
        return expected + self.beta * _kl(halting_probs, geometric)


class DeepSupervisionLoss(ADNetLoss):
    """PABEE / DeeBERT style: per-step losses averaged with weights proportional to depth; halting untrained.

    `loss_type="deep_supervision"`: trains every exit for the `confidence` and `patience` policies.
    """

    trains_halting = False

    def row_losses(
        self, step_losses: torch.Tensor, halting_probs: torch.Tensor, settled: torch.Tensor | None = None
    ) -> torch.Tensor:
        steps = _step_index(step_losses.shape[-1], step_losses)
        return (steps * step_losses).sum(-1) / steps.sum()


class LastStepLoss(ADNetLoss):
    """Plain fine-tuning: the last step's loss only; neither the halting units nor the earlier steps train.

    `loss_type="last"`: the full-depth reference, or the first stage of two-stage training (then
    `freeze_full_depth` and train the exits).
    """

    trains_halting = False

    def row_losses(
        self, step_losses: torch.Tensor, halting_probs: torch.Tensor, settled: torch.Tensor | None = None
    ) -> torch.Tensor:
        return step_losses[..., -1]


class LayerSkipLoss(ADNetLoss):
    """LayerSkip's early-exit loss (Elhoushi et al. 2024, its `sum_l` scale): step n of N weighs n(n+1)/2, times
    `scale` (their `e_scale`) for every step but the last, normalised to sum 1. It grows faster with depth than
    `deep_supervision`'s n, and `scale` < 1 keeps the last step's weight near 1, so full-depth quality holds. Every
    block is an exit, as in LayerSkip, with `num_fixed_steps=0` and `layers_per_step=1`. Halting untrained.

    `loss_type="layerskip"`.

    Args:
        scale (float): LayerSkip's `e_scale`, the weight of every exit but the last relative to it
            (`early_exit_loss_scale`). Defaults to `1.0`.
    """

    trains_halting = False

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def step_weights(self, num_steps: int, like: torch.Tensor) -> torch.Tensor:
        steps = _step_index(num_steps, like)
        weights = steps * (steps + 1) / 2 * torch.where(steps < num_steps, self.scale, 1.0)
        return weights / weights.sum()

    def row_losses(
        self, step_losses: torch.Tensor, halting_probs: torch.Tensor, settled: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (self.step_weights(step_losses.shape[-1], step_losses) * step_losses).sum(-1)


LOSSES: dict[str, type[ADNetLoss]] = {
    "gpsl": GrowingPlateauSensitiveLoss,
    "pondernet": PonderNetLoss,
    "deep_supervision": DeepSupervisionLoss,
    "last": LastStepLoss,
    "layerskip": LayerSkipLoss,
}


def build_loss(config) -> ADNetLoss:
    """The combining loss that `config.loss_type` names, with the config's weights."""
    if config.loss_type == "gpsl":
        return GrowingPlateauSensitiveLoss(
            alpha=config.gpsl_alpha,
            beta=config.gpsl_beta,
            step_cost=config.gpsl_step_cost,
            temperature=config.gpsl_temperature,
            growth_rate=config.gpsl_growth_rate,
            growth_midpoint=config.gpsl_growth_midpoint,
            plateau=config.gpsl_plateau,
        )
    if config.loss_type == "pondernet":
        return PonderNetLoss(prior=config.pondernet_prior, beta=config.pondernet_beta)
    if config.loss_type == "layerskip":
        return LayerSkipLoss(scale=config.early_exit_loss_scale)
    if config.loss_type not in LOSSES:
        raise ValueError(f"ADNetConfig.loss_type must be one of {tuple(LOSSES)}, got {config.loss_type!r}.")
    return LOSSES[config.loss_type]()
