"""Learning initializations (the MAML family): meta-gradients of θ₀ through an inner loop.

A task i gives an inner loss L_i(φ; z) on minibatches z and an outer loss L_test(φ). The
inner loop adapts φ from θ₀; the meta-objective is L_test(φ(θ₀)), averaged over tasks. Four
estimators of ∂L_test/∂θ₀, all behind :meth:`InitEstimator.estimate`:

* :class:`SecondOrder`: backprop through every inner update φ ← φ − α·∇L_i(φ; z), the
  Hessian of each step's minibatch included (MAML). Memory grows with the inner steps.
* :class:`FirstOrder`: the inner update's value is kept but its gradient flows only through
  the identity path, φ ← φ − α·∇L_i(φ; z).detach() (learn2learn's form; detaching the whole
  φ, as some libraries do, would cut θ₀ off). The meta-gradient is ∇L_test(φ).
* :class:`GDBySGD` (K. Cho, "Discrepancy between GD-by-GD and GD-by-SGD"): the inner update
  uses u = g₁.detach() + (g₂ − g₂.detach()): its value is the gradient g₁ of minibatch z₁
  (the forward path), its derivative the Hessian of an independent minibatch z₂ (the
  backward path). With one minibatch for both, the estimate picks up the correlation of a
  minibatch's gradient with its own Hessian and is biased for L_test(θ₀ − α·E_z∇L_z(θ₀)).
* :class:`Implicit` (iMAML, Rajeswaran et al. 2019): the inner problem is proximal,
  φ = argmin L_i(φ) + (λ/2)‖φ − θ₀‖², solved by any optimizer, so dφ/dθ₀ = (I + ∇²L_i(φ)/λ)⁻¹
  and the meta-gradient (I + ∇²L_i/λ)⁻¹·∇L_test(φ) is found by conjugate gradient on
  Hessian-vector products: memory independent of the number of inner steps.

:class:`MAML` meta-trains θ₀ of a model (an ``nn.Module`` or a list of tensors) on a task
family with any of them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..tasks import Task, TaskFamily
from .trainer import TRAIN_SEED_BASE, VALIDATION_SEED_BASE
from .unroll import gd_by_sgd_gradient

__all__ = [
    "INIT_ESTIMATORS",
    "FirstOrder",
    "GDBySGD",
    "Implicit",
    "InitEstimate",
    "InitEstimator",
    "InnerOptimizer",
    "InnerSGD",
    "MAML",
    "MetaTask",
    "SecondOrder",
    "CGResult",
    "conjugate_gradient",
    "get_estimator",
]

Params = list[Tensor]
Batch = Any


@dataclass
class MetaTask:
    """One task of initialization learning: L_i(φ; z) on inner minibatches, and L_test(φ)."""

    train_loss: Callable[[Sequence[Tensor], Batch], Tensor]  # L_i(φ; z)
    sample_train: Callable[[], Batch]  # the next inner minibatch z, independent of earlier draws
    test_loss: Callable[[Sequence[Tensor]], Tensor]  # L_test(φ): the outer (query) loss


# ---------------------------------------------------------------------------- inner loops

Direction = Callable[[Params, MetaTask], Params]  # the update direction u at φ (with or without a graph)


def _gradient(params: Params, task: MetaTask, create_graph: bool) -> Params:
    """∇L_i(φ; z) on a fresh minibatch z."""
    loss = task.train_loss(params, task.sample_train())
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


@dataclass
class InnerSGD:
    """``steps`` steps of φ ← φ − α·u (u: the minibatch gradient). Differentiable, so every
    estimator can use it; α = ``lr``."""

    lr: float
    steps: int
    differentiable = True

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"inner lr must be a finite positive number, got {self.lr!r}")

    def unroll(self, start: Params, task: MetaTask, direction: Direction) -> Params:
        """φ after ``steps`` updates along ``direction``; the graph is whatever it keeps."""
        params = list(start)
        for _ in range(self.steps):
            params = [p - self.lr * u for p, u in zip(params, direction(params, task))]
        return params

    def solve(self, start: Sequence[Tensor], task: MetaTask) -> Params:
        """φ after ``steps`` plain SGD steps, no graph kept (for the first-order and implicit estimators)."""
        params = [p.detach() for p in start]
        for _ in range(self.steps):
            with torch.enable_grad():
                params = [p.requires_grad_(True) for p in params]
                grads = _gradient(params, task, create_graph=False)
            params = [(p - self.lr * g).detach() for p, g in zip(params, grads)]
        return params


@dataclass
class InnerOptimizer:
    """``steps`` steps of a ``torch.optim`` optimizer made by ``factory(params)`` (any of this
    package's or torch's). Not differentiable: for the first-order and implicit estimators."""

    factory: Callable[[list[Tensor]], torch.optim.Optimizer]
    steps: int
    differentiable = False

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if not callable(self.factory):
            raise TypeError(f"factory must be callable (params -> torch.optim.Optimizer), got {self.factory!r}")

    def solve(self, start: Sequence[Tensor], task: MetaTask) -> Params:
        params = [p.detach().clone().requires_grad_(True) for p in start]
        optimizer = self.factory(params)
        for _ in range(self.steps):
            def closure() -> Tensor:
                optimizer.zero_grad()
                loss = task.train_loss(params, task.sample_train())
                loss.backward()
                return loss

            with torch.enable_grad():
                # torch types the closure as returning a float; returning the loss tensor is the norm
                optimizer.step(closure)  # type: ignore[arg-type]
        return [p.detach() for p in params]


InnerLoop = InnerSGD | InnerOptimizer


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"inner steps must be a non-negative integer, got {steps!r}")


# ---------------------------------------------------------------------------- estimators


@dataclass
class InitEstimate:
    """One task's meta-gradient: L_test(φ), ∂L_test/∂θ₀ per tensor of θ₀, and the adapted φ."""

    meta_loss: float
    grads: list[Tensor]
    adapted: Params
    info: dict[str, Any] = field(default_factory=dict)


