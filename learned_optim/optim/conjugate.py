"""Momentum SGD and Adam with batch-size-conjugate hyperparameters.

From McAllester's TTIC 31230 notes ("Conjugacy of SGD hyperparameters"): momentum is a
running average μ with time constant N_g, and the hyperparameters are given for batch size 1
so they stay valid (conjugate) when the batch size B changes:

    N_g = max(1, N'_g / B)         # the notes print min; max keeps 1 - 1/N_g in [0, 1)
    η   = B·η' / N_g
    μ_t = (1 - 1/N_g)·μ_{t-1} + (1/N_g)·ĝ_t
    Φ  -= N_g·η·μ_t                # = B·η'·μ_t

The functional cores below hold the math; the ``Optimizer`` classes are thin wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import register
from ._base import BatchSizeMixin, PackageOptimizer, check_batch_size, check_positive

__all__ = [
    "ConjugateMomentumSGD",
    "ConjugateAdam",
    "conjugate_momentum_sgd",
    "conjugate_adam",
    "conjugate_momentum_hyperparameters",
    "per_example_gradients",
]


def steps_horizon(horizon_examples: float, batch_size: int) -> float:
    """A time constant given in examples at B = 1, in steps at batch size B: max(1, N'/B)."""
    return max(1.0, horizon_examples / batch_size)


def conjugate_momentum_hyperparameters(
    lr: float, momentum_horizon: float, batch_size: int
) -> tuple[float, float]:
    """(N_g, η) for batch size B from (η', N'_g): N_g = max(1, N'_g/B), η = B·η'/N_g."""
    n_g = steps_horizon(momentum_horizon, batch_size)
    return n_g, batch_size * lr / n_g


def conjugate_momentum_sgd(
    params: list[Tensor],
    grads: list[Tensor] | tuple[Tensor, ...],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum_horizon: float,
    batch_size: int,
    weight_decay: float = 0.0,
) -> None:
    """One in-place ConjugateMomentumSGD step on lists of tensors (μ in ``momentum_buffers``)."""
    n_g, eta = conjugate_momentum_hyperparameters(lr, momentum_horizon, batch_size)
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(momentum_buffers, grads, 1.0 / n_g)  # μ ← (1 − 1/N_g)μ + ĝ/N_g
    torch._foreach_add_(params, momentum_buffers, alpha=-n_g * eta)  # Φ −= N_g·η·μ


@register(
    "conjugate-momentum-sgd",
    summary="momentum SGD with hyperparameters (η', N'_g) that stay valid across batch sizes",
    example_kwargs={"lr": 1e-2, "momentum_horizon": 10.0, "batch_size": 1},
    uses_batch_size=True,
    benchmark_kwargs=lambda b: {"momentum_horizon": 10.0 * b},  # momentum 0.9, as NAG's
)
class ConjugateMomentumSGD(BatchSizeMixin, PackageOptimizer):
    """Momentum SGD whose hyperparameters are conjugate to the batch size (McAllester).

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: η', the learning rate right for batch size 1 without momentum.
        momentum_horizon: N'_g, the momentum time constant in examples at batch size 1.
        batch_size: B, the minibatch size of the coming steps (``set_batch_size`` changes it;
            η and N_g are re-derived at each step and the momentum buffer is kept).
        weight_decay: L2 penalty added to the gradient.
        check_finite: raise on NaN/inf gradients (one device sync a step); turn off for speed.

    Equivalent to ``torch.optim.SGD(lr=B·η'/N_g, momentum=1 − 1/N_g)``, but (η', N'_g)
    need no retuning when B changes.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum_horizon: float = 320.0,
        *,
        batch_size: int,
        weight_decay: float = 0.0,
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum_horizon=momentum_horizon,
            batch_size=batch_size,
            weight_decay=weight_decay,
            check_finite=check_finite,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr (η')", allow_zero=True)
        check_positive(group["momentum_horizon"], "momentum_horizon (N'_g)")
        check_positive(group["weight_decay"], "weight_decay", allow_zero=True)
        check_batch_size(group)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _update_group(self, group, params, grads, states, originals) -> None:
        conjugate_momentum_sgd(
            params,
            grads,
            [s["momentum_buffer"] for s in states],
            lr=group["lr"],
            momentum_horizon=group["momentum_horizon"],
            batch_size=group["batch_size"],
            weight_decay=group["weight_decay"],
        )

    def derived_hyperparameters(self, group_index: int = 0) -> dict[str, float]:
        """The step-level (N_g, η, momentum = 1 − 1/N_g) a param group uses at its batch size."""
        group = self.param_groups[group_index]
        n_g, eta = conjugate_momentum_hyperparameters(
            group["lr"], group["momentum_horizon"], group["batch_size"]
        )
        return {"n_g": n_g, "lr": eta, "momentum": 1.0 - 1.0 / n_g}


def adam_step_size(lr: float, batch_size: int, per_example: bool) -> float:
    """N_g·η of ConjugateAdam: B·η' with per-example second moments, √B·η' without."""
    return lr * (batch_size if per_example else math.sqrt(batch_size))


def conjugate_adam(
    params: list[Tensor],
    grads: list[Tensor] | tuple[Tensor, ...],
    grad_averages: list[Tensor],
    square_averages: list[Tensor],
    squares: list[Tensor],
    step: int,
    *,
    lr: float,
    grad_horizon: float,
    square_horizon: float,
    batch_size: int,
    eps: float,
    per_example: bool,
    weight_decay: float = 0.0,
) -> None:
    """One in-place ConjugateAdam step at step number ``step`` (1-based).

    ``squares`` are the second-moment samples: ĝ² (batch) or the batch mean of the
    per-example squared gradients. Bias correction is the notes' 1/min(t, N).
    """
    n_g = steps_horizon(grad_horizon, batch_size)
    n_s = steps_horizon(square_horizon, batch_size)
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(grad_averages, grads, 1.0 / min(step, n_g))
    torch._foreach_lerp_(square_averages, squares, 1.0 / min(step, n_s))
    denominators = torch._foreach_sqrt(torch._foreach_add(square_averages, eps))
    step_size = adam_step_size(lr, batch_size, per_example)
    torch._foreach_addcdiv_(params, grad_averages, denominators, value=-step_size)


@register(
    "conjugate-adam",
    summary="McAllester's simplified Adam (1/min(t,N) bias correction) with batch-conjugate η', N'_g, N'_s",
    example_kwargs={"lr": 1e-2, "batch_size": 1},
    uses_batch_size=True,
    benchmark_kwargs=lambda b: {"grad_horizon": 10.0 * b, "square_horizon": 1000.0 * b},  # Adam's β
)
class ConjugateAdam(BatchSizeMixin, PackageOptimizer):
    """McAllester's simplified Adam with hyperparameters conjugate to the batch size.

    μ_t = (1 − 1/min(t,N_g))·μ_{t−1} + ĝ_t/min(t,N_g)
    s_t = (1 − 1/min(t,N_s))·s_{t−1} + q_t/min(t,N_s)
    Φ  −= N_g·η·μ_t / √(s_t + ε)

    with N = max(1, N'/B) for time constants N'_g, N'_s given in examples at batch size 1.

    The learning rate follows the notes' RMSProp argument. With batch-level second moments
    (q = ĝ², the default) the linear rule is wrong: E ĝ² = μ² + σ²/B shrinks as B grows, so
    the step uses the square-root rule N_g·η = √B·η' (Malladi et al. 2022). With
    ``second_moment="per_example"``, q is the batch mean of per-example squared gradients
    (pass them to ``step(per_example_squares=...)``; :func:`per_example_gradients` computes
    them), which does not depend on B, and the linear rule η = B·η'/N_g holds.

    Args:
        lr: η', the learning rate for batch size 1.
        grad_horizon / square_horizon: N'_g, N'_s in examples at batch size 1.
        batch_size: B (``set_batch_size`` changes it; state is kept).
        eps: ε inside the square root, as in the notes.
        second_moment: "batch" or "per_example".
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        grad_horizon: float = 320.0,
        square_horizon: float = 32000.0,
        *,
        batch_size: int,
        eps: float = 1e-16,
        second_moment: str = "batch",
        weight_decay: float = 0.0,
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            grad_horizon=grad_horizon,
            square_horizon=square_horizon,
            batch_size=batch_size,
            eps=eps,
            second_moment=second_moment,
            weight_decay=weight_decay,
            check_finite=check_finite,
        )
        super().__init__(params, defaults)
        self._per_example_squares: Mapping[Tensor, Tensor] | None = None

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr (η')", allow_zero=True)
        check_positive(group["grad_horizon"], "grad_horizon (N'_g)")
        check_positive(group["square_horizon"], "square_horizon (N'_s)")
        check_positive(group["eps"], "eps")
        check_positive(group["weight_decay"], "weight_decay", allow_zero=True)
        check_batch_size(group)
        if group["second_moment"] not in ("batch", "per_example"):
            raise ValueError(
                f"second_moment must be 'batch' or 'per_example', got {group['second_moment']!r}"
            )

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0)
        state["grad_average"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["square_average"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], float] | None = None,
        per_example_squares: Mapping[Tensor, Tensor] | None = None,
    ) -> float | None:
        """One step. ``per_example_squares`` maps each parameter to the batch mean of its
        per-example squared gradients; required with ``second_moment="per_example"``."""
        loss = None
        if closure is not None:  # first, so the check below sees the grads the closure makes
            with torch.enable_grad():
                loss = closure()
        needs = any(g["second_moment"] == "per_example" for g in self.param_groups)
        if needs:
            if per_example_squares is None:
                raise ValueError(
                    "second_moment='per_example' needs step(per_example_squares=...); "
                    "learned_optim.per_example_gradients computes them"
                )
            for gi, group in enumerate(self.param_groups):
                if group["second_moment"] != "per_example":
                    continue
                for i, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    sq = per_example_squares.get(p)
                    if sq is None or sq.shape != p.shape:
                        found = "no entry" if sq is None else f"shape {tuple(sq.shape)}"
                        raise ValueError(
                            f"per_example_squares has {found} for parameter {i} of param group "
                            f"{gi} (shape {tuple(p.shape)})"
                        )
        self._per_example_squares = per_example_squares if needs else None
        try:
            super().step()
        finally:
            self._per_example_squares = None
        return loss

    def _update_group(self, group, params, grads, states, originals) -> None:
        per_example = group["second_moment"] == "per_example"
        squares: Sequence[Tensor]  # a list, or the tuple torch._foreach_mul returns
        if per_example:
            assert self._per_example_squares is not None
            squares = [self._per_example_squares[p].to(g.dtype) for p, g in zip(originals, grads)]
        else:
            squares = torch._foreach_mul(grads, grads)
        # Params of a group share a step count (they are stepped together); group them by it.
        by_step: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            s["step"] += 1
            by_step.setdefault(int(s["step"].item()), []).append(i)
        for t, idx in by_step.items():
            conjugate_adam(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [states[i]["grad_average"] for i in idx],
                [states[i]["square_average"] for i in idx],
                [squares[i] for i in idx],
                t,
                lr=group["lr"],
                grad_horizon=group["grad_horizon"],
                square_horizon=group["square_horizon"],
                batch_size=group["batch_size"],
                eps=group["eps"],
                per_example=per_example,
                weight_decay=group["weight_decay"],
            )


def per_example_gradients(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> tuple[Tensor, dict[Tensor, Tensor]]:
    """Per-example gradients of ``loss_fn(model(x), y)`` with ``torch.func`` (vmap of grad).

    Sets each trainable parameter's ``.grad`` to the batch mean gradient (as ``backward`` on
    the mean loss would) and returns ``(mean loss, {param: mean over the batch of g_b²})``,
    the per-example second moments that ``ConjugateAdam(second_moment="per_example")`` needs.
    ``loss_fn`` must reduce by mean over its batch dimension.
    """
    from torch.func import functional_call, grad_and_value, vmap

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    detached = {n: p.detach() for n, p in named.items()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def example_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    grads, losses = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0))(detached, inputs, targets)
    squares: dict[Tensor, Tensor] = {}
    for name, p in named.items():
        g = grads[name]
        mean = g.mean(0)
        if p.grad is None:
            p.grad = mean.to(p.dtype)
        else:
            p.grad.copy_(mean)
        squares[p] = (g * g).mean(0)
    return losses.mean(), squares
