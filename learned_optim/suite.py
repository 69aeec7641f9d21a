"""The evaluation suite: the kinds of model people train, and how an optimizer is scored on them.

Tasks (:data:`SUITE`) are MLPs, convnets, a transformer and a recurrent language model on
held-out data, with horizons from 100 to 2,000 steps. Built-in baselines have their learning
rate tuned on a half-decade grid on seeds separate from the evaluation seeds (stored, with the
command that made them, so a new optimizer is scored in minutes); learned optimizers run at
their default settings (no lr given), as a user would call them.

Scores of one optimizer on one task, over the evaluation seeds:

* final loss of a run: the mean of its last 10% of steps (inf if it went non-finite);
* median and interquartile range over seeds, and the ratio of the median to tuned Adam's;
* diverged: seeds whose run went non-finite or ended above its initial loss;
* speedup (VeLO's benchmark, Metz et al. 2022): the steps tuned Adam needs to reach the
  optimizer's median final loss, divided by the optimizer's steps. Adam's progress is its
  per-step median over seeds, smoothed by the same trailing 10% window as a final loss; when
  Adam never gets there the speedup is only bounded below (shown as "> 1");
* wall time per step (minibatch, forward, backward, update) and of ``optimizer.step()`` alone,
  beside tuned Adam's on the same task in the same run.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import registry
from .benchmark import OptimizerSpec, baselines, forked_map, half_decade_grid, quantile, run_seed
from .tasks import TaskFamily, get_family

__all__ = [
    "SuiteTask", "SUITE", "suite_tasks", "suite_optimizers", "learned_spec", "final_loss", "diverged",
    "steps_to_reach", "speedup", "SuiteResult", "tune", "tune_suite", "evaluate_suite", "summarize",
    "format_report", "plot_suite", "save_tuned", "load_tuned", "TUNE_SEEDS", "EVAL_SEEDS", "TUNE_WINDOWS",
]

#: Tuning and evaluation seeds never meet (nor the meta-trainer's, which start at 10⁸).
TUNE_SEEDS = (10_000, 10_001, 10_002)
EVAL_SEEDS = tuple(range(10))
FINAL_FRACTION = 0.1  # a run's final loss: the mean of its last 10% of steps


@dataclass(frozen=True)
class SuiteTask:
    """A suite task: a registered family (held-out data) with its arguments and a horizon."""

    name: str
    family: str
    kwargs: dict[str, Any]
    steps: int
    description: str
    needs_data: bool = True  # reads MNIST from the data directory

    def build(self, root: str | os.PathLike | None = None) -> TaskFamily:
        kwargs = dict(self.kwargs)
        if self.needs_data:
            kwargs["root"] = root
        return get_family(self.family, **kwargs)

    def definition(self, family: TaskFamily | None = None) -> dict[str, Any]:
        """What a stored tuning result must match to be reused: the family, its arguments, the
        horizon and (given the built family) a fingerprint of the nets its tuning seeds draw."""
        out: dict[str, Any] = {"family": self.family, "kwargs": self.kwargs, "steps": self.steps}
        if family is not None:
            out["fingerprint"] = fingerprint(family)
        return out


def fingerprint(family: TaskFamily, seeds: Sequence[int] = TUNE_SEEDS) -> str:
    """A short hash of the tensor shapes (and modules, for module families) of tasks ``seeds``:
    it changes when a family's architecture draws change, so stale tuned rates are refused."""
    import hashlib

    parts = []
    for seed in seeds:
        task = family.sample(seed)
        parts.append(repr([tuple(p.shape) for p in task.initial_params]))
        if "module" in task.info:
            parts.append(repr(task.info["module"]))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


