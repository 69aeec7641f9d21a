"""Unrolling: a learned rule optimizing a :class:`~learned_optim.tasks.TaskStack`.

The inner loop of meta-training, θ_{t+1} = θ_t + g(∇f(θ_t), h_t; φ), run on K tasks at once
(all their coordinates in one call of the rule). :meth:`Unroll.run` advances a carried
:class:`UnrollState` by a truncation of U steps and returns the losses f(θ_{s+1..s+U}) with
the graph to φ kept (or not). θ and the rule's state are carried across truncations, the
graph is not (truncated backprop through time).

How the optimizee gradient ∇_t enters the graph is the ``gradient`` mode:

* ``"first-order"`` (the paper's): ∇_t is an input; no second derivatives of f.
* ``"second-order"``: ∇_t keeps its dependence on θ_t, so the meta-gradient includes
  ∂∇_t/∂θ_t (Hessian-vector products through the unroll).
* ``"gd-by-sgd"`` (K. Cho): the rule's input is u_t = g₁.detach() + (g₂ − g₂.detach()), the
  value of minibatch z₁'s gradient with the derivative of an independent minibatch z₂'s,
  so the backward path does not reuse the forward path's minibatch (whose gradient and
  Hessian are correlated). The losses f(θ_t) are those of z₁. On deterministic tasks it is
  the second-order mode. Runs without a graph (validation) draw z₁ only.

``precision`` (:data:`PRECISIONS`) trades exactness for speed on GPUs: ``"tf32"`` lets float32
matrix products inside the unroll (the tasks' and the rule's) run on TF32 tensor cores (CUDA
only), ``"bf16"`` runs the tasks' loss evaluations under ``torch.autocast`` in bfloat16 (their
gradients then carry bf16 rounding; the rule, its state and θ stay float32). The meta-gradient
then differs from float32's by what tests/test_meta.py states and checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..rules import Segments
from ..tasks import TaskStack

__all__ = ["UnrollState", "Unroll", "stack_segments", "detach_state", "gd_by_sgd_gradient", "GRADIENT_MODES",
           "PRECISIONS", "check_precision", "float32_matmul_precision"]

GRADIENT_MODES = ("first-order", "second-order", "gd-by-sgd")
PRECISIONS = ("float32", "tf32", "bf16")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, by name, a precision that is unknown or that ``device`` cannot run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision 'tf32' needs a CUDA device (TF32 is a tensor-core format), got {device}")


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """Within the block, float32 matrix products use TF32 if ``precision`` is "tf32" (then
    torch's global setting is restored); otherwise they keep torch's setting."""
    if precision != "tf32":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def stack_segments(scope: str, stack: TaskStack, params: Sequence[Tensor]) -> Segments:
    """The GAC scopes of a stack's coordinates: per (task, tensor) for scope "tensor", per task for "group"."""
    k = stack.num_tasks
    ids, count = [], 0
    for p, owner in zip(params, stack.param_tasks):
        device = p.device
        if owner is None or isinstance(owner, tuple):  # stacked: leading dimension is the task
            members = torch.arange(k, device=device) if owner is None else torch.tensor(owner, device=device)
            per_task = p.numel() // len(members)
            if scope == "tensor":
                ids.append(torch.arange(len(members), device=device).repeat_interleave(per_task) + count)
                count += len(members)
            else:
                ids.append(members.repeat_interleave(per_task))
        else:
            ids.append(torch.full((p.numel(),), count if scope == "tensor" else owner, device=device, dtype=torch.long))
            count += 1 if scope == "tensor" else 0
    return Segments.from_ids(torch.cat(ids), count if scope == "tensor" else k)


def gd_by_sgd_gradient(forward: Tensor, backward: Tensor) -> Tensor:
    """u = g₁.detach() + (g₂ − g₂.detach()) (K. Cho): the value of minibatch z₁'s gradient
    ``forward``, the derivative of an independent minibatch z₂'s ``backward``. Serves the
    learned-optimizer unroll and the learned-initialization estimator alike."""
    return forward.detach() + (backward - backward.detach())


def detach_state(state: Tensor | tuple) -> Tensor | tuple:
    """A rule state (a tensor or a tuple of them) cut from its graph."""
    if isinstance(state, Tensor):
        return state.detach()
    return tuple(detach_state(part) for part in state)


@dataclass
class UnrollState:
    """Where an unroll stands: θ_t, the rule state h_t, and f, ∇f at θ_t (all detached)."""

    params: list[Tensor]
    rule_state: Tensor | tuple  # per rule: a tensor, or a tuple (NTM-BFGS: coordinates, memories)
    grad: Tensor
    losses: Tensor  # (K,) f(θ_t)
    stream: Any
    initial_losses: Tensor  # (K,) f(θ_0)


class Unroll:
    """Run ``rule`` on ``stack``; ``gradient`` is one of :data:`GRADIENT_MODES`."""

    # An nn.Module with the rule interface (``segments_from``, ``init_state``, ``dtype``; see
    # learned_optim.rules), which nn.Module's typing cannot express.
    rule: Any

    def __init__(self, rule: nn.Module, stack: TaskStack, gradient: str = "first-order",
                 precision: str = "float32") -> None:
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        params = stack.initial_params
        check_precision(precision, params[0].device)
        self.rule, self.stack, self.gradient, self.precision = rule, stack, gradient, precision
        self._device_type = params[0].device.type
        self.sizes = [p.numel() for p in params]
        self.segments = self.rule.segments_from(stack_segments("tensor", stack, params),
                                           stack_segments("group", stack, params))  # groups = tasks

    def _loss_and_grad(self, params: list[Tensor], stream: Any, create_graph: bool,
                       keep_graph: bool) -> tuple[Tensor, Tensor]:
        """f and ∇f at ``params``; ``keep_graph`` keeps the loss's graph for a later meta-gradient."""
        with torch.enable_grad():
            with torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                losses = self.stack.losses(params, self.stack.sample_batch(stream))
            losses = losses.float() if losses.dtype == torch.bfloat16 else losses
            grads = torch.autograd.grad(losses.sum(), params, create_graph=create_graph,
                                        retain_graph=keep_graph or create_graph)
        return losses, torch.cat([g.reshape(-1) for g in grads])

    def start(self) -> UnrollState:
        """θ_0, a zero rule state, and f, ∇f at θ_0."""
        params = self.stack.init_params()
        stream = self.stack.new_stream()
        with float32_matmul_precision(self.precision):
            losses, grad = self._loss_and_grad(params, stream, create_graph=False, keep_graph=False)
        losses = losses.detach()
        state = self.rule.init_state(grad.numel(), device=grad.device, segments=self.segments)
        return UnrollState([p.detach() for p in params], state, grad.to(self.rule.dtype), losses, stream, losses)

    def run(self, state: UnrollState, steps: int, track: bool = True) -> tuple[Tensor, UnrollState]:
        """Advance ``steps`` steps; the (steps, K) losses f(θ_{t+1..t+steps}) and the new state.

        With ``track`` the losses keep their graph to the rule's parameters φ (for a
        meta-gradient); without it nothing is kept (validation, evaluation).
        """
        second_order = track and self.gradient == "second-order"
        independent = track and self.gradient == "gd-by-sgd"  # the backward path's own minibatch z₂
        params = [p.detach().requires_grad_(True) for p in state.params]
        rule_state, grad = detach_state(state.rule_state), state.grad.detach()
        history = []
        with torch.set_grad_enabled(track), float32_matmul_precision(self.precision):
            for _ in range(steps):
                if getattr(self.rule, "needs_params", False):  # a parameter-relative step reads θ_t
                    flat = torch.cat([p.reshape(-1) for p in params]).to(self.rule.dtype)
                    update, rule_state = self.rule(grad, rule_state, self.segments, params=flat)
                else:
                    update, rule_state = self.rule(grad, rule_state, self.segments)
                pieces = update.split(self.sizes)
                params = [p + u.view_as(p).to(p.dtype) for p, u in zip(params, pieces)]
                if not track:
                    params = [p.detach().requires_grad_(True) for p in params]
                    rule_state = detach_state(rule_state)
                losses, grad = self._loss_and_grad(params, state.stream, create_graph=second_order, keep_graph=track)
                grad = grad.to(self.rule.dtype)
                if independent:
                    _, backward = self._loss_and_grad(params, state.stream, create_graph=True, keep_graph=True)
                    backward = backward.to(self.rule.dtype)
                    grad = gd_by_sgd_gradient(grad, backward)
                elif not second_order:
                    grad = grad.detach()
                history.append(losses if track else losses.detach())
        new_state = UnrollState(
            [p.detach() for p in params], detach_state(rule_state), grad.detach(),
            history[-1].detach() if history else state.losses, state.stream, state.initial_losses,
        )
        return torch.stack(history) if history else state.losses.new_zeros(0, state.losses.numel()), new_state
