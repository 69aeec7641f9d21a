"""The optimizer registry: every optimizer of the package registers itself here, so the
conformance suite, the benchmark harness and ``learned_optim.create`` find it by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from torch.optim import Optimizer

__all__ = ["OptimizerInfo", "register", "create", "available", "info"]

_REGISTRY: dict[str, OptimizerInfo] = {}

T = TypeVar("T", bound=type[Optimizer])


@dataclass(frozen=True)
class OptimizerInfo:
    """What the package knows of a registered optimizer.

    ``example_kwargs`` construct a working instance for small problems (tests, examples);
    ``uses_batch_size`` says the constructor takes ``batch_size`` (the harness passes it);
    ``benchmark_kwargs(batch_size)`` gives the settings the benchmark harness uses besides the
    tuned lr, matched to the baselines' (e.g. momentum 0.9 at the task's batch size);
    ``lr_grid`` replaces the harness's half-decade lr grid (``(1.0,)`` for learned
    optimizers, which are used as meta-trained, not tuned).
    """

    name: str
    cls: type[Optimizer]
    summary: str
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    uses_batch_size: bool = False
    benchmark_kwargs: Callable[[int], dict[str, Any]] | None = None
    lr_grid: tuple[float, ...] | None = None


def register(
    name: str,
    *,
    summary: str,
    example_kwargs: Mapping[str, Any] | None = None,
    uses_batch_size: bool = False,
    benchmark_kwargs: Callable[[int], dict[str, Any]] | None = None,
    lr_grid: tuple[float, ...] | None = None,
) -> Callable[[T], T]:
    """Class decorator: register an ``Optimizer`` subclass under ``name``."""

    def decorate(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"an optimizer is already registered as {name!r}")
        _REGISTRY[name] = OptimizerInfo(
            name, cls, summary, MappingProxyType(dict(example_kwargs or {})), uses_batch_size, benchmark_kwargs,
            tuple(lr_grid) if lr_grid is not None else None,
        )
        return cls

    return decorate


def available() -> list[str]:
    """Names of the registered optimizers, sorted."""
    return sorted(_REGISTRY)


def info(name: str) -> OptimizerInfo:
    """The registry entry of ``name``; a KeyError lists the names there are."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no optimizer named {name!r}; available: {', '.join(available())}") from None


def create(name: str, params: Iterable[Any], **kwargs: Any) -> Optimizer:
    """Construct the optimizer registered as ``name`` over ``params``.

    >>> opt = learned_optim.create("conjugate-momentum-sgd", model.parameters(), batch_size=32)
    """
    return info(name).cls(params, **kwargs)