class InitEstimator:
    """∂L_test(φ(θ₀))/∂θ₀ for one task; subclasses say how the inner loop is differentiated."""

    name = "estimator"

    def estimate(self, theta: Sequence[Tensor], task: MetaTask, inner: InnerLoop) -> InitEstimate:
        raise NotImplementedError

    def _require_differentiable(self, inner: InnerLoop) -> None:
        if not getattr(inner, "differentiable", False):
            raise ValueError(f"the {self.name} estimator differentiates through the inner updates, and "
                             f"{type(inner).__name__} (a torch.optim optimizer) is not differentiable; "
                             "use InnerSGD, or the first-order or implicit estimator")

    @staticmethod
    def _through_unroll(theta: Sequence[Tensor], task: MetaTask, inner: InnerSGD,
                        direction: Direction) -> InitEstimate:
        """Unroll from θ₀ with the graph ``direction`` keeps, then backprop L_test to θ₀."""
        with torch.enable_grad():
            start = [t.detach().requires_grad_(True) for t in theta]
            adapted = inner.unroll(start, task, direction)
            loss = task.test_loss(adapted)
            grads = torch.autograd.grad(loss, start)
        return InitEstimate(float(loss.detach()), list(grads), [p.detach() for p in adapted])

    def __repr__(self) -> str:  # (dataclass estimators, like Implicit, list their settings)
        return f"{type(self).__name__}()"


class SecondOrder(InitEstimator):
    """Full backprop through the inner updates, each step's minibatch Hessian included."""

    name = "second-order"

    def estimate(self, theta: Sequence[Tensor], task: MetaTask, inner: InnerLoop) -> InitEstimate:
        self._require_differentiable(inner)  # so an InnerSGD (a loop with ``unroll``)
        return self._through_unroll(theta, task, cast(InnerSGD, inner),
                                    lambda p, t: _gradient(p, t, create_graph=True))


