"""NTM-BFGS's read and write heads (see :mod:`~learned_optim.rules.ntm_bfgs` for the rule that
drives them): what they see at a step, what the rule asks of them, BFGS's scalars with its skip
rule, textbook BFGS as heads (how the memory algebra is proven) and the learned heads, which
start as BFGS's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from .ntm_memory import MemoryGroups

__all__ = ["HeadInputs", "Heads", "bfgs_scalars", "BFGSHeads", "LearnedHeads"]


@dataclass
class HeadInputs:
    """What the heads see at a step: per-coordinate vectors (N,) and the group inner products."""

    grad: Tensor  # ∇_t
    top: Tensor  # h_t (H, N): the controller's top layer
    prev_key: Tensor  # r_{t−1}
    prev_step: Tensor  # s_{t−1}: the rule's previous output
    prev_read: Tensor  # i_{t−1} = M_t·r_{t−1}
    controller_update: Tensor  # u_t: the controller's own first-order step
    groups: MemoryGroups  # .dot(x, y): xᵀy over each coordinate's group
    curvature_eps: float  # ε of the skip rule (the rule's config holds it; the heads keep no copy)
    readout: Tensor | None = None  # learned heads' linear read-out of ``top``, made once per step on first use


class Heads(Protocol):
    """What the rule asks of its heads (:class:`LearnedHeads`, :class:`BFGSHeads`): the read key,
    the write pairs (left, right) (W, N) given the pre-write read M_t·key, and g_t from the read."""

    def key(self, ctx: HeadInputs) -> Tensor: ...

    def writes(self, ctx: HeadInputs, key: Tensor, pre_read: Tensor) -> tuple[Tensor, Tensor]: ...

    def output(self, ctx: HeadInputs, read: Tensor) -> Tensor: ...


def bfgs_scalars(y: Tensor, s: Tensor, my: Tensor, groups: MemoryGroups, eps: float) -> tuple[Tensor, Tensor]:
    """ρ = 1/(yᵀs) and ρ²·yᵀMy per coordinate's group, both 0 where the curvature condition
    yᵀs > ε·‖y‖·‖s‖ fails (BFGS's skip rule; also at the first step, where s = 0)."""
    ys, yy, ss, ymy = (groups.dot(a, b) for a, b in ((y, s), (y, y), (s, s), (y, my)))
    with torch.no_grad():  # which groups write: a finite, curvature-satisfying pair
        ok = (ys > eps * torch.sqrt(yy) * torch.sqrt(ss)) & (ys > 0)
        ok &= torch.isfinite(1 / ys) & torch.isfinite(ymy / ys / ys) & torch.isfinite(ymy)
    # Safe operands where no write is made, so neither the values nor their gradients turn NaN.
    ys = torch.where(ok, ys, torch.ones_like(ys))
    ymy = torch.where(ok, ymy, torch.zeros_like(ymy))
    zero = torch.zeros_like(ys)
    return torch.where(ok, 1 / ys, zero), torch.where(ok, ymy / ys / ys, zero)


class BFGSHeads(nn.Module):
    """Textbook BFGS as head outputs (no parameters): r = ∇, writes (c·s, s), (−ρ·s, Hy),
    (−ρ·Hy, s), step −i = −H_t·∇_t. The controller's output is ignored."""

    write_heads = 3

    def key(self, ctx: HeadInputs) -> Tensor:
        return ctx.grad

    def writes(self, ctx: HeadInputs, key: Tensor, pre_read: Tensor) -> tuple[Tensor, Tensor]:
        s, hy = ctx.prev_step, pre_read - ctx.prev_read
        rho, rho2_yhy = bfgs_scalars(key - ctx.prev_key, s, hy, ctx.groups, ctx.curvature_eps)
        c = rho + rho2_yhy
        return torch.stack((c * s, -rho * s, -rho * hy)), torch.stack((s, hy, s))

    def output(self, ctx: HeadInputs, read: Tensor) -> Tensor:
        return -read


class LearnedHeads(nn.Module):
    """The learned heads, initialized to BFGS's: a per-coordinate step multiplier 2σ(η(h_t))
    on the read, and write heads whose vectors and coefficients are learned mixtures of BFGS's
    (global per group, so M stays a sum of the same kind of terms as BFGS's). With ``bfgs_bases``
    the vectors and coefficients are BFGS's own, and only the modulations and the multiplier learn."""

    def __init__(self, hidden_size: int, write_heads: int, bfgs_bases: bool = False) -> None:
        super().__init__()
        self.write_heads, self.bfgs_bases = write_heads, bfgs_bases
        w = write_heads
        self.readout = nn.Linear(hidden_size, 1 + w)  # η (per coordinate), δ_w (averaged over the group)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)
        left, right, alpha = torch.zeros(w, 2), torch.zeros(w, 2), torch.zeros(w, 2)
        bfgs = [((1, 0), (1, 0), (1, 1)), ((1, 0), (0, 1), (-1, 0)), ((0, 1), (1, 0), (-1, 0))]
        for head, (a, b, c) in enumerate(bfgs[:w]):
            left[head], right[head], alpha[head] = torch.tensor(a), torch.tensor(b), torch.tensor(c)
        self.left_basis = nn.Parameter(left)  # P_w: a_w ∝ P_w,1·s + P_w,2·My
        self.right_basis = nn.Parameter(right)  # Q_w: b_w = Q_w,1·s + Q_w,2·My
        self.write_coefficients = nn.Parameter(alpha)  # κ_w = α_w,1·ρ + α_w,2·ρ²·yᵀMy
        # BFGS's own P, Q, α (bfgs_bases: used in place of the learned three, which are kept, unused)
        self.register_buffer("_bfgs_bases", torch.stack((left, right, alpha)), persistent=False)

    def _outputs(self, ctx: HeadInputs) -> Tensor:
        if ctx.readout is None:
            ctx.readout = torch.addmm(self.readout.bias.unsqueeze(1), self.readout.weight, ctx.top)  # (1 + W, N)
        return ctx.readout

    def key(self, ctx: HeadInputs) -> Tensor:
        return ctx.grad  # BFGS's key; a learned one broke the secant pairs (see the module doc)

    def writes(self, ctx: HeadInputs, key: Tensor, pre_read: Tensor) -> tuple[Tensor, Tensor]:
        s, my = ctx.prev_step, pre_read - ctx.prev_read
        rho, rho2_ymy = bfgs_scalars(key - ctx.prev_key, s, my, ctx.groups, ctx.curvature_eps)
        modulation = ctx.groups.mean(self._outputs(ctx)[1:])  # (W, N), one value per group
        fixed = cast(Tensor, self._bfgs_bases)
        left, right, alpha = (fixed.to(s.dtype).unbind(0) if self.bfgs_bases
                              else (self.left_basis, self.right_basis, self.write_coefficients))
        kappa = (alpha @ torch.stack((rho, rho2_ymy))) * 2 * torch.sigmoid(modulation)
        basis = torch.stack((s, my))  # (2, N)
        return kappa * (left @ basis), right @ basis

    def output(self, ctx: HeadInputs, read: Tensor) -> Tensor:
        return ctx.controller_update - 2 * torch.sigmoid(self._outputs(ctx)[0]) * read
