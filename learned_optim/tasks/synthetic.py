"""Closed-form task families: the paper's quadratics, Rosenbrock, and noisy problems whose
per-example gradient mean and spread are known."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Task, TaskFamily, TaskStack, register_family
from .mlp import mlp_forward

__all__ = ["IllConditionedQuadraticFamily", "QuadraticFamily", "RosenbrockFamily", "NoisyQuadraticFamily",
           "NoisyLeastSquaresFamily", "SinusoidFamily"]


@register_family("quadratic")
class QuadraticFamily(TaskFamily):
    """Andrychowicz et al. 2016: f(θ) = ‖Wθ − y‖², W (dim×dim), y and θ₀ IID standard Gaussian.

    ``loss_offset`` c reports f(θ) + c instead: the gradients, hence every optimizer's path, are
    the plain task's, but a log meta-loss, log(f + c), stops rewarding progress below c. A
    quadratic is solvable exactly, so without it long meta-training unrolls are dominated by
    ever smaller losses (log f → −∞) that no benchmark measures.
    """

    name = "quadratic"

    def __init__(self, dim: int = 10, dtype: torch.dtype = torch.float32, loss_offset: float = 0.0) -> None:
        if isinstance(loss_offset, bool) or not isinstance(loss_offset, (int, float)) \
                or not math.isfinite(loss_offset) or loss_offset < 0:
            raise ValueError(f"loss_offset must be a finite number ≥ 0, got {loss_offset!r}")
        self.dim, self.dtype, self.loss_offset = dim, dtype, float(loss_offset)

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.dim, self.dim, generator=g, dtype=self.dtype)
        y = torch.randn(self.dim, generator=g, dtype=self.dtype)
        theta0 = torch.randn(self.dim, generator=g, dtype=self.dtype)
        return self._task(w, y, theta0, seed)

    def _task(self, w: Tensor, y: Tensor, theta0: Tensor, seed: int) -> Task:
        """The task ‖Wθ − y‖² (+ c) from θ₀ (``stack`` batches tasks through their ``info``)."""
        offset = self.loss_offset

        def loss(params, batch=None):
            f = (w @ params[0] - y).square().sum()
            return f + offset if offset else f

        return Task([theta0], loss, seed=seed, info={"W": w, "y": y})

    def stack(self, seeds, device=None) -> TaskStack:
        """K quadratics in one batched matrix product; task k equals ``sample(seeds[k])``."""
        tasks = [self.sample(s) for s in seeds]
        w = torch.stack([t.info["W"] for t in tasks]).to(device)
        y = torch.stack([t.info["y"] for t in tasks]).to(device)
        theta0 = torch.stack([t.initial_params[0] for t in tasks]).to(device)

        offset = self.loss_offset

        def losses(params, batch=None):
            f = (torch.bmm(w, params[0].unsqueeze(2)).squeeze(2) - y).square().sum(1)
            return f + offset if offset else f

        return TaskStack([theta0], losses, [None], len(tasks))


@register_family("ill-conditioned-quadratic")
class IllConditionedQuadraticFamily(QuadraticFamily):
    """f(θ) = ‖Wθ − y‖² with W = U·diag(σ)·Vᵀ, U and V random orthogonal and σ log-spaced
    from 1 down to 1/√κ, so the Hessian 2WᵀW has condition number exactly κ (default 10⁴,
    50-D); y and θ₀ standard Gaussian. First-order methods crawl along the flat directions."""

    name = "ill-conditioned-quadratic"

    def __init__(self, dim: int = 50, condition: float = 1e4, dtype: torch.dtype = torch.float32,
                 loss_offset: float = 0.0) -> None:
        if not (isinstance(condition, (int, float)) and math.isfinite(condition) and condition >= 1):
            raise ValueError(f"condition must be a finite number ≥ 1, got {condition!r}")
        super().__init__(dim, dtype, loss_offset)
        self.condition = float(condition)

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
        sigma = torch.logspace(0, -0.5 * math.log10(self.condition), self.dim, dtype=torch.float64)
        w = (u * sigma) @ v.T
        y = torch.randn(self.dim, generator=g, dtype=torch.float64)
        theta0 = torch.randn(self.dim, generator=g, dtype=torch.float64)
        return self._task(w.to(self.dtype), y.to(self.dtype), theta0.to(self.dtype), seed)


@register_family("rosenbrock")
class RosenbrockFamily(TaskFamily):
    """f(x, y) = (1 − x)² + 100·(y − x²)², started uniformly in [−2, 2] × [−1, 3]."""

    name = "rosenbrock"

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        start = torch.rand(2, generator=g, dtype=self.dtype) * 4 + torch.tensor([-2.0, -1.0], dtype=self.dtype)

        def loss(params, batch=None):
            x, y = params[0][0], params[0][1]
            return (1 - x).square() + 100 * (y - x.square()).square()

        return Task([start], loss, seed=seed)


@register_family("noisy-quadratic")
class NoisyQuadraticFamily(TaskFamily):
    """Per-example loss ½Σ h(θ − c)² + Σ σ·ξ·θ, ξ ~ N(0, 1) per example.

    The per-example gradient is h⊙(θ − c) + σ⊙ξ: mean g = h⊙(θ − c), spread σ, both known,
    so the notes' optimum B* = 16σ²/g² is known at every θ. ``info`` holds h, c, σ.
    """

    name = "noisy-quadratic"

    def __init__(
        self,
        dim: int = 8,
        batch_size: int = 8,
        curvature: tuple[float, float] = (0.1, 1.0),
        noise: tuple[float, float] = (0.5, 4.0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dim, self.batch_size, self.dtype = dim, batch_size, dtype
        self.curvature, self.noise = curvature, noise

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)

        def log_uniform(lo: float, hi: float) -> Tensor:
            u = torch.rand(self.dim, generator=g, dtype=torch.float64)
            return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).to(self.dtype)

        h = log_uniform(*self.curvature)
        sigma = log_uniform(*self.noise)
        c = torch.randn(self.dim, generator=g, dtype=self.dtype)
        theta0 = c + torch.randn(self.dim, generator=g, dtype=self.dtype) * 3

        def loss(params, xi):
            theta = params[0]
            return 0.5 * (h * (theta - c).square()).sum() + (xi.mean(0) * sigma * theta).sum()

        def batch(gen: torch.Generator, b: int) -> Tensor:
            return torch.randn(b, self.dim, generator=gen, dtype=self.dtype)

        return Task([theta0], loss, batch, self.batch_size, seed, {"h": h, "c": c, "sigma": sigma})


@register_family("noisy-least-squares")
class NoisyLeastSquaresFamily(TaskFamily):
    """Linear regression with fresh examples each step: x ~ N(0, diag(λ)), y = w*·x + noise.

    Loss ½·mean (x·θ − y)², θ₀ = 0. The spectrum λ is log-spaced over ``spectrum``; the
    label noise keeps the gradient noisy at the optimum, where the expected loss is noise²/2.
    """

    name = "noisy-least-squares"

    def __init__(
        self,
        dim: int = 50,
        batch_size: int = 32,
        noise_std: float = 1.0,
        spectrum: tuple[float, float] = (0.01, 1.0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dim, self.batch_size, self.noise_std, self.dtype = dim, batch_size, noise_std, dtype
        self.scales = torch.logspace(
            math.log10(spectrum[0]) / 2, math.log10(spectrum[1]) / 2, dim, dtype=dtype
        )  # standard deviations: the covariance spectrum is their square

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        w_star = torch.randn(self.dim, generator=g, dtype=self.dtype)
        scales, noise = self.scales, self.noise_std

        def batch(gen: torch.Generator, b: int) -> tuple[Tensor, Tensor]:
            x = torch.randn(b, self.dim, generator=gen, dtype=self.dtype) * scales
            y = x @ w_star + noise * torch.randn(b, generator=gen, dtype=self.dtype)
            return x, y

        def loss(params, xy):
            x, y = xy
            return 0.5 * (x @ params[0] - y).square().mean()

        theta0 = torch.zeros(self.dim, dtype=self.dtype)
        return Task([theta0], loss, batch, self.batch_size, seed, {"w_star": w_star})


@register_family("sinusoid")
class SinusoidFamily(TaskFamily):
    """MAML's regression tasks (Finn et al. 2017): y = A·sin(x − ϕ) with the amplitude A and
    phase ϕ drawn per task (uniform on ``amplitude`` and ``phase``), x uniform on ``x_range``.

    A minibatch is ``batch_size`` fresh points (K-shot, K = 10 by default); the loss is the
    mean squared error of an MLP (``hidden`` ReLU layers, default 40-40) whose θ₀ is drawn
    like ``nn.Linear``'s default init. ``model()`` builds that MLP as an ``nn.Module`` with the
    same parameter order, and ``criterion`` scores a model's outputs (for :class:`~learned_optim.meta.MAML`).
    """

    name = "sinusoid"
    criterion = staticmethod(F.mse_loss)

    def __init__(self, hidden: tuple[int, ...] = (40, 40), batch_size: int = 10,
                 amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0), dtype: torch.dtype = torch.float32) -> None:
        for key, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"{key} must be a finite (low, high) pair with low ≤ high, got {(lo, hi)!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.hidden, self.batch_size = tuple(hidden), batch_size
        self.amplitude, self.phase, self.x_range, self.dtype = amplitude, phase, x_range, dtype

    def model(self) -> nn.Module:
        """The family's MLP as an ``nn.Module`` (parameters in the order of a task's params)."""
        sizes = [1, *self.hidden, 1]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).to(self.dtype)

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        amplitude = float(torch.empty(()).uniform_(*self.amplitude, generator=g))
        phase = float(torch.empty(()).uniform_(*self.phase, generator=g))
        sizes = [1, *self.hidden, 1]
        params: list[Tensor] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):  # nn.Linear's default: U(±1/√fan_in)
            bound = 1 / math.sqrt(fan_in)
            params.append(torch.empty(fan_out, fan_in, dtype=self.dtype).uniform_(-bound, bound, generator=g))
            params.append(torch.empty(fan_out, dtype=self.dtype).uniform_(-bound, bound, generator=g))
        lo, hi, dtype = *self.x_range, self.dtype

        def batch(gen: torch.Generator, b: int) -> tuple[Tensor, Tensor]:
            x = torch.empty(b, 1, dtype=dtype).uniform_(lo, hi, generator=gen)
            return x, amplitude * torch.sin(x - phase)

        def loss(ps, xy):
            x, y = xy
            return F.mse_loss(mlp_forward(ps, x, "relu"), y)

        return Task(params, loss, batch, self.batch_size, seed, {"amplitude": amplitude, "phase": phase})
