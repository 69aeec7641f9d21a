"""Reparametrization augmentation (Celo, Moudgil et al. 2025; random scaling in Lv et al. 2017).

A task's parameter tensor θ is replaced by θ̃ = c·θ with c > 0 and its loss by f̃(θ̃) = f(θ̃/c):
the same problem in other units, whose gradients are ∇f/c and whose right step is c times
as large. Meta-training on random c (log-uniform in [1/a, a], per tensor and task) keeps a
learned rule from learning one scale of step for every tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import TaskStack

__all__ = ["reparametrized", "random_scales"]


def random_scales(stack: TaskStack, strength: float, generator: torch.Generator) -> list[Tensor]:
    """One log-uniform factor in [1/strength, strength] per (tensor, task) of ``stack``, shaped
    to broadcast against the tensor (a stacked tensor gets one per task along dim 0)."""
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 1):
        raise ValueError(f"reparametrization strength must be a finite number ≥ 1, got {strength!r}")
    scales = []
    for p, owner in zip(stack.initial_params, stack.param_tasks):
        count = 1 if isinstance(owner, int) else (stack.num_tasks if owner is None else len(owner))
        logs = (torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * math.log(strength)
        c = logs.exp().to(p.dtype).to(p.device)
        scales.append(c.reshape(()) if isinstance(owner, int) else c.reshape((count,) + (1,) * (p.dim() - 1)))
    return scales


def reparametrized(stack: TaskStack, scales: Sequence[Tensor]) -> TaskStack:
    """``stack`` with tensor j in units c_j: θ̃₀ = c_j·θ₀ and f̃(θ̃) = f(θ̃/c_j) (same losses, same
    streams; gradients ∇f/c_j)."""
    scales = list(scales)
    if len(scales) != len(stack.initial_params):
        raise ValueError(f"{len(scales)} scales for {len(stack.initial_params)} parameter tensors")

    def losses(params, batch):
        return stack.losses([p / c for p, c in zip(params, scales)], batch)

    return TaskStack([p * c for p, c in zip(stack.initial_params, scales)], losses, list(stack.param_tasks),
                     stack.num_tasks, stack.stream_fn, stack.batch_fn, stack.reset_fn)
