"""Does ConjugateMomentumSGD make the loss per example processed independent of the batch size?

McAllester's conjugate hyperparameters (η', N'_g) are given for batch size 1; at batch size B
the optimizer runs momentum SGD with N_g = max(1, N'_g/B) and η = B·η'/N_g. If the
conjugacy holds, runs at B ∈ {8, 32, 128, 512} with the *same* (η', N'_g) trace the same
loss-vs-examples curve, while torch.optim.SGD at a fixed (lr, momentum) does not (it takes B
times fewer steps of the same size at batch size B). The notes' derivation assumes the
gradient at consecutive steps is about the same, so it must fail once a step B·η' is too
large for the curvature; with η' tuned for small batches that is expected around the
gradient noise scale B_noise = tr Σ / |g|² (McCandlish et al. 2018). The script measures
B_noise and the sharpness λ_max along the B = 8 trajectory to see where the conjugacy stops.

Protocol, for each task (noisy least squares, synthetic-data MLP):

1. Tune (η', N'_g) at B = 8 on a separate seed with half the budget (grid below, with
   N'_g ≥ max B so that N_g = N'_g/B is never clamped to 1). torch.optim.SGD gets the same
   point written as (lr, momentum) = (8η'/N_g, 1 − 1/N_g): at B = 8 the two are one algorithm
   (tests/test_conjugate.py checks it step by step), so a search over that grid in (lr,
   momentum) would pick the same point. Both start from the same B = 8 run; only the
   batch-size rule differs.
2. Run every B with the same budget of examples on several seeds; evaluate the full loss
   (closed-form expected excess loss for least squares, full-data loss for the MLP) at
   log-spaced checkpoints; compare medians across seeds with the B = 8 run.

Usage: ``python benchmarks/conjugacy.py --out results/conjugacy [--plot]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from learned_optim import ConjugateMomentumSGD
from learned_optim.tasks import Task, TaskFamily, get_family

BATCH_SIZES = (8, 32, 128, 512)
REFERENCE_B = 8
DIVERGED = 100.0  # a run whose loss exceeds this multiple of its initial loss has diverged
# Conjugacy "holds" at B when the loss-vs-examples curve stays within 20% of the B = 8 one on
# (geometric) average over the checkpoints past budget/64 (see curve_comparison). The final
# loss alone is too noisy for a verdict at a few seeds (the "seed spread" column shows it).
CURVE_TOLERANCE = 0.20
HORIZON_GRID = (512.0, 2048.0)  # N'_g ≥ 512 = max B keeps N_g = N'_g/B unclamped
PROBE_ITERATIONS = 30  # power iterations for λ_max


@dataclass(frozen=True)
class TaskSetup:
    """A task family of the library, the budget it is trained for and its η' search grid."""

    name: str
    budget: int  # examples processed per run, the same for every B
    metric: str  # what the reported loss is
    ylabel: str  # its short name
    lr_grid: tuple[float, ...]  # η' searched at B = 8 (with HORIZON_GRID)


TASKS = (
    TaskSetup("noisy-least-squares", 2**16, "expected excess loss E[loss] − noise²/2 (closed form)",
              "expected excess loss", (0.001, 0.003, 0.01, 0.03)),
    TaskSetup("mlp", 2**16, "full-data cross-entropy (4096 examples)", "full-data loss",
              (0.003, 0.01, 0.03, 0.1)),
)


@dataclass(frozen=True)
class Job:
    """One training run: a task seed trained by one optimizer at one batch size."""

    task: str
    optimizer: str  # "conjugate" or "sgd"
    hparams: tuple[tuple[str, float], ...]
    batch_size: int
    seed: int
    budget: int
    probe: bool = False  # also measure B_noise and λ_max at the checkpoints


# --------------------------------------------------------------------------------------
# Optimizers: one factory each, (params, batch size) -> optimizer.
# --------------------------------------------------------------------------------------


def make_conjugate(params: list[Tensor], batch_size: int, *, lr: float, momentum_horizon: float):
    """ConjugateMomentumSGD at (η', N'_g); the batch size enters the derived (η, N_g)."""
    return ConjugateMomentumSGD(params, lr=lr, momentum_horizon=momentum_horizon,
                                batch_size=batch_size, check_finite=False)


def make_sgd(params: list[Tensor], batch_size: int, *, lr: float, momentum: float):
    """torch.optim.SGD at a fixed (lr, momentum): the batch size is ignored on purpose."""
    del batch_size
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {"conjugate": make_conjugate, "sgd": make_sgd}


