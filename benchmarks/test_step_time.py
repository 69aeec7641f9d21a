"""Optimizer step time of every registered optimizer against ``torch.optim.Adam``.

Run the measurement with::

    python -m pytest benchmarks/test_step_time.py --benchmark-enable
    python -m pytest benchmarks/test_step_time.py --benchmark-enable --step-time-report step_time.md

pytest-benchmark prints its table grouped by parameter count; ``benchmarks/conftest.py``
adds a markdown table of median step times and their ratio to Adam's at the same size.

Under this repository's default ``--benchmark-disable`` each case runs one step as a smoke
test (the step runs, moves every parameter, and leaves parameters and state finite).

Only ``step()`` is timed: the parameters (a handful of float32 matrices and vectors summing
to exactly N elements) get fixed random gradients once, and each optimizer is stepped past
any warm-up (``warmup_steps`` of its defaults, plus a few steps to allocate its state)
before timing. Parameters keep moving during timing; the gradients do not change.
The step time depends on ``torch.get_num_threads()`` (``OMP_NUM_THREADS``) and on other
load on the machine; the report header records the thread count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import learned_optim

SIZES = [10**4, 10**5, 10**6]
BASELINE = "adam-foreach"  # torch.optim.Adam(foreach=True): ratios are to this one
# torch.optim.Adam with no implementation flag: on CPU tensors torch picks the for-loop
# (foreach is the default only on CUDA/XPU), so it is measured as a second reference.
REFERENCES: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    BASELINE: lambda params: torch.optim.Adam(params, lr=1e-3, foreach=True),
    "adam-torch-default": lambda params: torch.optim.Adam(params, lr=1e-3),
}
OPTIMIZERS = [*REFERENCES, *learned_optim.available()]
EXTRA_WARMUP_STEPS = 3  # lazy state allocation, step counters, allocator caches

# 15 cases; 0.5 s of timed rounds each keeps the file well under a minute. (A marker option
# takes precedence over the --benchmark-max-time/--benchmark-min-rounds command-line options.)
pytestmark = pytest.mark.benchmark(max_time=0.5, min_rounds=5)


def param_shapes(n: int) -> list[tuple[int, ...]]:
    """A network-like mix summing to exactly ``n`` elements: three matrices of decreasing
    size and different aspect ratios, their bias vectors, and one vector with the rest."""
    shapes: list[tuple[int, ...]] = []
    for share, aspect in ((0.5, 1), (0.3, 2), (0.15, 4)):
        rows = max(1, round(math.sqrt(share * n / aspect)))
        cols = max(1, round(share * n / rows))
        shapes += [(rows, cols), (rows,)]
    rest = n - sum(math.prod(s) for s in shapes)
    assert rest > 0, (n, shapes)
    shapes.append((rest,))
    return shapes


def make_params(n: int, seed: int = 0) -> list[torch.Tensor]:
    """float32 leaf parameters of ``param_shapes(n)`` with fixed random ``.grad``."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in param_shapes(n):
        p = torch.nn.Parameter(0.05 * torch.randn(shape, generator=gen))
        p.grad = 1e-2 * torch.randn(shape, generator=gen)
        params.append(p)
    assert sum(p.numel() for p in params) == n
    return params


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """A registered optimizer (or a reference) by name; ``NAME:WEIGHTS`` gives a learned one other weights."""
    if name in REFERENCES:
        return REFERENCES[name](params)
    name, _, weights = name.partition(":")
    info = learned_optim.info(name)
    kwargs = dict(info.example_kwargs)
    if weights:
        kwargs["weights"] = weights
    if info.uses_batch_size:
        kwargs.setdefault("batch_size", 1)
    return learned_optim.create(name, params, **kwargs)


def warmup_steps(opt: torch.optim.Optimizer) -> int:
    """Steps to take before timing: past any warm-up in which parameters do not move."""
    k = max(int(group.get("warmup_steps", 0)) for group in opt.param_groups)
    return k + EXTRA_WARMUP_STEPS


def _finite_state(opt: torch.optim.Optimizer) -> bool:
    return all(
        bool(torch.isfinite(v).all())
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}".replace("+0", ""))
def test_step_time(benchmark, record_step_time, name: str, n: int) -> None:
    params = make_params(n)
    grads = [p.grad.clone() for p in params]
    opt = make_optimizer(name, params)
    for _ in range(warmup_steps(opt)):
        opt.step()
    before = [p.detach().clone() for p in params]

    benchmark.group = f"{n:.0e} params"
    benchmark.extra_info.update(optimizer=name, params=n, threads=torch.get_num_threads())
    benchmark(opt.step)

    for p, b, g in zip(params, before, grads):
        assert not torch.equal(p, b), f"{name}: a step left a {tuple(p.shape)} parameter unchanged"
        assert torch.isfinite(p).all(), f"{name}: non-finite parameter after stepping"
        assert torch.equal(p.grad, g), f"{name}: step() modified .grad (timing assumes fixed gradients)"
    assert _finite_state(opt), f"{name}: non-finite optimizer state after stepping"

    if benchmark.enabled and benchmark.stats is not None:
        record_step_time(name, n, benchmark.stats.stats.median)
