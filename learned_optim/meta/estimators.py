"""Meta-gradient estimators: from an unroll to ∂L/∂φ for one truncation.

An estimator sees the rule, an :class:`~learned_optim.meta.Unroll` and its carried state,
and returns the truncation's meta-loss, the gradient for every parameter of the rule, and
the state to carry on from. The outer trainer knows nothing else about how the gradient
was obtained, so new estimators (GD-by-SGD, implicit) slot in beside these.

Meta-loss of a truncation (Andrychowicz et al. 2016): L = mean_tasks Σ_t w_t·f(θ_t) / U with
w_t = 1, over the U steps t of the truncation; ``loss_transform="log"`` uses log f(θ_t)
instead, which weighs every task's progress by its relative, not absolute, size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .unroll import Unroll, UnrollState

__all__ = ["TruncationResult", "TruncatedBPTT", "meta_loss", "LOSS_TRANSFORMS"]

LOSS_TRANSFORMS = ("mean", "log")
_LOG_FLOOR = 1e-8  # keeps log f finite when a task is solved exactly


def meta_loss(losses: Tensor, transform: str = "mean", weights: Tensor | None = None) -> Tensor:
    """Σ_t w_t·f_t averaged over steps and tasks, from (U, K) losses."""
    values = losses if transform == "mean" else torch.log(losses.clamp_min(_LOG_FLOOR))
    if weights is not None:
        values = values * weights.to(values.dtype).unsqueeze(1)
    return values.mean()


@dataclass
class TruncationResult:
    meta_loss: float  # the truncation's meta-loss
    grads: list[Tensor | None]  # ∂L/∂φ, one per rule parameter (None: no dependence)
    state: UnrollState  # carried to the next truncation
    final_loss: float  # mean over tasks of f at the truncation's last step


class TruncatedBPTT:
    """Backprop through a truncation of U inner steps (first- or second-order via the Unroll)."""

    def __init__(self, loss_transform: str = "mean", weights: Tensor | None = None) -> None:
        if loss_transform not in LOSS_TRANSFORMS:
            raise ValueError(f"loss_transform must be one of {LOSS_TRANSFORMS}, got {loss_transform!r}")
        self.loss_transform, self.weights = loss_transform, weights

    def estimate(self, rule: nn.Module, unroll: Unroll, state: UnrollState, steps: int) -> TruncationResult:
        losses, new_state = unroll.run(state, steps, track=True)
        loss = meta_loss(losses, self.loss_transform, self.weights)
        params = list(rule.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return TruncationResult(float(loss.detach()), list(grads), new_state, float(losses[-1].detach().mean()))
