"""Closed-form task families: the paper's quadratics, Rosenbrock, and noisy problems whose
per-example gradient mean and spread are known."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Task, TaskFamily, TaskStack, register_family

__all__ = ["IllConditionedQuadraticFamily", "QuadraticFamily", "RosenbrockFamily", "NoisyQuadraticFamily", "NoisyLeastSquaresFamily"]


@register_family("quadratic")
class QuadraticFamily(TaskFamily):
    """Andrychowicz et al. 2016: f(θ) = ‖Wθ − y‖², W (dim×dim), y and θ₀ IID standard Gaussian."""

    name = "quadratic"

    def __init__(self, dim: int = 10, dtype: torch.dtype = torch.float32) -> None:
        self.dim, self.dtype = dim, dtype

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.dim, self.dim, generator=g, dtype=self.dtype)
        y = torch.randn(self.dim, generator=g, dtype=self.dtype)
        theta0 = torch.randn(self.dim, generator=g, dtype=self.dtype)

        def loss(params, batch=None):
            return (w @ params[0] - y).square().sum()

        return Task([theta0], loss, seed=seed, info={"W": w, "y": y})

    def stack(self, seeds, device=None) -> TaskStack:
        """K quadratics in one batched matrix product; task k equals ``sample(seeds[k])``."""
        tasks = [self.sample(s) for s in seeds]
        w = torch.stack([t.info["W"] for t in tasks]).to(device)
        y = torch.stack([t.info["y"] for t in tasks]).to(device)
        theta0 = torch.stack([t.initial_params[0] for t in tasks]).to(device)

        def losses(params, batch=None):
            return (torch.bmm(w, params[0].unsqueeze(2)).squeeze(2) - y).square().sum(1)

        return TaskStack([theta0], losses, [None], len(tasks))


@register_family("ill-conditioned-quadratic")
class IllConditionedQuadraticFamily(QuadraticFamily):
    """f(θ) = ‖Wθ − y‖² with W = U·diag(σ)·Vᵀ, U and V random orthogonal and σ log-spaced
    from 1 down to 1/√κ, so the Hessian 2WᵀW has condition number exactly κ (default 10⁴,
    50-D); y and θ₀ standard Gaussian. First-order methods crawl along the flat directions."""

    name = "ill-conditioned-quadratic"

    def __init__(self, dim: int = 50, condition: float = 1e4, dtype: torch.dtype = torch.float32) -> None:
        if not (isinstance(condition, (int, float)) and math.isfinite(condition) and condition >= 1):
            raise ValueError(f"condition must be a finite number ≥ 1, got {condition!r}")
        super().__init__(dim, dtype)
        self.condition = float(condition)

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
        sigma = torch.logspace(0, -0.5 * math.log10(self.condition), self.dim, dtype=torch.float64)
        w = (u * sigma) @ v.T
        y = torch.randn(self.dim, generator=g, dtype=torch.float64)
        theta0 = torch.randn(self.dim, generator=g, dtype=torch.float64)
        w, y, theta0 = w.to(self.dtype), y.to(self.dtype), theta0.to(self.dtype)

        def loss(params, batch=None):
            return (w @ params[0] - y).square().sum()

        return Task([theta0], loss, seed=seed, info={"W": w, "y": y})


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
