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

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .unroll import Unroll, UnrollState

__all__ = ["TruncationResult", "TruncatedBPTT", "PersistentES", "meta_loss", "LOSS_TRANSFORMS", "ESTIMATORS"]

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


ESTIMATORS = ("truncated-bptt", "pes")


class PersistentES:
    """Persistent evolution strategies (PES, Vicol et al. 2021), antithetic: no backward pass and
    no truncation bias. Each of ``pairs`` pairs unrolls the episode's tasks twice, at φ + ε and
    φ − ε (ε ~ N(0, σ²I), drawn anew every truncation), each particle on its own copy of the
    tasks carried across truncations; ξ_i sums pair i's ε since the episode began, and

        ĝ = Σ_i ξ_i·(L_i⁺ − L_i⁻) / (2·pairs·σ²)

    is an unbiased estimate of the gradient of the Gaussian-smoothed loss of the whole unroll so
    far (truncated BPTT's estimate sees only the truncation, which biases it when a step's effect
    outlasts it, e.g. through momentum sums). A new episode is recognized by a ``state`` that is
    not the one this estimator returned last. With ``masks`` (one per rule parameter, None: all
    of it; see :func:`~learned_optim.meta.trainable.trainable_masks`) ε is drawn only where the
    mask is 1, so the estimate lives in the trained subspace and its variance with it.
    """

    def __init__(self, loss_transform: str = "mean", sigma: float = 0.01, pairs: int = 4, seed: int = 0,
                 masks: list[Tensor | None] | None = None) -> None:
        if loss_transform not in LOSS_TRANSFORMS:
            raise ValueError(f"loss_transform must be one of {LOSS_TRANSFORMS}, got {loss_transform!r}")
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"PES sigma must be a finite positive number, got {sigma!r}")
        if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1:
            raise ValueError(f"PES pairs must be a positive integer, got {pairs!r}")
        self.loss_transform, self.sigma, self.pairs = loss_transform, float(sigma), pairs
        self.masks = masks
        self.generator = torch.Generator().manual_seed(seed)
        self._particles: list[UnrollState] = []  # 2·pairs: (+, −) of pair 0, then pair 1, …
        self._sums: list[list[Tensor]] = []  # ξ_i per pair, one tensor per rule parameter
        self._returned: UnrollState | None = None

    @torch.no_grad()
    def estimate(self, rule: nn.Module, unroll: Unroll, state: UnrollState, steps: int) -> TruncationResult:
        params = list(rule.parameters())
        if state is not self._returned:  # a new episode: every particle starts where ``state`` is
            self._particles = [_copy_state(state) for _ in range(2 * self.pairs)]
            self._sums = [[torch.zeros_like(p) for p in params] for _ in range(self.pairs)]
        masks = self.masks if self.masks is not None else [None] * len(params)
        if len(masks) != len(params):
            raise ValueError(f"PES has {len(masks)} masks for a rule of {len(params)} parameters")
        phi = [p.detach().clone() for p in params]
        grads = [torch.zeros_like(p) for p in params]
        losses_seen, finals = [], []
        try:
            for i in range(self.pairs):
                noise = [torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device) * self.sigma
                         for p in params]
                noise = [e if m is None else e * m for e, m in zip(noise, masks)]
                pair_losses = []
                for sign, index in ((1.0, 2 * i), (-1.0, 2 * i + 1)):
                    for p, base, e in zip(params, phi, noise):
                        p.copy_(base + sign * e)
                    losses, self._particles[index] = unroll.run(self._particles[index], steps, track=False)
                    pair_losses.append(meta_loss(losses, self.loss_transform, None))
                    finals.append(float(losses[-1].mean()))
                for total, e in zip(self._sums[i], noise):
                    total.add_(e)
                difference = pair_losses[0] - pair_losses[1]
                for g, total in zip(grads, self._sums[i]):
                    g.add_(total * (difference / (2 * self.pairs * self.sigma ** 2)))
                losses_seen += [float(x) for x in pair_losses]
        finally:
            for p, base in zip(params, phi):
                p.copy_(base)
        self._returned = self._particles[0]
        return TruncationResult(sum(losses_seen) / len(losses_seen), list(grads), self._returned,
                                sum(finals) / len(finals))


def _copy_state(state: UnrollState) -> UnrollState:
    """An independent copy of an unroll state: θ and the rule state cloned, the data stream copied
    (so every particle draws the same minibatches: common random numbers)."""
    return UnrollState([p.detach().clone() for p in state.params], copy.deepcopy(state.rule_state),
                       state.grad.detach().clone(), state.losses.clone(), copy.deepcopy(state.stream),
                       state.initial_losses.clone())
