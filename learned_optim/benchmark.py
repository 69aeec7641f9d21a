"""The benchmark harness: optimizers against tuned built-in baselines on task families.

Protocol (Andrychowicz et al. 2016): each optimizer's learning rate is tuned on a log grid
with half-decade steps, on seeds separate from the evaluation seeds; the tuned rate is then
run on every evaluation seed. The score of a run is the mean of its last 10 losses; a run
that diverges (non-finite loss, or an optimizer refusing a non-finite gradient) scores inf.
Tables give the median and the interquartile range over seeds.
"""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import registry
from .tasks import Task, TaskFamily, get_family

__all__ = [
    "OptimizerSpec",
    "BenchmarkResult",
    "baselines",
    "package_optimizers",
    "half_decade_grid",
    "train",
    "run_seed",
    "final_loss",
    "quantile",
    "tune_lr",
    "run_benchmark",
    "format_table",
    "save_results",
    "plot_results",
    "plot_median_band",
    "DEFAULT_TASKS",
    "forked_map",
]

#: Built-in tasks of the main benchmark, with their number of steps; none needs files.
DEFAULT_TASKS: dict[str, int] = {"quadratic": 100, "rosenbrock": 200, "noisy-least-squares": 200, "mlp": 200}

OptimizerFactory = Callable[[list[Tensor], float, Task], Optimizer]


def half_decade_grid(low: float = 1e-5, high: float = 10.0) -> list[float]:
    """Learning rates 10^k and 3·10^k... in half-decade steps (10^(k/2)) from low to high."""
    k_low, k_high = round(2 * math.log10(low)), round(2 * math.log10(high))
    return [10 ** (k / 2) for k in range(k_low, k_high + 1)]


@dataclass(frozen=True)
class OptimizerSpec:
    """How the harness builds an optimizer: ``factory(params, lr, task)`` and its lr grid."""

    name: str
    factory: OptimizerFactory
    lr_grid: Sequence[float] = field(default_factory=half_decade_grid)


def baselines() -> dict[str, OptimizerSpec]:
    """torch.optim's SGD, NAG (Nesterov momentum 0.9), RMSprop and Adam."""
    return {
        "sgd": OptimizerSpec("sgd", lambda p, lr, t: torch.optim.SGD(p, lr=lr)),
        "nag": OptimizerSpec("nag", lambda p, lr, t: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)),
        "rmsprop": OptimizerSpec("rmsprop", lambda p, lr, t: torch.optim.RMSprop(p, lr=lr)),
        "adam": OptimizerSpec("adam", lambda p, lr, t: torch.optim.Adam(p, lr=lr)),
    }


def package_optimizers(names: Iterable[str] | None = None) -> dict[str, OptimizerSpec]:
    """Registered optimizers; those that take ``batch_size`` get the task's batch size.
    ``NAME:WEIGHTS`` runs a learned optimizer with other weights (a shipped name or a path),
    e.g. ``"ntm-bfgs:ntm-bfgs-mnist"``."""
    specs = {}
    for name in names if names is not None else registry.available():
        base, _, weights = name.partition(":")
        entry = registry.info(base)
        if weights and "weights" not in inspect.signature(entry.cls).parameters:
            raise ValueError(f"{base!r} takes no weights, so {name!r} names nothing")

        def factory(params, lr, task, entry=entry, weights=weights):
            kwargs = {"batch_size": task.batch_size} if entry.uses_batch_size else {}
            if entry.benchmark_kwargs is not None:
                kwargs.update(entry.benchmark_kwargs(task.batch_size))
            if weights:
                kwargs["weights"] = weights
            return entry.cls(params, lr=lr, **kwargs)

        grid = entry.lr_grid if entry.lr_grid is not None else half_decade_grid()
        specs[name] = OptimizerSpec(name, factory, grid)
    return specs