def sgd_equivalent(lr: float, momentum_horizon: float, batch_size: int = REFERENCE_B) -> dict[str, float]:
    """torch SGD's (lr, momentum) that equal ConjugateMomentumSGD(η', N'_g) at ``batch_size``."""
    n_g = max(1.0, momentum_horizon / batch_size)
    return {"lr": batch_size * lr / n_g, "momentum": 1.0 - 1.0 / n_g}


def largest_stable_batch(lr: float, momentum_horizon: float, curvature: float) -> float:
    """The largest B at which ConjugateMomentumSGD(η', N'_g) is stable on a quadratic of
    curvature λ: heavy-ball momentum needs η·λ < 2(1 + β), here (B²η'/N'_g)·λ < 2(2 − B/N'_g)
    while B < N'_g, and B·η'·λ < 2 once N_g clamps to 1."""
    x = lr * curvature
    below = (math.sqrt(1.0 + 4.0 * x * momentum_horizon) - 1.0) / x
    return below if below < momentum_horizon else 2.0 / x


# --------------------------------------------------------------------------------------
# Measurements: loss, gradient noise scale, sharpness.
# --------------------------------------------------------------------------------------


def make_evaluator(family: TaskFamily, task: Task) -> Callable[[Sequence[Tensor]], Tensor]:
    """The reported (differentiable) loss of a parameter list.

    Least squares: the expected excess loss ½(θ − w*)ᵀΛ(θ − w*), Λ = diag(scales²), i.e. the
    expected loss over fresh examples minus its floor noise²/2. MLP: the full-data loss.
    """
    if "w_star" in task.info:
        w_star, spectrum = task.info["w_star"], family.scales.square()
        return lambda ps: 0.5 * (spectrum * (ps[0] - w_star).square()).sum()
    return lambda ps: task.loss(ps, None)


def noise_batch(family: TaskFamily, task: Task) -> tuple[tuple[Tensor, ...], bool]:
    """Examples to measure per-example gradients on, and whether they are the whole population.

    The MLP's minibatches are drawn from a finite set, so the full set gives exact moments;
    least squares draws fresh examples, so a large held-out sample gives unbiased estimates.
    """
    data = getattr(family, "data", None)
    if data is not None:
        return (data.inputs, data.labels), True
    return tuple(task.sample_batch(task.batch_generator(stream=1), 2**14)), False


def per_example_gradients(task: Task, params: Sequence[Tensor], batch: tuple[Tensor, ...]) -> Tensor:
    """Per-example gradients of ``task.loss`` (n × number of parameters), by vmap of grad."""

    def example_loss(ps: list[Tensor], *example: Tensor) -> Tensor:
        return task.loss(ps, tuple(e.unsqueeze(0) for e in example))

    in_dims = (None,) + (0,) * len(batch)
    grads = vmap(grad(example_loss), in_dims=in_dims)([p.detach() for p in params], *batch)
    n = batch[0].shape[0]
    return torch.cat([g.reshape(n, -1) for g in grads], dim=1)


def noise_scale(per_example: Tensor, population: bool) -> float:
    """B_noise = tr Σ / |g|² from per-example gradients (rows).

    With ``population`` the rows are every example (exact); otherwise they are a sample and
    tr Σ and |g|² are bias-corrected (|ḡ|² overestimates |g|² by tr Σ / n).
    """
    n = per_example.shape[0]
    mean = per_example.mean(0)
    tr_sigma = (per_example - mean).square().sum(1).mean()
    signal = mean.square().sum()
    if not population:
        tr_sigma = tr_sigma * n / (n - 1)
        signal = signal - tr_sigma / n
    return float(tr_sigma / signal) if signal > 0 else math.inf


def sharpness(loss_fn: Callable[[Sequence[Tensor]], Tensor], params: Sequence[Tensor],
              iters: int = PROBE_ITERATIONS) -> float:
    """λ_max of the Hessian of ``loss_fn``: power iteration on Hessian-vector products (the
    Rayleigh quotient, so a slight underestimate when the top eigenvalues are close)."""
    ps = [p.detach().clone().requires_grad_() for p in params]
    grads = torch.autograd.grad(loss_fn(ps), ps, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]
    eigenvalue = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float(x.square().sum()) for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, ps, v, retain_graph=True)
        eigenvalue = sum(float((h * x).sum()) for h, x in zip(hv, v))
        v = [h.detach() for h in hv]
    return eigenvalue