SUITE: tuple[SuiteTask, ...] = (
    SuiteTask("mlp-paper-100", "mnist-mlp", {"part": "held-out"}, 100,
              "the paper's MNIST MLP (one sigmoid layer of 20, batch 128), 100 steps"),
    SuiteTask("mlp-paper-2000", "mnist-mlp", {"part": "held-out"}, 2000,
              "the same at 2,000 steps (20× the paper's horizon)"),
    SuiteTask("mlp-relu", "mnist-mlp-nn", {"activation": "relu", "part": "held-out", "image_side": 14}, 300,
              "MNIST (14×14) MLP, ReLU, 1-2 hidden layers of 32/64"),
    SuiteTask("mlp-gelu-ln", "mnist-mlp-nn", {"activation": "gelu", "layer_norm": True, "part": "held-out",
                                              "image_side": 14}, 300,
              "MNIST (14×14) MLP, LayerNorm + GELU, 1-2 hidden layers of 32/64"),
    SuiteTask("mlp-tanh", "mnist-mlp-nn", {"activation": "tanh", "part": "held-out", "image_side": 14}, 300,
              "MNIST (14×14) MLP, tanh, 1-2 hidden layers of 32/64"),
    SuiteTask("conv", "mnist-conv", {"part": "held-out"}, 300,
              "MNIST convnet, two stride-2 3×3 convolutions (4-8 / 8-16 channels), batch 64"),
    SuiteTask("conv-bn", "mnist-conv", {"batch_norm": True, "part": "held-out"}, 300,
              "the same with batch norm"),
    SuiteTask("transformer", "text-transformer", {"part": "held-out"}, 300,
              "byte-level causal transformer LM (pre-LN, 1-2 layers of width 24/32, context 32, batch 16) "
              "on standard-library source", needs_data=False),
    SuiteTask("gru", "text-gru", {"part": "held-out"}, 300,
              "byte-level GRU LM (width 32/48, context 32, batch 16) on standard-library source",
              needs_data=False),
)


def suite_tasks(names: Iterable[str] | None = None, root: str | os.PathLike | None = None
                ) -> dict[str, tuple[SuiteTask, TaskFamily]]:
    """The suite's tasks (or those named), each with its family built on held-out data."""
    by_name = {t.name: t for t in SUITE}
    chosen = list(names) if names is not None else list(by_name)
    unknown = [n for n in chosen if n not in by_name]
    if unknown:
        raise KeyError(f"no suite task named {', '.join(map(repr, unknown))}; available: {', '.join(by_name)}")
    return {n: (by_name[n], by_name[n].build(root)) for n in chosen}


# ---------------------------------------------------------------------------------- optimizers

#: Where the tuning grid search starts for each baseline (half-decade points from low to high);
#: it walks outwards while the best rate sits on an edge, within half_decade_grid(1e-6, 10).
TUNE_WINDOWS: dict[str, tuple[float, float]] = {
    "sgd": (1e-2, 3.0), "nag": (3e-3, 1.0), "rmsprop": (1e-4, 1e-2), "adam": (1e-4, 3e-2), "adamw": (1e-4, 3e-2),
}
UNTUNED = "adam-1e-3"


def learned_spec(name: str) -> OptimizerSpec:
    """A learned optimizer at its default settings: ``"lstm-gac"`` (its default weights) or
    ``"lstm-gac:WEIGHTS"`` (shipped weights by name, or a path), likewise ``"ntm-bfgs[:…]"``.
    No lr is passed: the optimizer runs as ``Cls(params)`` or ``Cls(params, weights=WEIGHTS)``.
    Suffixes, each after an ``@``: ``@bf16`` stores the rule state in bfloat16
    (``state_dtype=torch.bfloat16``); ``@lr=X`` passes ``lr=X`` (the learned step × X), e.g.
    ``"lstm-gac@lr=0.5"``, to measure a user's setting rather than the default."""
    base, *options = name.split("@")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, equals, value = option.partition("=")
        if option == "bf16":
            kwargs["state_dtype"] = torch.bfloat16
        elif key == "lr" and equals:
            try:
                lr = float(value)
            except ValueError:
                lr = math.nan
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"@lr= needs a positive number in {name!r}, got {value!r}")
            kwargs["lr"] = lr
        else:
            raise ValueError(f"unknown learned-optimizer option {'@' + option!r} in {name!r} (known: @bf16, @lr=X)")
    optimizer, _, weights = base.partition(":")
    entry = registry.info(optimizer)
    if entry.lr_grid != (1.0,):
        raise ValueError(f"{optimizer!r} is not a learned optimizer (the suite tunes only the built-in baselines)")
    if weights:
        kwargs["weights"] = weights
    if "state_dtype" in kwargs and "state_dtype" not in inspect.signature(entry.cls).parameters:
        raise ValueError(f"{optimizer!r} has no state_dtype option (@bf16)")

    def factory(params, lr, task, cls=entry.cls):
        return cls(params, **kwargs)

    return OptimizerSpec(name, factory, (1.0,))