class FirstOrder(InitEstimator):
    """The inner update's value, its gradient through the identity path only: ∇L_test(φ)."""

    name = "first-order"

    def estimate(self, theta: Sequence[Tensor], task: MetaTask, inner: InnerLoop) -> InitEstimate:
        if isinstance(inner, InnerSGD):  # φ_{t+1} = φ_t − α·u_t.detach(): θ₀ reaches φ by the identity
            return self._through_unroll(theta, task, inner,
                                        lambda p, t: [g.detach() for g in _gradient(p, t, create_graph=False)])
        with torch.enable_grad():  # any optimizer: φ = θ₀ + (φ_opt − θ₀).detach()
            start = [t.detach().requires_grad_(True) for t in theta]
            solved = inner.solve(start, task)
            adapted = [s + (p - s).detach() for s, p in zip(start, solved)]
            loss = task.test_loss(adapted)
            grads = torch.autograd.grad(loss, start)
        return InitEstimate(float(loss.detach()), list(grads), solved)


class GDBySGD(InitEstimator):
    """u = g₁.detach() + (g₂ − g₂.detach()): value from minibatch z₁, derivative from an independent z₂."""

    name = "gd-by-sgd"

    def estimate(self, theta: Sequence[Tensor], task: MetaTask, inner: InnerLoop) -> InitEstimate:
        self._require_differentiable(inner)

        def direction(params: Params, t: MetaTask) -> Params:
            forward = _gradient(params, t, create_graph=False)  # g₁ on z₁: the path φ takes
            backward = _gradient(params, t, create_graph=True)  # g₂ on z₂: the Hessian backprop sees
            return [gd_by_sgd_gradient(g1, g2) for g1, g2 in zip(forward, backward)]

        return self._through_unroll(theta, task, cast(InnerSGD, inner), direction)  # differentiable, as checked