def train(task: Task, optimizer_factory: Callable[[list[Tensor]], Optimizer], steps: int,
          timing: dict[str, float] | None = None,
          schedule: Callable[[Optimizer], Any] | None = None) -> Tensor:
    """Train ``task`` for ``steps`` steps; the loss before each step (inf after divergence).

    ``schedule``, if given, makes a ``torch.optim.lr_scheduler`` for the optimizer, stepped
    after every optimizer step.

    ``timing``, if given, receives the wall seconds of the steps run (minibatch, forward,
    backward and update: ``"seconds"``), of the optimizer's ``step()`` calls alone
    (``"step_seconds"``) and how many steps ran (``"steps"``).
    """
    params = task.init_params()
    optimizer = optimizer_factory(params)
    scheduler = schedule(optimizer) if schedule is not None else None
    generator = task.batch_generator()
    losses = torch.full((steps,), math.inf, dtype=torch.float64)
    total = in_step = 0.0
    ran = 0
    for t in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = task.loss(params, task.sample_batch(generator))
        if not torch.isfinite(loss):
            break
        loss.backward()
        losses[t] = loss.item()
        stepping = time.perf_counter()
        try:
            optimizer.step()
        except ValueError as error:
            if "NaN or inf" in str(error):  # the package's optimizers refuse non-finite grads
                break
            raise
        end = time.perf_counter()
        total, in_step, ran = total + end - start, in_step + end - stepping, ran + 1
        if scheduler is not None:
            scheduler.step()
    if timing is not None:
        timing.update(seconds=total, step_seconds=in_step, steps=ran)
    return losses


def run_seed(family: TaskFamily, spec: OptimizerSpec, lr: float, seed: int, steps: int,
             timing: dict[str, float] | None = None) -> Tensor:
    """Losses of ``spec`` at ``lr`` on the task drawn with ``seed`` (``timing``: see :func:`train`)."""
    task = family.sample(seed)
    return train(task, lambda params: spec.factory(params, lr, task), steps, timing)


def final_loss(losses: Tensor, last: int = 10) -> float:
    """Mean of the last ``last`` losses (inf if the run diverged)."""
    tail = losses[-last:]
    return float(tail.mean()) if bool(torch.isfinite(tail).all()) else math.inf


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile that treats inf (a diverged run) as the largest value."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = ordered[lo], ordered[hi]
    return a if a == b or lo == hi else a + (b - a) * (pos - lo)


def tune_lr(
    family: TaskFamily, spec: OptimizerSpec, seeds: Sequence[int], steps: int
) -> tuple[float, dict[float, float]]:
    """The grid learning rate with the lowest median final loss over ``seeds``."""
    scores = {}
    for lr in spec.lr_grid:
        finals = [final_loss(run_seed(family, spec, lr, s, steps)) for s in seeds]
        scores[lr] = quantile(finals, 0.5)
    best = min(scores, key=lambda lr: (scores[lr], -lr))
    return best, scores


@dataclass
class BenchmarkResult:
    """One optimizer on one task: tuned lr and the loss curves of the evaluation seeds."""

    task: str
    optimizer: str
    lr: float
    curves: Tensor  # seeds × steps
    seconds: float = 0.0

    @property
    def finals(self) -> list[float]:
        return [final_loss(c) for c in self.curves]

    def quantile(self, q: float) -> float:
        return quantile(self.finals, q)

    @property
    def diverged(self) -> int:
        return sum(not math.isfinite(f) for f in self.finals)

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "median": self.quantile(0.5),
            "q25": self.quantile(0.25),
            "q75": self.quantile(0.75),
            "diverged": self.diverged,
            "finals": self.finals,
            "median_curve": [quantile(col.tolist(), 0.5) for col in self.curves.T],
            "seconds": self.seconds,
        }


_JOB_CONTEXT: dict = {}  # what forked benchmark workers read (closures cannot be pickled)


def _evaluate(task_name: str, opt_name: str) -> BenchmarkResult:
    ctx = _JOB_CONTEXT
    family, steps = ctx["tasks"][task_name]
    spec = ctx["optimizers"][opt_name]
    torch.set_num_threads(ctx["threads"])
    start = time.perf_counter()
    lr, _ = tune_lr(family, spec, ctx["tune_seeds"], steps)
    curves = torch.stack([run_seed(family, spec, lr, s, steps) for s in ctx["eval_seeds"]])
    return BenchmarkResult(task_name, opt_name, lr, curves, time.perf_counter() - start)


