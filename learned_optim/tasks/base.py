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
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["Task", "TaskFamily", "TaskStack", "register_family", "get_family", "load_family", "families"]

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
    reset_fn: Callable[[], None] | None = None  # restores state a run changes besides θ (buffers)

    def init_params(self, requires_grad: bool = True) -> list[Tensor]:
        """Fresh leaf copies of θ₀ (and the task's other state, e.g. batch-norm buffers, reset)."""
        self.reset()
        return [p.detach().clone().requires_grad_(requires_grad) for p in self.initial_params]

    def reset(self) -> None:
        """Restore what a run changes besides θ (a module's buffers) to its initial value."""
        if self.reset_fn is not None:
            self.reset_fn()

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


@dataclass
class TaskStack:
    """K tasks unrolled together (the meta-trainer's unit): one call gives all K losses.

    ``param_tasks[j]`` says which task parameter tensor j belongs to: an int for a tensor of
    one task, None for a *stacked* tensor whose leading dimension indexes the K tasks
    (families that vectorize, like the quadratics, stack every tensor), or a tuple of task
    indices for a tensor stacking those tasks only (module families stack same-shaped nets). ``losses(params,
    batch)`` returns the (K,) per-task losses; ``new_stream()`` starts a minibatch stream and
    ``sample_batch(stream)`` draws the next minibatch of every task from it.
    """

    initial_params: list[Tensor]
    losses_fn: Callable[[Sequence[Tensor], Batch], Tensor]
    param_tasks: list[int | None | tuple[int, ...]]
    num_tasks: int
    stream_fn: Callable[[], Any] | None = None
    batch_fn: Callable[[Any], Batch] | None = None
    reset_fn: Callable[[], None] | None = None  # restores the tasks' state besides θ (buffers)

    def init_params(self, requires_grad: bool = True) -> list[Tensor]:
        """Fresh leaf copies of θ₀ (the tasks' other state reset)."""
        self.reset()
        return [p.detach().clone().requires_grad_(requires_grad) for p in self.initial_params]

    def reset(self) -> None:
        if self.reset_fn is not None:
            self.reset_fn()

    def new_stream(self) -> Any:
        return self.stream_fn() if self.stream_fn is not None else None

    def sample_batch(self, stream: Any) -> Batch:
        return self.batch_fn(stream) if self.batch_fn is not None else None

    def losses(self, params: Sequence[Tensor], batch: Batch = None) -> Tensor:
        return self.losses_fn(params, batch)

    @classmethod
    def single(cls, task: Task) -> TaskStack:
        """One task as a stack of one (its losses a (1,) tensor)."""
        return cls(list(task.initial_params), lambda params, batch: task.loss(params, batch).reshape(1),
                   [0] * len(task.initial_params), 1,
                   task.batch_generator if task.stochastic else None,
                   task.sample_batch if task.stochastic else None, task.reset)

    @classmethod
    def of(cls, tasks: Sequence[Task]) -> TaskStack:
        """The generic stack: each task's tensors side by side, losses evaluated one by one."""
        return cls.concatenate([cls.single(t) for t in tasks])

    @classmethod
    def concatenate(cls, stacks: Sequence[TaskStack]) -> TaskStack:
        """Several stacks as one (tasks numbered in order): how a mixture of families stacks.
        Batches and streams are lists with one entry per stack."""
        stacks = list(stacks)
        if len(stacks) == 1:
            return stacks[0]
        initial: list[Tensor] = []
        owners: list[int | None | tuple[int, ...]] = []
        spans: list[tuple[int, int]] = []
        offset = 0
        for stack in stacks:
            spans.append((len(initial), len(initial) + len(stack.initial_params)))
            initial += stack.initial_params
            for owner in stack.param_tasks:
                if owner is None:
                    owners.append(tuple(range(offset, offset + stack.num_tasks)))
                elif isinstance(owner, tuple):
                    owners.append(tuple(offset + k for k in owner))
                else:
                    owners.append(offset + owner)
            offset += stack.num_tasks

        def losses(params, batches):
            batches = batches if batches is not None else [None] * len(stacks)
            return torch.cat([s.losses(params[a:b], bt) for s, (a, b), bt in zip(stacks, spans, batches)])

        def reset() -> None:
            for s in stacks:
                s.reset()

        return cls(initial, losses, owners, offset, lambda: [s.new_stream() for s in stacks],
                   lambda streams: [s.sample_batch(st) for s, st in zip(stacks, streams)], reset)


class TaskFamily(abc.ABC):
    """A distribution over tasks: ``sample(seed)`` returns the same task for the same seed."""

    name: str = "task"

    @abc.abstractmethod
    def sample(self, seed: int) -> Task:
        """The task drawn with ``seed``."""

    def stack(self, seeds: Sequence[int], device: torch.device | str | None = None) -> TaskStack:
        """The tasks drawn with ``seeds`` as one :class:`TaskStack`.

        The generic version loops over the tasks (CPU only); families override it with a
        vectorized one that runs on any device.
        """
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"task family {self.name!r} has no vectorized stack; it runs on the CPU only")
        return TaskStack.of([self.sample(s) for s in seeds])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_FAMILIES: dict[str, Callable[..., TaskFamily]] = {}


FactoryT = TypeVar("FactoryT", bound=Callable[..., TaskFamily])


def register_family(name: str) -> Callable[[FactoryT], FactoryT]:
    """Register a task-family constructor under ``name`` (see :func:`get_family`)."""

    def decorate(factory: FactoryT) -> FactoryT:
        _FAMILIES[name] = factory
        return factory

    return decorate


def families() -> list[str]:
    """Names of the registered task families."""
    return sorted(_FAMILIES)


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """Construct the task family registered as ``name`` with ``kwargs``, or load one from an
    importable path ``"package.module:factory"`` (see :func:`load_family`)."""
    if ":" in name:
        return load_family(name, **kwargs)
    try:
        factory = _FAMILIES[name]
    except KeyError:
        raise KeyError(f"no task family named {name!r}; available: {', '.join(families())}, "
                       "or an importable 'package.module:factory'") from None
    return factory(**kwargs)


def load_family(path: str, **kwargs: Any) -> TaskFamily:
    """The task family at ``"package.module:attribute"``: a :class:`TaskFamily`, or a callable
    returning one (called with ``kwargs``). Each way this can fail raises a ValueError naming it."""
    import importlib

    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute or ":" in attribute:
        raise ValueError(f"task path {path!r} must be 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"task path {path!r}: cannot import module {module_name!r} ({error})") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"task path {path!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if isinstance(target, TaskFamily):
        if kwargs:
            raise ValueError(f"task path {path!r} names a TaskFamily instance, which takes no arguments "
                             f"(got {', '.join(sorted(kwargs))})")
        return target
    if not callable(target):
        raise ValueError(f"task path {path!r}: {attribute!r} is a {type(target).__name__}, "
                         "neither a TaskFamily nor a callable returning one")
    try:
        family = target(**kwargs)
    except TypeError as error:
        raise ValueError(f"task path {path!r}: calling {attribute!r} with {kwargs or 'no arguments'} failed "
                         f"({error})") from error
    if not isinstance(family, TaskFamily):
        raise ValueError(f"task path {path!r}: {attribute!r} returned a {type(family).__name__}, not a TaskFamily")
    return family