# --------------------------------------------------------------------------------------
# Training: one loop for every optimizer.
# --------------------------------------------------------------------------------------


def checkpoint_grid(budget: int) -> list[int]:
    """Examples processed at which runs are evaluated: 0 and 2^k, 1.5·2^k from 8 to ``budget``."""
    points = {0}
    k = 8
    while k <= budget:
        points.update({k, 3 * k // 2} if 3 * k // 2 <= budget else {k})
        k *= 2
    return sorted(points)


def train(
    task: Task,
    make_optimizer: Callable[[list[Tensor], int], torch.optim.Optimizer],
    batch_size: int,
    budget: int,
    evaluate: Callable[[Sequence[Tensor]], Tensor],
    probe: Callable[[Sequence[Tensor]], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train ``task`` for ``budget`` examples at ``batch_size``; evaluate at the checkpoints.

    Returns the checkpoints (examples processed), the loss there (inf once diverged) and,
    with ``probe``, its measurements at the checkpoints that are 0 or a power of two.
    """
    params = task.init_params()
    optimizer = make_optimizer(params, batch_size)
    generator = task.batch_generator()
    checkpoints = [c for c in checkpoint_grid(budget) if c % batch_size == 0]
    record: dict[str, Any] = {"examples": checkpoints, "loss": [], "probe": [], "diverged": False}

    def measure() -> bool:
        with torch.no_grad():
            value = float(evaluate(params))
        initial = record["loss"][0] if record["loss"] else value
        ok = math.isfinite(value) and value <= DIVERGED * initial
        record["loss"].append(value if ok else math.inf)
        examples = checkpoints[len(record["loss"]) - 1]
        if probe is not None and ok and examples & (examples - 1) == 0:
            record["probe"].append({"examples": examples, **probe(params)})
        return ok

    measure()
    for step in range(1, budget // batch_size + 1):
        batch = task.sample_batch(generator, batch_size)
        optimizer.zero_grad()
        task.loss(params, batch).backward()
        optimizer.step()
        if step * batch_size in checkpoints and not measure():
            record["diverged"] = True
            record["loss"] += [math.inf] * (len(checkpoints) - len(record["loss"]))
            break
    return record


def run_job(job: Job) -> dict[str, Any]:
    """Build the job's task, optimizer factory and measurements, and train (worker entry)."""
    torch.set_num_threads(1)
    family = get_family(job.task, batch_size=job.batch_size)
    task = family.sample(job.seed)
    evaluate = make_evaluator(family, task)
    probe = None
    if job.probe:
        examples, population = noise_batch(family, task)

        def probe(params: Sequence[Tensor]) -> dict[str, float]:
            b_noise = noise_scale(per_example_gradients(task, params, examples), population)
            return {"b_noise": b_noise, "sharpness": sharpness(evaluate, params)}

    factory = functools.partial(FACTORIES[job.optimizer], **dict(job.hparams))
    return train(task, factory, job.batch_size, job.budget, evaluate, probe)


def run_all(jobs: list[Job], pool: Executor | None) -> list[dict[str, Any]]:
    """Run jobs on ``pool`` (in this process if None), longest first; results in jobs' order."""
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].budget / jobs[i].batch_size)
    if pool is None:
        results = {i: run_job(jobs[i]) for i in order}
    else:
        futures = {i: pool.submit(run_job, jobs[i]) for i in order}
        results = {i: f.result() for i, f in futures.items()}
    return [results[i] for i in range(len(jobs))]


# --------------------------------------------------------------------------------------
# Protocol: tune at B = 8, run every B, summarize.
# --------------------------------------------------------------------------------------


def tune(setup: TaskSetup, seed: int, pool: Executor | None) -> tuple[dict[str, float], list[dict]]:
    """The (η', N'_g) of the grid with the lowest final loss at B = 8 on ``seed``, half budget."""
    grid = [{"lr": lr, "momentum_horizon": h} for lr in setup.lr_grid for h in HORIZON_GRID]
    jobs = [Job(setup.name, "conjugate", tuple(hp.items()), REFERENCE_B, seed, setup.budget // 2)
            for hp in grid]
    finals = [r["loss"][-1] for r in run_all(jobs, pool)]
    table = [{**hp, "final_loss": f} for hp, f in zip(grid, finals)]
    return grid[min(range(len(grid)), key=finals.__getitem__)], table


def median_curve(records: list[dict[str, Any]]) -> list[float]:
    """Pointwise median over seeds of the loss curves (same checkpoints)."""
    return [statistics.median(values) for values in zip(*(r["loss"] for r in records))]


def curve_comparison(examples: list[int], curve: list[float], ref_examples: list[int],
                     ref_curve: list[float], start: int) -> tuple[float, float]:
    """(deviation, mean ratio) of a loss-vs-examples curve to the reference over the shared
    checkpoints ≥ ``start``: exp(mean |log L/L_ref|) − 1, the typical relative gap, and
    exp(mean log L/L_ref), which says whether the curve lies above (> 1) or below."""
    ref = dict(zip(ref_examples, ref_curve))
    logs = [math.log(value / ref[c]) if math.isfinite(value) else math.inf
            for c, value in zip(examples, curve) if c >= start and c in ref]
    if not logs:
        return math.nan, math.nan
    if not all(math.isfinite(x) for x in logs):
        return math.inf, math.inf
    return math.exp(sum(map(abs, logs)) / len(logs)) - 1.0, math.exp(sum(logs) / len(logs))


def seed_spread(records: list[dict[str, Any]]) -> float:
    """(max − min) / median of the final losses over seeds: the noise on a final-loss ratio."""
    finals = [r["loss"][-1] for r in records]
    median = statistics.median(finals)
    return (max(finals) - min(finals)) / median if math.isfinite(median) and median > 0 else math.nan


def noise_profile(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Median over seeds of loss, B_noise and λ_max at each probed checkpoint."""
    rows = []
    for i, first in enumerate(records[0]["probe"]):
        if any(i >= len(r["probe"]) for r in records):
            break
        examples = first["examples"]
        rows.append({
            "examples": examples,
            "loss": statistics.median(r["loss"][r["examples"].index(examples)] for r in records),
            "b_noise": statistics.median(r["probe"][i]["b_noise"] for r in records),
            "sharpness": statistics.median(r["probe"][i]["sharpness"] for r in records),
        })
    return rows


def below_noise_from(batch_size: int, profile: list[dict[str, float]]) -> int | None:
    """The first checkpoint from which B_noise stays ≥ ``batch_size`` (None if it never does)."""
    for row in profile:
        if all(later["b_noise"] >= batch_size for later in profile if later["examples"] >= row["examples"]):
            return row["examples"]
    return None


def summarize(setup: TaskSetup, tuned: dict[str, float], runs: dict[tuple[str, int], list[dict]]) -> dict:
    """Per optimizer and B: median final loss, ratio and curve deviation to B = 8, verdict."""
    profile = noise_profile(runs[("conjugate", REFERENCE_B)])
    start = setup.budget // 64  # past the first ~1.5% of the budget (momentum warm-up)
    max_sharpness = max(row["sharpness"] for row in profile)
    rows = []
    for optimizer in FACTORIES:
        ref = runs[(optimizer, REFERENCE_B)]
        ref_examples, ref_curve = ref[0]["examples"], median_curve(ref)
        for b in BATCH_SIZES:
            records = runs[(optimizer, b)]
            curve = median_curve(records)
            ratio = curve[-1] / ref_curve[-1]
            deviation, mean_ratio = curve_comparison(records[0]["examples"], curve, ref_examples,
                                                     ref_curve, start)
            hparams = (sgd_equivalent(tuned["lr"], tuned["momentum_horizon"], b)
                       if optimizer == "conjugate" else sgd_equivalent(**tuned))
            n_g = 1.0 / (1.0 - hparams["momentum"])
            rows.append({
                "optimizer": optimizer,
                "batch_size": b,
                "steps": setup.budget // b,
                "step_lr": hparams["lr"],
                "step_momentum": hparams["momentum"],
                "final_loss": curve[-1],
                "ratio_to_b8": ratio,
                "seed_spread": seed_spread(records),
                "curve_deviation": deviation,
                "curve_mean_ratio": mean_ratio,
                "diverged_seeds": sum(r["diverged"] for r in records),
                "holds": deviation <= CURVE_TOLERANCE,
                # Zero-started momentum lags gradient flow by (N_g − 1) steps of B examples.
                "momentum_lag_examples": (n_g - 1.0) * b,
                # Share of the heavy-ball stability limit η·λ_max < 2(1 + β) a step uses.
                "stability_use": hparams["lr"] * max_sharpness / (2.0 * (1.0 + hparams["momentum"])),
                "below_noise_from": below_noise_from(b, profile),
                "examples": records[0]["examples"],
                "curve": curve,
            })
    return {"task": setup.name, "metric": setup.metric, "ylabel": setup.ylabel, "budget": setup.budget,
            "tuned": tuned, "sgd": sgd_equivalent(**tuned), "rows": rows, "noise_profile": profile}


def evaluate_task(setup: TaskSetup, seeds: Sequence[int], tune_seed: int, pool: Executor | None) -> dict:
    """Tune at B = 8, run both optimizers at every B on every seed, and summarize."""
    tuned, search = tune(setup, tune_seed, pool)
    settings = {"conjugate": tuned, "sgd": sgd_equivalent(**tuned)}
    jobs = [Job(setup.name, opt, tuple(settings[opt].items()), b, seed, setup.budget,
                probe=(opt == "conjugate" and b == REFERENCE_B))
            for opt in FACTORIES for b in BATCH_SIZES for seed in seeds]
    records = run_all(jobs, pool)
    runs: dict[tuple[str, int], list[dict]] = {}
    for job, record in zip(jobs, records):
        runs.setdefault((job.optimizer, job.batch_size), []).append(record)
    summary = summarize(setup, tuned, runs)
    summary["search"] = search
    return summary


# --------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3g") -> str:
    """A number for the report: 'never' for None, 'diverged' for +inf."""
    if x is None:
        return "never"
    return format(x, spec) if math.isfinite(x) else "diverged" if x > 0 else str(x)


COLUMNS = (
    "Columns: *step lr / momentum*: what the optimizer runs at this B; *seed spread*: "
    "(max − min)/median of the final losses over seeds; *curve dev.*: exp(mean |log L_B/L_8|) − 1 "
    "over the checkpoints ≥ budget/64; *mean L_B/L_8*: exp(mean log L_B/L_8) (< 1: ahead of "
    f"B = 8); *holds*: curve dev. ≤ {CURVE_TOLERANCE:.0%}; *lag*: (N_g − 1)·B, the examples a "
    "zero-started momentum buffer lags behind; *stab.*: lr·λ_max / 2(1 + momentum) with λ_max "
    "the largest Hessian eigenvalue seen on the B = 8 trajectory (≥ 1: the sharpest direction "
    "is unstable); *B ≤ B_noise from*: examples after which the B = 8 trajectory's gradient "
    "noise scale stays above B."
)


def main_table(summaries: list[dict]) -> list[str]:
    """The markdown table: one row per task, optimizer and B."""
    out = [
        "| task | optimizer | B | steps | step lr | momentum | final loss (median) | seed spread "
        "| ratio to B=8 | curve dev. | mean L_B/L_8 | holds | lag | stab. | B ≤ B_noise from |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|",
    ]
    for s in summaries:
        for r in s["rows"]:
            div = f" ({r['diverged_seeds']} diverged)" if r["diverged_seeds"] else ""
            out.append(
                f"| {s['task']} | {r['optimizer']} | {r['batch_size']} | {r['steps']} | "
                f"{r['step_lr']:.4g} | {r['step_momentum']:.4g} | {_fmt(r['final_loss'], '.4g')}{div} | "
                f"{_fmt(r['seed_spread'], '.0%')} | {_fmt(r['ratio_to_b8'])} | "
                f"{_fmt(r['curve_deviation'], '.1%')} | {_fmt(r['curve_mean_ratio'])} | "
                f"{'yes' if r['holds'] else 'no'} | {r['momentum_lag_examples']:.0f} | "
                f"{r['stability_use']:.3g} | {_fmt(r['below_noise_from'], 'd')} |"
            )
    return out


def task_section(s: dict) -> list[str]:
    """A task's settings, search, verdict and noise profile along the B = 8 trajectory."""
    t, profile = s["tuned"], s["noise_profile"]
    held = [r["batch_size"] for r in s["rows"] if r["optimizer"] == "conjugate" and r["holds"]]
    stable = largest_stable_batch(t["lr"], t["momentum_horizon"], max(r["sharpness"] for r in profile))
    out = [
        "",
        f"## {s['task']}",
        "",
        f"Loss: {s['metric']}. Budget {s['budget']} examples. Tuned at B = {REFERENCE_B}: "
        f"η' = {t['lr']:g}, N'_g = {t['momentum_horizon']:g} (torch SGD: lr = {s['sgd']['lr']:.4g}, "
        f"momentum = {s['sgd']['momentum']:.4g}). Conjugate runs within tolerance at B ∈ {held}. "
        f"B_noise: {_fmt(profile[0]['b_noise'], '.4g')} at θ₀, {_fmt(profile[-1]['b_noise'], '.4g')} "
        f"at the end; largest stable B at the largest λ_max seen: {stable:.4g}.",
        "",
        "Search at B = 8 (half budget, tuning seed): "
        + ", ".join(f"(η'={x['lr']:g}, N'_g={x['momentum_horizon']:g}) → {_fmt(x['final_loss'])}"
                    for x in s["search"]),
        "",
        "Along the B = 8 conjugate trajectory (medians over seeds; *largest stable B*: the "
        "largest B for which the conjugate rule with the tuned η', N'_g is stable at that λ_max):",
        "",
        "| examples | loss | B_noise | λ_max | largest stable B |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in profile:
        stable = (largest_stable_batch(t["lr"], t["momentum_horizon"], row["sharpness"])
                  if row["sharpness"] > 0 else math.inf)
        out.append(f"| {row['examples']} | {row['loss']:.4g} | {_fmt(row['b_noise'], '.4g')} | "
                   f"{row['sharpness']:.4g} | {_fmt(stable, '.4g')} |")
    return out


def markdown(summaries: list[dict], seeds: Sequence[int], seconds: float) -> str:
    """The report: the main table, then settings and noise profile per task."""
    out = [
        "# Batch-size conjugacy: ConjugateMomentumSGD vs torch.optim.SGD",
        "",
        f"Medians over seeds {list(seeds)}; the same budget of examples at every B. {COLUMNS}",
        "",
        *main_table(summaries),
    ]
    for s in summaries:
        out += task_section(s)
    out += ["", f"Runtime: {seconds:.0f} s."]
    return "\n".join(out) + "\n"


def plot(summaries: list[dict], path: Path) -> None:
    """One panel per task × optimizer: loss vs examples processed, log axes, a line per B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summaries), len(FACTORIES), figsize=(11, 4.2 * len(summaries)),
                             squeeze=False)
    for i, s in enumerate(summaries):
        for j, optimizer in enumerate(FACTORIES):
            ax = axes[i][j]
            for r in (r for r in s["rows"] if r["optimizer"] == optimizer):
                points = [(c, v) for c, v in zip(r["examples"], r["curve"]) if c > 0 and math.isfinite(v)]
                if points:
                    ax.plot(*zip(*points), marker=".", label=f"B = {r['batch_size']}")
            title = (f"ConjugateMomentumSGD η'={s['tuned']['lr']:g}, N'_g={s['tuned']['momentum_horizon']:g}"
                     if optimizer == "conjugate" else
                     f"torch SGD lr={s['sgd']['lr']:.3g}, momentum={s['sgd']['momentum']:.3g}")
            ax.set(xscale="log", yscale="log", xlabel="examples processed", ylabel=s["ylabel"])
            ax.set_title(f"{s['task']}\n{title}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(x: Any) -> Any:
    """Non-finite floats as None, so the JSON is standard."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/conjugacy"), help="output folder")
    parser.add_argument("--seeds", type=int, default=3, help="task seeds per (optimizer, B)")
    parser.add_argument("--tune-seed", type=int, default=100, help="seed of the B = 8 search")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--tasks", nargs="+", default=[t.name for t in TASKS],
                        choices=[t.name for t in TASKS])
    parser.add_argument("--plot", action="store_true", help="also write conjugacy.png (matplotlib)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: one thread per process, processes in parallel
    seeds = list(range(args.seeds))
    setups = [setup for setup in TASKS if setup.name in args.tasks]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("fork")) as pool:
            summaries = [evaluate_task(setup, seeds, args.tune_seed, pool) for setup in setups]
    else:
        summaries = [evaluate_task(setup, seeds, args.tune_seed, None) for setup in setups]
    seconds = time.perf_counter() - start
    report = markdown(summaries, seeds, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conjugacy.md").write_text(report)
    payload = {"seeds": seeds, "seconds": seconds, "batch_sizes": list(BATCH_SIZES),
               "curve_tolerance": CURVE_TOLERANCE, "tasks": summaries}
    (args.out / "conjugacy.json").write_text(json.dumps(_json_safe(payload), indent=1))
    if args.plot:
        plot(summaries, args.out / "conjugacy.png")
    print(report)


if __name__ == "__main__":
    main()