def run_benchmark(
    tasks: dict[str, tuple[TaskFamily, int]],
    optimizers: dict[str, OptimizerSpec],
    *,
    eval_seeds: Sequence[int] = tuple(range(10)),
    tune_seeds: Sequence[int] = (1001, 1002, 1003),
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[BenchmarkResult]:
    """Tune every optimizer's lr on ``tune_seeds`` and evaluate it on ``eval_seeds``.

    ``tasks`` maps a name to (family, steps). Tuning and evaluation seeds must not overlap.
    ``jobs > 1`` spreads the (task, optimizer) pairs over forked worker processes (one torch
    thread each); results do not depend on ``jobs``.
    """
    overlap = set(eval_seeds) & set(tune_seeds)
    if overlap:
        raise ValueError(f"tuning and evaluation seeds overlap: {sorted(overlap)}")
    pairs = [(t, o) for t in tasks for o in optimizers]
    _JOB_CONTEXT.update(
        tasks=tasks, optimizers=optimizers, eval_seeds=list(eval_seeds), tune_seeds=list(tune_seeds),
        threads=1 if jobs > 1 else torch.get_num_threads(),
    )

    def report(result: BenchmarkResult) -> None:
        if log is not None:
            log(
                f"{result.task:>20} {result.optimizer:>24}  lr {result.lr:.3g}  "
                f"median {result.quantile(0.5):.4g}  ({result.seconds:.1f} s)"
            )

    results: list[BenchmarkResult] = []
    try:
        for result in forked_map(_evaluate, pairs, jobs):
            report(result)
            results.append(result)
    finally:
        _JOB_CONTEXT.clear()
    return results


def forked_map(function: Callable, arguments: Sequence[tuple], jobs: int) -> Iterable:
    """``function(*args)`` for each of ``arguments``, in order, spread over ``jobs`` forked worker
    processes (in this process if ``jobs`` is 1 or fork is unavailable). Forked workers see this
    process's globals, so ``function`` may read closures parked in a module-level dict."""
    if jobs > 1 and len(arguments) > 1 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            yield from pool.map(function, *zip(*arguments))
    else:
        for args in arguments:
            yield function(*args)


def format_table(results: Sequence[BenchmarkResult]) -> str:
    """A markdown table: median final loss and interquartile range per task and optimizer."""
    lines = [
        "| task | optimizer | tuned lr | median final loss | IQR (25%–75%) | diverged |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for task in dict.fromkeys(r.task for r in results):
        rows = sorted((r for r in results if r.task == task), key=lambda r: r.quantile(0.5))
        for r in rows:
            lines.append(
                f"| {r.task} | {r.optimizer} | {r.lr:.3g} | {r.quantile(0.5):.4g} | "
                f"{r.quantile(0.25):.4g} – {r.quantile(0.75):.4g} | {r.diverged}/{len(r.finals)} |"
            )
    return "\n".join(lines)


def save_results(results: Sequence[BenchmarkResult], out_dir: str | Path, header: str = "") -> Path:
    """Write ``benchmark.md`` (the table) and ``benchmark.json`` (all numbers) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text((header + "\n\n" if header else "") + format_table(results) + "\n")
    (out / "benchmark.json").write_text(json.dumps([r.to_json() for r in results], indent=1))
    return out


def plot_median_band(ax, result: BenchmarkResult, label: str, highlight: bool = False) -> None:
    """Median loss against step with an interquartile band, on a matplotlib axis."""
    cols = result.curves.T.tolist()
    steps = range(1, len(cols) + 1)
    line, = ax.plot(steps, [quantile(c, 0.5) for c in cols], label=label, lw=2.2 if highlight else 1.25)
    ax.fill_between(steps, [quantile(c, 0.25) for c in cols], [quantile(c, 0.75) for c in cols],
                    color=line.get_color(), alpha=0.11)


def plot_results(results: Sequence[BenchmarkResult], path: str | Path) -> Path:
    """Median loss against step, log scale, one panel per task (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'learned_optim[plot]'") from error
    tasks = list(dict.fromkeys(r.task for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in results if r.task == task):
            median = [quantile(col.tolist(), 0.5) for col in r.curves.T]
            ax.plot(range(1, len(median) + 1), median, label=f"{r.optimizer} (lr {r.lr:.2g})")
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (median over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_tasks(names: Iterable[str] | None = None, steps: int | None = None, **family_kwargs) -> dict[str, tuple[TaskFamily, int]]:
    """The built-in benchmark tasks (or ``names``) with their step counts."""
    chosen = list(names) if names is not None else list(DEFAULT_TASKS)
    return {n: (get_family(n, **family_kwargs.get(n, {})), steps or DEFAULT_TASKS.get(n, 200)) for n in chosen}
