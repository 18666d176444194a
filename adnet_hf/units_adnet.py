"""The calculation unit: what each variable step adds to the backbone to summarise the step and decide to halt."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# What a unit that reads the step evidence is given next to its summary, per item (see `step_evidence`).
EVIDENCE_FEATURES = ("confidence_logit", "margin", "certainty", "agreement", "log_not_halted")
LOG_FLOOR = -30.0  # log-probabilities and log-odds are clamped here, so a saturated softmax gives finite features


def masked_mean_max(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of B x T x d `values` over the real positions of `mask` (B x T), each B x d."""
    if mask is None:
        return values.mean(1), values.amax(1)
    weights = mask.to(values.dtype).unsqueeze(-1)
    mean = (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    # values are sigmoids in (0, 1): -1 at padding never wins the max
    maximum = values.masked_fill(weights == 0, -1.0).amax(1)
    return mean, maximum


def _log_odds(probs: torch.Tensor) -> torch.Tensor:
    return (torch.log(probs) - torch.log1p(-probs)).clamp(LOG_FLOOR, -LOG_FLOOR)


def step_evidence(
    logits: torch.Tensor, previous: torch.Tensor | None, not_halted: torch.Tensor | float, problem_type: str | None
) -> torch.Tensor:
    """What a step's prediction says about stopping there, per item (items x `len(EVIDENCE_FEATURES)`), as the
    confidence and patience rules read it, on scales a linear halting layer with max-norm weights can use:

    - confidence_logit: log-odds of the top class probability (multi-label: of the least certain label);
    - margin: top-1 minus top-2 logit (multi-label: the smallest |logit|);
    - certainty: 1 - entropy / log(C) (multi-label: averaged over the labels);
    - agreement: 1 when the prediction equals the previous step's (0 at the first variable step);
    - log_not_halted: log of the halting mass not yet halted before this step.

    A regressor has no classes: confidence_logit, margin and certainty become -|change| from the previous step, the
    prediction itself and whether there was a previous step. Computed without gradient: the unit reads the
    prediction, it does not shape it.
    """
    with torch.no_grad():
        logits = logits.float()
        if problem_type == "regression":
            change = logits - previous.float() if previous is not None else torch.zeros_like(logits)
            features = [-change.abs().mean(-1), logits.mean(-1), torch.full_like(logits[..., 0], previous is not None)]
            same = change.abs().amax(-1) == 0
        elif problem_type == "multi_label_classification":
            probs = torch.sigmoid(logits)
            certain = torch.maximum(probs, 1 - probs)
            entropy = F.binary_cross_entropy_with_logits(logits, probs, reduction="none")
            features = [
                _log_odds(certain.amin(-1).clamp(max=1 - 1e-7)),
                logits.abs().amin(-1),
                1 - (entropy / math.log(2.0)).mean(-1),
            ]
            same = None if previous is None else ((logits > 0) == (previous > 0)).all(-1)
        else:  # in few operations: at batch 1 each costs more than its arithmetic
            log_probs = torch.log_softmax(logits, dim=-1)
            first, second = log_probs.topk(2, dim=-1).values.unbind(-1)  # their gap is the logits' margin
            entropy = torch.special.entr(log_probs.exp()).sum(-1)
            features = [
                torch.special.logit(first.exp(), eps=1e-7),
                first - second,
                torch.rsub(entropy, 1.0, alpha=1 / math.log(logits.shape[-1])),
            ]
            same = None if previous is None else log_probs.argmax(-1) == previous.argmax(-1)
        agreement = torch.zeros_like(features[0]) if same is None else same.float()
        if isinstance(not_halted, torch.Tensor):
            log_not_halted = not_halted.float().log().clamp(min=LOG_FLOOR).expand_as(agreement)
        else:
            log_not_halted = torch.full_like(
                agreement, max(math.log(not_halted), LOG_FLOOR) if not_halted > 0 else LOG_FLOOR
            )
        return torch.stack([*features, agreement, log_not_halted], dim=-1)


class EvidenceWeights(nn.Linear):
    """The halting layer's weights on the step evidence, initialised (`ADNetPreTrainedModel._init_weights`) to the
    `prior`: weight 1 on the top-class log-odds, 0 elsewhere, so an untrained unit halts about as often as its step is
    confident, and training refines it. (From zero, Adam's steps of about one learning rate each leave the evidence
    nearly unread after a short training.)"""

    @staticmethod
    def prior(like: torch.Tensor) -> torch.Tensor:
        prior = torch.zeros_like(like)
        prior[..., EVIDENCE_FEATURES.index("confidence_logit")] = 1.0
        return prior

    def reset_parameters(self) -> None:
        """The prior instead of `nn.Linear`'s random draw: building the layer draws no random numbers, so adding it
        leaves every other module's initialisation as it was, and its weight is made where `nn.Linear` makes it (on
        `meta` under `torch.device("meta")` or `init_empty_weights`)."""
        with torch.no_grad():
            self.weight.copy_(self.prior(self.weight))


class CalculationUnit(nn.Module):
    """One variable step's unit: `S = sigmoid(W h + b)`, summary `r`, halting probability `lambda`.

    Pooled (classification): `r = concat(masked_mean_T(S), masked_max_T(S))`, B x 2d, one `lambda` per sample.
    Per token (causal LM): `r = S`, B x T x d, one `lambda` per token, no look at later tokens.
    The last step's unit has no halting layer: it always halts (`lambda = 1`), taking the remaining probability;
    a per-token unit then has nothing left to compute (the LM head reads the hidden state itself).

    `reads_evidence`: the halting layer also reads the step prediction's evidence (`step_evidence`, weighted by
    `evidence`), as BERxiT's learning-to-exit and CALM's learned confidence do: from `r` alone a unit cannot tell a
    confident step from an unsure one. `lambda = sigmoid(w . r + c + v . e)`. The prediction is made from `r` first
    (`summarise`), then the unit halts on both (`halt`).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        per_token: bool = False,
        halts: bool = True,
        reads_evidence: bool = False,
    ):
        super().__init__()
        self.per_token = per_token
        self.dense = None if per_token and not halts else nn.Linear(input_size, hidden_size)
        self.halting = nn.Linear(hidden_size if per_token else 2 * hidden_size, 1) if halts else None
        self.evidence = EvidenceWeights(len(EVIDENCE_FEATURES), 1, bias=False) if reads_evidence and halts else None

    @property
    def reads_evidence(self) -> bool:
        return self.evidence is not None

    def flops(self) -> tuple[float, float]:
        """Estimated FLOPs per real position (the dense layer) and per summary (the halting layer, which a pooled
        unit runs once per sample and a per-token unit once per token)."""
        dense = 0.0 if self.dense is None else 2.0 * self.dense.weight.numel()
        halting = 0.0 if self.halting is None else 2.0 * self.halting.weight.numel()
        if self.evidence is not None:
            halting += 2.0 * self.evidence.weight.numel()
        return dense, halting

    def summarise(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """hidden: B x T x H. The summary `r` (None for a last per-token unit, which computes nothing)."""
        if self.dense is None:
            return None
        activations = torch.sigmoid(self.dense(hidden))
        return activations if self.per_token else torch.cat(masked_mean_max(activations, mask), dim=-1)

    def halt(
        self, summary: torch.Tensor | None, hidden: torch.Tensor, evidence: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The halting probability `lambda` (B, or B x T) from the summary (and the evidence, if the unit reads it);
        `hidden` (B x T x H) gives the shape where there is no summary."""
        if self.halting is None:
            like = hidden if summary is None else summary
            return like.new_ones(like.shape[:-1])
        return torch.sigmoid(self.halting_logits(summary, evidence))

    def halting_logits(self, summary: torch.Tensor, evidence: torch.Tensor | None = None) -> torch.Tensor:
        """`w . r + c (+ v . e)`, whose sigmoid is `lambda` (B, or B x T): what `fit_halting` fits by logistic
        regression."""
        logits = self.halting(summary)
        if self.reads_evidence:
            if evidence is None:
                raise ValueError(
                    "This unit's halting layer reads the step prediction's evidence "
                    "(ADNetConfig.halting_evidence=True): it needs the task model's step predictions."
                )
            logits = logits + self.evidence(evidence.to(logits.dtype))
        return logits.squeeze(-1)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, evidence: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """hidden: B x T x H. Returns the summary `r` and the halting probability `lambda` (B, or B x T)."""
        summary = self.summarise(hidden, mask)
        return summary, self.halt(summary, hidden, evidence)