@dataclass
class CGResult:
    """A conjugate-gradient solve: the solution, the residual norms ‖b − A·x‖ (the first is ‖b‖),
    and whether it stopped at a direction of non-positive curvature."""

    solution: Tensor
    residuals: list[float]
    negative_curvature: bool = False


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], rhs: Tensor, steps: int,
                       tol: float = 0.0) -> CGResult:
    """Solve A·x = b for symmetric positive definite A given only x ↦ A·x, from x = 0.

    At most ``steps`` iterations; stops once ‖b − A·x‖ ≤ ``tol``·‖b‖. Where A is not positive
    definite along a search direction (pᵀAp ≤ 0) it stops there and returns the iterate so
    far (b itself if that is the first direction), as truncated Newton-CG does.
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    norms = [float(rr.sqrt())]
    target = tol * norms[0]
    for _ in range(steps):
        if norms[-1] <= target or norms[-1] == 0.0:
            break
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        if not curvature > 0:
            return CGResult(x if len(norms) > 1 else rhs.clone(), norms, True)
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = torch.dot(r, r)
        p = r + (rr_next / rr) * p
        rr = rr_next
        norms.append(float(rr.sqrt()))
    return CGResult(x, norms)


@dataclass
class Implicit(InitEstimator):
    """iMAML: solve the proximal inner problem with any optimizer, then (I + H/λ)⁻¹·∇L_test by CG.

    ``lam`` is λ (the proximal strength); ``cg_steps`` and ``tol`` (relative residual) bound
    the CG solve; ``damping`` δ solves ((1 + δ)·I + H/λ)·w = ∇L_test instead, which keeps the
    system positive definite where the minibatch Hessian H of L_i at φ is not (CG stops at
    the first direction of non-positive curvature, see :func:`conjugate_gradient`). H is
    measured on a fresh inner minibatch.
    """

    lam: float = 1.0  # λ
    cg_steps: int = 5
    damping: float = 0.0  # δ
    tol: float = 1e-10
    name = "implicit"

    def __post_init__(self) -> None:
        for key in ("lam", "damping", "tol"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite non-negative number, got {value!r}")
        if not self.lam > 0:
            raise ValueError(f"lam (λ) must be positive, got {self.lam!r}")
        if not isinstance(self.cg_steps, int) or isinstance(self.cg_steps, bool) or self.cg_steps < 1:
            raise ValueError(f"cg_steps must be a positive integer, got {self.cg_steps!r}")

    def estimate(self, theta: Sequence[Tensor], task: MetaTask, inner: InnerLoop) -> InitEstimate:
        anchor = [t.detach() for t in theta]
        lam = self.lam

        def proximal(params: Sequence[Tensor], batch: Batch) -> Tensor:  # L_i(φ; z) + (λ/2)‖φ − θ₀‖²
            penalty = sum((p - a).square().sum() for p, a in zip(params, anchor))
            return task.train_loss(params, batch) + 0.5 * lam * penalty

        solved = inner.solve(anchor, MetaTask(proximal, task.sample_train, task.test_loss))
        with torch.enable_grad():
            adapted = [p.detach().requires_grad_(True) for p in solved]
            loss = task.test_loss(adapted)
            outer = torch.autograd.grad(loss, adapted)
            inner_grads = torch.autograd.grad(task.train_loss(adapted, task.sample_train()), adapted,
                                              create_graph=True)
            shapes = [p.shape for p in adapted]
            sizes = [p.numel() for p in adapted]

            def matvec(w: Tensor) -> Tensor:  # ((1 + δ)·I + H/λ)·w, H·w by double backprop
                pieces = [v.view(s) for v, s in zip(w.split(sizes), shapes)]
                hv = torch.autograd.grad(inner_grads, adapted, pieces, retain_graph=True)
                return (1 + self.damping) * w + torch.cat([h.reshape(-1) for h in hv]) / lam

            rhs = torch.cat([g.reshape(-1) for g in outer])
            cg = conjugate_gradient(matvec, rhs, self.cg_steps, self.tol)
        grads = [v.view(s) for v, s in zip(cg.solution.split(sizes), shapes)]
        return InitEstimate(float(loss.detach()), grads, solved,
                            {"cg_iterations": len(cg.residuals) - 1, "negative_curvature": cg.negative_curvature,
                             "cg_residual": cg.residuals[-1] / max(cg.residuals[0], 1e-300)})


INIT_ESTIMATORS: dict[str, Callable[..., InitEstimator]] = {
    "second-order": SecondOrder,
    "first-order": FirstOrder,
    "gd-by-sgd": GDBySGD,
    "implicit": Implicit,
}


def get_estimator(name: str, **kwargs: Any) -> InitEstimator:
    """The estimator registered as ``name`` (see :data:`INIT_ESTIMATORS`), built with ``kwargs``."""
    try:
        factory = INIT_ESTIMATORS[name]
    except KeyError:
        raise KeyError(f"no estimator named {name!r}; available: {', '.join(INIT_ESTIMATORS)}") from None
    return factory(**kwargs)


# ---------------------------------------------------------------------------- the outer loop


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


class MAML:
    """Meta-trains an initialization θ₀ with Adam, each meta-step on ``tasks_per_step`` fresh tasks.

    ``model``: an ``nn.Module`` (θ₀ = its parameters; a task's loss is ``family.criterion``
    of the model's output on the minibatch (x, y)), or a list of tensors θ₀ (a task's loss is
    its own ``task.loss``, as for the quadratic family). Inner minibatches of a task come
    from its stream 0 (``support_size`` examples, the task's batch size by default); L_test
    is measured on one query batch of ``query_size`` examples from stream 1. Deterministic
    tasks use the same loss inside and out.
    """

    def __init__(self, model: nn.Module | Sequence[Tensor], family: TaskFamily,
                 estimator: InitEstimator | str = "second-order", inner: InnerLoop | None = None,
                 meta_lr: float = 1e-3, tasks_per_step: int = 4, support_size: int | None = None,
                 query_size: int | None = None, seed: int = 0) -> None:
        self.family = family
        self.estimator = get_estimator(estimator) if isinstance(estimator, str) else estimator
        self.inner = inner if inner is not None else InnerSGD(lr=0.01, steps=1)
        if isinstance(model, nn.Module):
            if not callable(getattr(family, "criterion", None)):
                raise ValueError(f"task family {family.name!r} has no criterion for a model's outputs; "
                                 "pass θ₀ as a list of tensors to use each task's own loss")
            self.model: nn.Module | None = model
            self.names = [name for name, _ in model.named_parameters()]
            self.params = [p for _, p in model.named_parameters()]
        else:
            self.model, self.names = None, []
            self.params = [nn.Parameter(t.detach().clone()) for t in model]
        if not self.params:
            raise ValueError("the model has no parameters to meta-train")
        if not isinstance(tasks_per_step, int) or isinstance(tasks_per_step, bool) or tasks_per_step < 1:
            raise ValueError(f"tasks_per_step must be a positive integer, got {tasks_per_step!r}")
        self.tasks_per_step, self.seed = tasks_per_step, seed
        self.support_size, self.query_size = support_size, query_size
        self.device = self.params[0].device
        self.optimizer = torch.optim.Adam(self.params, lr=meta_lr)
        self.step_count = 0
        self.skipped = 0  # meta-steps skipped for a non-finite meta-gradient

    def loss_fn(self, task: Task) -> Callable[[Sequence[Tensor], Batch], Tensor]:
        """ℓ(φ; batch) of ``task`` for parameters φ shaped like θ₀."""
        if self.model is None:
            return task.loss
        # The family's criterion (checked in __init__; TaskFamily does not declare it).
        model, names, criterion = self.model, self.names, cast(Any, self.family).criterion

        def loss(params: Sequence[Tensor], batch: Batch) -> Tensor:
            x, y = batch
            return criterion(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)

        return loss

    def meta_task(self, task: Task, query_size: int | None = None) -> MetaTask:
        """``task`` as a :class:`MetaTask`: inner minibatches from stream 0, L_test on a stream-1 batch."""
        loss, device = self.loss_fn(task), self.device
        if not task.stochastic:
            return MetaTask(loss, lambda: None, lambda p: loss(p, None))
        stream = task.batch_generator(0)
        query = _to_device(task.sample_batch(task.batch_generator(1), query_size or self.query_size), device)
        return MetaTask(loss, lambda: _to_device(task.sample_batch(stream, self.support_size), device),
                        lambda p: loss(p, query))

    def meta_step(self) -> dict[str, Any]:
        """One Adam step on θ₀ from the mean meta-gradient over ``tasks_per_step`` new tasks.

        If any task's meta-loss or meta-gradient is not finite (an inner loop blew up), the
        step is skipped: θ₀ and Adam's state stay as they were, the record says ``skipped``
        and :attr:`skipped` counts it (as the meta-trainer of learned optimizers does).
        """
        start = time.perf_counter()
        k = self.tasks_per_step
        seeds = [TRAIN_SEED_BASE + self.seed * 10**8 + self.step_count * k + i for i in range(k)]
        total = [torch.zeros_like(p) for p in self.params]
        losses = []
        record: dict[str, Any] = {"step": self.step_count + 1}
        for seed in seeds:
            result = self.estimator.estimate(self.params, self.meta_task(self.family.sample(seed)), self.inner)
            if not math.isfinite(result.meta_loss) or not all(torch.isfinite(g).all() for g in result.grads):
                self.skipped += 1
                record["skipped"] = f"task seed {seed}: non-finite meta-loss or meta-gradient ({result.meta_loss:.4g})"
                break
            for acc, g in zip(total, result.grads):
                acc.add_(g)
            losses.append(result.meta_loss)
        else:
            for p, g in zip(self.params, total):
                p.grad = g / k
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return {**record, "meta_loss": sum(losses) / len(losses) if len(losses) == k else math.nan,
                "seconds": time.perf_counter() - start}

    def train(self, steps: int) -> list[dict[str, float]]:
        """``steps`` meta-steps; their records."""
        return [self.meta_step() for _ in range(steps)]

    def evaluate(self, seeds: Sequence[int] | None = None, steps: int | None = None,
                 query_size: int | None = None) -> Tensor:
        """L_test after adapting θ₀ with the inner loop (``steps`` steps) on each task of ``seeds``.

        Defaults: 32 validation seeds (never trained on), the inner loop's steps, plain
        (non-proximal) inner losses for every estimator.
        """
        seeds = list(seeds) if seeds is not None else [VALIDATION_SEED_BASE + k for k in range(32)]
        inner = self.inner if steps is None else dataclasses.replace(self.inner, steps=steps)
        out = []
        for seed in seeds:
            task = self.meta_task(self.family.sample(seed), query_size)
            adapted = inner.solve(self.params, task)
            with torch.no_grad():
                out.append(float(task.test_loss(adapted)))
        return torch.tensor(out, dtype=torch.float64)
