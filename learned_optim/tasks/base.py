"""Tasks (one optimizee each) and task families (a seeded distribution over tasks).

A :class:`Task` is functional: initial parameters, a differentiable ``loss(params, batch)``
and a minibatch sampler. The benchmark harness trains it with a ``torch.optim`` optimizer;
the meta-trainer unrolls it with a learned update rule; both read the same definition.

Defining a family takes a few lines::

    class LinearRegression(TaskFamily):
        name = "linreg"
        def sample(self, seed):
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(5, generator=g)
            def batch(gen, b):
                x = torch.randn(b, 5, generator=gen)
                return x, x @ w
            return Task([torch.zeros(5)], lambda p, xy: ((xy[0] @ p[0] - xy[1]) ** 2).mean(),
                        batch, batch_size=16, seed=seed)
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Task", "TaskFamily", "register_family", "get_family", "families"]

Batch = Any
LossFn = Callable[[Sequence[Tensor], Batch], Tensor]
BatchFn = Callable[[torch.Generator, int], Batch]


@dataclass
class Task:
    """One optimizee: θ₀, a loss of (params, batch), and how to draw a minibatch of size B.

    ``batch_fn`` is None for deterministic tasks (then ``batch_size`` is 1 and the batch is
    None). ``seed`` seeds the minibatch stream, so a run is reproducible.
    """

    initial_params: list[Tensor]
    loss_fn: LossFn
    batch_fn: BatchFn | None = None
    batch_size: int = 1
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def init_params(self, requires_grad: bool = True) -> list[Tensor]:
        """Fresh leaf copies of θ₀."""
        return [p.detach().clone().requires_grad_(requires_grad) for p in self.initial_params]

    def batch_generator(self, stream: int = 0) -> torch.Generator:
        """The generator of this task's minibatch stream number ``stream``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * stream + 1)

    def sample_batch(self, generator: torch.Generator, batch_size: int | None = None) -> Batch:
        """A minibatch (None for a deterministic task)."""
        if self.batch_fn is None:
            return None
        return self.batch_fn(generator, batch_size or self.batch_size)

    def loss(self, params: Sequence[Tensor], batch: Batch = None) -> Tensor:
        return self.loss_fn(params, batch)

    @property
    def stochastic(self) -> bool:
        return self.batch_fn is not None


class TaskFamily(abc.ABC):
    """A distribution over tasks: ``sample(seed)`` returns the same task for the same seed."""

    name: str = "task"

    @abc.abstractmethod
    def sample(self, seed: int) -> Task:
        """The task drawn with ``seed``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_FAMILIES: dict[str, Callable[..., TaskFamily]] = {}


def register_family(name: str) -> Callable[[Callable[..., TaskFamily]], Callable[..., TaskFamily]]:
    """Register a task-family constructor under ``name`` (see :func:`get_family`)."""

    def decorate(factory: Callable[..., TaskFamily]) -> Callable[..., TaskFamily]:
        _FAMILIES[name] = factory
        return factory

    return decorate


def families() -> list[str]:
    """Names of the registered task families."""
    return sorted(_FAMILIES)


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """Construct the task family registered as ``name`` with ``kwargs``."""
    try:
        factory = _FAMILIES[name]
    except KeyError:
        raise KeyError(f"no task family named {name!r}; available: {', '.join(families())}") from None
    return factory(**kwargs)