def lr_label(optimizer: str, lr: float | None) -> str:
    """The lr column of a report: a tuned or fixed rate, a learned optimizer's ``@lr=X``, else "default"."""
    for option in optimizer.split("@")[1:]:
        if option.startswith("lr="):
            return option[3:]
    if lr is None or is_learned(optimizer):
        return "default"
    return f"{lr:.3g}"


def is_learned(optimizer: str) -> bool:
    """Whether a suite optimizer name is a learned optimizer (``lstm-gac``, ``ntm-bfgs:…@…``)."""
    name = optimizer.split("@")[0].partition(":")[0]
    return name in registry.available() and registry.info(name).lr_grid == (1.0,)


def suite_optimizers(names: Iterable[str]) -> dict[str, OptimizerSpec]:
    """Specs by name: ``sgd``, ``nag``, ``rmsprop``, ``adam``, ``adamw`` (tuned), ``adam-1e-3``
    (untuned), and learned optimizers (see :func:`learned_spec`)."""
    builtin = {**baselines(),
               "adamw": OptimizerSpec("adamw", lambda p, lr, t: torch.optim.AdamW(p, lr=lr)),
               UNTUNED: OptimizerSpec(UNTUNED, lambda p, lr, t: torch.optim.Adam(p, lr=1e-3), (1e-3,))}
    return {n: builtin[n] if n in builtin else learned_spec(n) for n in names}


def is_tuned(name: str) -> bool:
    return name in TUNE_WINDOWS


# ---------------------------------------------------------------------------------- metrics

def final_loss(curve: Tensor | Sequence[float], fraction: float = FINAL_FRACTION) -> float:
    """Mean of the last ``fraction`` of a run's losses (at least one); inf if any is not finite."""
    values = torch.as_tensor(curve, dtype=torch.float64)
    tail = values[-max(1, round(fraction * len(values))):]
    return float(tail.mean()) if bool(torch.isfinite(tail).all()) else math.inf


def diverged(curve: Tensor | Sequence[float], fraction: float = FINAL_FRACTION) -> bool:
    """A run diverged if a loss went non-finite or it ended (final loss) above its initial loss."""
    values = torch.as_tensor(curve, dtype=torch.float64)
    return not bool(torch.isfinite(values).all()) or final_loss(values, fraction) > float(values[0])


def steps_to_reach(reference: Tensor | Sequence[float], target: float, window: int) -> int | None:
    """The first step t (1-based) at which the trailing mean of ``reference`` over ``window``
    steps (fewer at the start) is at most ``target``; None if it never is."""
    values = torch.as_tensor(reference, dtype=torch.float64)
    if not math.isfinite(target):
        return None
    sums = torch.cumsum(torch.nan_to_num(values, nan=math.inf, posinf=math.inf), 0)
    for t in range(len(values)):
        lo = max(0, t + 1 - window)
        mean = (sums[t] - (sums[lo - 1] if lo else 0.0)) / (t + 1 - lo)
        if mean <= target:
            return t + 1
    return None


def median_curve(curves: Tensor) -> Tensor:
    """Per-step median over seeds (rows), a diverged seed counting as inf."""
    filled = torch.where(torch.isfinite(curves), curves, torch.full_like(curves, math.inf))
    return torch.tensor([quantile(col.tolist(), 0.5) for col in filled.T], dtype=torch.float64)


def speedup(reference_curves: Tensor, final: float, steps: int) -> tuple[float, bool]:
    """(speedup, reached): tuned Adam's steps to reach ``final`` (its median curve smoothed over
    the final-loss window) over ``steps``. Not reached: (its steps / ``steps``, False), a lower bound."""
    reference = median_curve(reference_curves)
    window = max(1, round(FINAL_FRACTION * len(reference)))
    needed = steps_to_reach(reference, final, window)
    if needed is None:
        return len(reference) / steps, False
    return needed / steps, True


@dataclass
class SuiteResult:
    """One optimizer on one task: its lr (None: default settings), curves and step times."""

    task: str
    optimizer: str
    lr: float | None
    curves: Tensor  # seeds × steps
    step_ms: float  # median over seeds of the wall time of a whole training step
    opt_step_ms: float  # … of optimizer.step() alone
    seconds: float = 0.0
    seeds: list[int] = field(default_factory=list)

    @property
    def finals(self) -> list[float]:
        return [final_loss(c) for c in self.curves]

    @property
    def median(self) -> float:
        return quantile(self.finals, 0.5)

    @property
    def iqr(self) -> tuple[float, float]:
        return quantile(self.finals, 0.25), quantile(self.finals, 0.75)

    @property
    def diverged(self) -> int:
        return sum(diverged(c) for c in self.curves)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "optimizer": self.optimizer, "lr": self.lr, "median": self.median,
                "q25": self.iqr[0], "q75": self.iqr[1], "diverged": self.diverged, "finals": self.finals,
                "seeds": self.seeds, "step_ms": self.step_ms, "opt_step_ms": self.opt_step_ms,
                "seconds": self.seconds, "median_curve": median_curve(self.curves).tolist(),
                "curves": self.curves.tolist()}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> SuiteResult:
        """The result a :meth:`to_json` record holds (curves included)."""
        return cls(record["task"], record["optimizer"], record["lr"],
                   torch.tensor(record["curves"], dtype=torch.float64), record["step_ms"], record["opt_step_ms"],
                   record["seconds"], list(record["seeds"]))


# ---------------------------------------------------------------------------------- tuning

_CONTEXT: dict[str, Any] = {}  # what forked workers read (closures cannot be pickled)


def tune(family: TaskFamily, spec: OptimizerSpec, seeds: Sequence[int], steps: int,
         window: tuple[float, float], grid: Sequence[float] | None = None) -> tuple[float, dict[float, float]]:
    """The half-decade-grid lr with the lowest median final loss over ``seeds``.

    Starts with the grid points in ``window`` and adds the next point beyond an edge while
    the best rate is on that edge (and the grid goes further), so the optimum is interior
    unless the grid ends. A run that diverged scores inf.
    """
    grid = sorted(grid if grid is not None else half_decade_grid(1e-6, 10.0))
    inside = [i for i, lr in enumerate(grid) if window[0] * 0.99 <= lr <= window[1] * 1.01]
    if not inside:
        raise ValueError(f"tuning window {window} holds no point of the grid")
    scores: dict[float, float] = {}

    def score(i: int) -> float:
        lr = grid[i]
        if lr not in scores:
            finals = []
            for s in seeds:
                curve = run_seed(family, spec, lr, s, steps)
                finals.append(math.inf if diverged(curve) else final_loss(curve))
            scores[lr] = quantile(finals, 0.5)
        return scores[lr]

    lo, hi = inside[0], inside[-1]
    for i in range(lo, hi + 1):
        score(i)
    while True:
        best = min(range(lo, hi + 1), key=lambda i: (score(i), -grid[i]))
        if best == lo and lo > 0 and math.isfinite(score(lo)):
            lo -= 1
            score(lo)
        elif best == hi and hi < len(grid) - 1:
            hi += 1
            score(hi)
        else:
            break
    best = min(range(lo, hi + 1), key=lambda i: (score(i), -grid[i]))
    return grid[best], dict(sorted(scores.items()))


def _tune_job(task_name: str, opt_name: str) -> tuple[str, str, float, dict[float, float], float]:
    torch.set_num_threads(_CONTEXT["threads"])
    suite_task, family = _CONTEXT["tasks"][task_name]
    start = time.perf_counter()
    lr, scores = tune(family, _CONTEXT["optimizers"][opt_name], _CONTEXT["seeds"], suite_task.steps,
                      TUNE_WINDOWS[opt_name])
    return task_name, opt_name, lr, scores, time.perf_counter() - start


def tune_suite(tasks: dict[str, tuple[SuiteTask, TaskFamily]], optimizers: Sequence[str],
               seeds: Sequence[int] = TUNE_SEEDS, jobs: int = 1,
               log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Tune the baselines ``optimizers`` on every task; {task: {definition, optimizer: {lr, scores}}}."""
    overlap = set(seeds) & set(EVAL_SEEDS)
    if overlap:
        raise ValueError(f"tuning seeds overlap the evaluation seeds: {sorted(overlap)}")
    names = [o for o in optimizers if is_tuned(o)]
    _CONTEXT.update(tasks=tasks, optimizers=suite_optimizers(names), seeds=list(seeds),
                    threads=1 if jobs > 1 else torch.get_num_threads())
    tuned: dict[str, dict[str, Any]] = {t: {"definition": tasks[t][0].definition(tasks[t][1])} for t in tasks}
    try:
        jobs_list = [(t, o) for t in tasks for o in names]
        for task_name, opt_name, lr, scores, seconds in forked_map(_tune_job, jobs_list, jobs):
            tuned[task_name][opt_name] = {"lr": lr, "scores": {f"{k:.3g}": v for k, v in scores.items()},
                                          "seconds": round(seconds, 1)}
            if log is not None:
                log(f"tuned {opt_name:>8} on {task_name:<16} lr {lr:.3g}  ({seconds:.0f} s)")
    finally:
        _CONTEXT.clear()
    return tuned


def save_tuned(path: str | os.PathLike, tuned: dict[str, dict[str, Any]], command: str,
               previous: dict[str, Any] | None = None) -> Path:
    """Write tuned rates (merged over ``previous``'s tasks) with the command that made them."""
    out = Path(path)
    tasks = dict(previous["tasks"]) if previous else {}
    tasks.update(tuned)
    payload = {"about": "learning rates of the suite's baselines, tuned on seeds "
                        f"{list(TUNE_SEEDS)} (never the evaluation seeds); benchmarks/suite.py --retune remakes them",
               "command": command, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "python": platform.python_version(), "cpu_threads": torch.get_num_threads(), "tasks": tasks}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return out


def load_tuned(path: str | os.PathLike, tasks: dict[str, tuple[SuiteTask, TaskFamily]],
               optimizers: Sequence[str]) -> dict[str, dict[str, float]]:
    """{task: {optimizer: lr}} from a stored tuning file; refuses by name a task or optimizer it
    lacks, or a task whose definition changed since (retune then)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tuned learning rates at {path}; run benchmarks/suite.py --retune")
    stored = json.loads(path.read_text())["tasks"]
    lrs: dict[str, dict[str, float]] = {}
    for name, (suite_task, family) in tasks.items():
        entry = stored.get(name)
        if entry is None:
            raise ValueError(f"{path} has no tuned rates for task {name!r}; run with --retune")
        now = json.loads(json.dumps(suite_task.definition(family)))
        if entry["definition"] != now:
            raise ValueError(f"{path}: task {name!r} changed since it was tuned "
                             f"({entry['definition']} -> {now}); run with --retune")
        lrs[name] = {}
        for opt in optimizers:
            if is_tuned(opt):
                if opt not in entry:
                    raise ValueError(f"{path} has no tuned rate of {opt!r} on task {name!r}; run with --retune")
                lrs[name][opt] = entry[opt]["lr"]
    return lrs


# ---------------------------------------------------------------------------------- evaluation

def _evaluate_job(task_name: str, opt_name: str) -> SuiteResult:
    torch.set_num_threads(_CONTEXT["threads"])
    suite_task, family = _CONTEXT["tasks"][task_name]
    spec = _CONTEXT["optimizers"][opt_name]
    lr = _CONTEXT["lrs"].get(task_name, {}).get(opt_name)
    start = time.perf_counter()
    curves, step_ms, opt_ms = [], [], []
    for seed in _CONTEXT["seeds"]:
        timing: dict[str, float] = {}
        curves.append(run_seed(family, spec, lr if lr is not None else 1.0, seed, suite_task.steps, timing))
        if timing["steps"]:
            step_ms.append(1e3 * timing["seconds"] / timing["steps"])
            opt_ms.append(1e3 * timing["step_seconds"] / timing["steps"])
    shown_lr = lr if is_tuned(opt_name) else (1e-3 if opt_name == UNTUNED else None)
    return SuiteResult(task_name, opt_name, shown_lr, torch.stack(curves),
                       statistics.median(step_ms) if step_ms else math.nan,
                       statistics.median(opt_ms) if opt_ms else math.nan,
                       time.perf_counter() - start, list(_CONTEXT["seeds"]))


def evaluate_suite(tasks: dict[str, tuple[SuiteTask, TaskFamily]], optimizers: Sequence[str],
                   lrs: dict[str, dict[str, float]], seeds: Sequence[int] = EVAL_SEEDS, jobs: int = 1,
                   log: Callable[[str], None] | None = None,
                   reuse: Sequence[SuiteResult] = ()) -> list[SuiteResult]:
    """Run every optimizer on every task's evaluation ``seeds`` (baselines at their tuned lr).

    ``reuse``: earlier results; a (task, optimizer) pair found there with the same seeds (and,
    for a baseline, the same lr) is taken from it instead of run again."""
    _CONTEXT.update(tasks=tasks, optimizers=suite_optimizers(optimizers), lrs=lrs, seeds=list(seeds),
                    threads=1 if jobs > 1 else torch.get_num_threads())
    kept = {}
    for r in reuse:
        lr = lrs.get(r.task, {}).get(r.optimizer)
        if r.seeds == list(seeds) and (lr is None or r.lr == lr) and r.task in tasks and r.optimizer in optimizers:
            kept[(r.task, r.optimizer)] = r
    results = list(kept.values())
    try:
        pairs = [(t, o) for t in tasks for o in optimizers if (t, o) not in kept]
        # longest jobs first, so the workers finish together
        pairs.sort(key=lambda p: -tasks[p[0]][0].steps * (4 if not is_tuned(p[1]) and p[1] != UNTUNED else 1))
        for result in forked_map(_evaluate_job, pairs, jobs):
            results.append(result)
            if log is not None:
                log(f"{result.task:<16} {result.optimizer:>28}  median {result.median:.4g}  diverged "
                    f"{result.diverged}/{len(result.finals)}  {result.step_ms:.1f} ms/step  ({result.seconds:.0f} s)")
    finally:
        _CONTEXT.clear()
    order = {(t, o): i for i, (t, o) in enumerate((t, o) for t in tasks for o in optimizers)}
    return sorted(results, key=lambda r: order[(r.task, r.optimizer)])


# ---------------------------------------------------------------------------------- reports

def summarize(results: Sequence[SuiteResult], reference: str = "adam") -> dict[str, dict[str, Any]]:
    """Per optimizer: per-task ratio to ``reference`` (tuned Adam) and speedup, and the summary:
    geometric-mean ratio, tasks beaten (median below the reference's), total divergences."""
    by_key = {(r.task, r.optimizer): r for r in results}
    tasks = list(dict.fromkeys(r.task for r in results))
    summary: dict[str, dict[str, Any]] = {}
    for opt in dict.fromkeys(r.optimizer for r in results):
        per_task, logs, beaten, divergences = {}, [], 0, 0
        for task in tasks:
            r, ref = by_key.get((task, opt)), by_key.get((task, reference))
            if r is None:
                continue
            divergences += r.diverged
            entry: dict[str, Any] = {"median": r.median, "diverged": r.diverged, "step_ms": r.step_ms,
                                     "opt_step_ms": r.opt_step_ms}
            if ref is not None:
                ratio = r.median / ref.median if ref.median > 0 else math.inf
                entry["ratio"] = ratio
                entry["speedup"], entry["reached"] = speedup(ref.curves, r.median, r.curves.shape[1])
                entry["step_time_ratio"] = r.step_ms / ref.step_ms
                logs.append(math.log(ratio) if 0 < ratio < math.inf else math.inf)
                beaten += r.median < ref.median
            per_task[task] = entry
        geomean = math.exp(sum(logs) / len(logs)) if logs and all(math.isfinite(v) for v in logs) else math.inf
        summary[opt] = {"tasks": per_task, "geomean_ratio": geomean if logs else math.nan,
                        "beaten": beaten, "compared": len(logs), "divergences": divergences,
                        "runs": sum(len(by_key[(t, opt)].finals) for t in tasks if (t, opt) in by_key)}
    return summary


def _fmt(value: float, digits: int = 3) -> str:
    return "inf" if value == math.inf else "nan" if math.isnan(value) else f"{value:.{digits}g}"


def format_report(results: Sequence[SuiteResult], reference: str = "adam") -> str:
    """Markdown: the summary per optimizer, the ratio matrix, then a table per task."""
    summary = summarize(results, reference)
    tasks = list(dict.fromkeys(r.task for r in results))
    lines = [f"| optimizer | geo-mean ratio to tuned {reference} | tasks beaten | diverged runs |",
             "| --- | ---: | ---: | ---: |"]
    for opt, s in summary.items():
        lines.append(f"| {opt} | {_fmt(s['geomean_ratio'])} | {s['beaten']}/{s['compared']} | "
                     f"{s['divergences']}/{s['runs']} |")
    lines += ["", f"Median final loss / tuned {reference}'s (diverged seeds in brackets when any):", "",
              "| optimizer | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for opt, s in summary.items():
        cells = []
        for task in tasks:
            entry = s["tasks"].get(task)
            if entry is None:
                cells.append("")
                continue
            cell = _fmt(entry.get("ratio", math.nan), 3)
            cells.append(cell + (f" ({entry['diverged']})" if entry["diverged"] else ""))
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    for task in tasks:
        lines += ["", f"**{task}**", "",
                  "| optimizer | lr | median final loss | IQR | ratio to tuned adam | speedup | diverged | "
                  "ms/step (× adam) | ms in step() |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        rows = sorted((r for r in results if r.task == task), key=lambda r: r.median)
        for r in rows:
            entry = summary[r.optimizer]["tasks"][task]
            lr = lr_label(r.optimizer, r.lr)
            if "ratio" in entry:
                ratio = _fmt(entry["ratio"])
                fast = (("" if entry["reached"] else "> ") + f"{entry['speedup']:.2f}") if math.isfinite(r.median) else "–"
                timing = f"{r.step_ms:.1f} (×{entry['step_time_ratio']:.2f})"
            else:
                ratio, fast, timing = "", "", f"{r.step_ms:.1f}"
            q25, q75 = r.iqr
            lines.append(f"| {r.optimizer} | {lr} | {_fmt(r.median, 4)} | {_fmt(q25, 4)} – {_fmt(q75, 4)} | {ratio} | "
                         f"{fast} | {r.diverged}/{len(r.finals)} | {timing} | {r.opt_step_ms:.2f} |")
    return "\n".join(lines)


def plot_suite(results: Sequence[SuiteResult], path: str | os.PathLike, columns: int = 3) -> Path:
    """Median loss against step (log scale) with an IQR band, one panel per task (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'learned_optim[plot]'") from error
    from .benchmark import BenchmarkResult, plot_median_band

    tasks = list(dict.fromkeys(r.task for r in results))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.9 * rows), squeeze=False)
    names = list(dict.fromkeys(r.optimizer for r in results))
    colors = {n: plt.get_cmap("tab20" if len(names) > 10 else "tab10")(i) for i, n in enumerate(names)}
    for ax, task in zip(axes.flat, tasks):
        panel = [r for r in results if r.task == task]
        for r in panel:
            learned = r.lr is None
            ax.set_prop_cycle(color=[colors[r.optimizer]])
            plot_median_band(ax, BenchmarkResult(task, r.optimizer, r.lr or 1.0, r.curves), r.optimizer,
                             highlight=learned)
        finite = [v for r in panel for v in median_curve(r.curves).tolist() if 0 < v < math.inf]
        start = max(float(median_curve(r.curves)[0]) for r in panel)
        if finite:  # diverged runs would stretch the axis over twenty decades
            ax.set_ylim(min(finite) * 0.7, start * 3)
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (median, IQR)")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows: float rounding
    can differ between CPUs, and long chaotic runs turn that into other final losses."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment() -> str:
    """The software and the machine a report's numbers came from."""
    return f"torch {torch.__version__}, Python {platform.python_version()}, {sys.platform}, {cpu_model()}"
