"""Meta-learning an initialization on sinusoid regression, with each meta-gradient estimator.

The task family is MAML's (Finn et al. 2017): y = A·sin(x − ϕ), A ~ U[0.1, 5], ϕ ~ U[0, π],
x ~ U[−5, 5], regressed by an MLP 1-40-40-1 (ReLU) with the mean squared error. The inner
loop is the same for every estimator: ``--inner-steps`` SGD steps of size ``--inner-lr``,
each on a fresh 10-point minibatch (a stochastic inner loop, the setting where GD-by-SGD
and the same-minibatch second-order estimate differ); L_test is on 10 other points. The
implicit estimator solves its proximal problem with the same SGD but
``--implicit-inner-steps`` steps (20 by default: its meta-gradient assumes the inner problem
solved, and its memory does not grow with the steps); λ, CG steps and damping below. Adam
on θ₀, ``--tasks-per-step`` tasks per meta-step.

Reported per estimator, over ``--seeds`` meta-training runs (model init and task draws
differ by seed): the meta-test loss on 100 held-out tasks (seeds never trained on; 100
query points each) after k = 0, 1, ``--inner-steps`` and ``--implicit-inner-steps`` inner
steps, with the same SGD for every estimator; the median wall time of a meta-step; the meta-steps skipped because a
task's inner loop blew up (θ₀ is then left as it was); and the peak memory of one task's
meta-gradient, measured (``learned_optim.meta.peak_memory``), at ``--inner-steps`` and
at 4x as many inner steps, to show which estimators' memory grows with the inner loop.

Usage: ``python benchmarks/maml_sinusoid.py --out results/maml_sinusoid --plot``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from learned_optim.meta import MAML, VALIDATION_SEED_BASE, InnerSGD, get_estimator, peak_memory
from learned_optim.tasks import SinusoidFamily

ESTIMATORS = ("second-order", "first-order", "gd-by-sgd", "implicit")


def make_estimator(name: str, args: argparse.Namespace):
    if name == "implicit":
        return get_estimator(name, lam=args.lam, cg_steps=args.cg_steps, damping=args.damping)
    return get_estimator(name)


def training_steps(name: str, args: argparse.Namespace) -> int:
    """The inner steps an estimator meta-trains with."""
    return args.implicit_inner_steps if name == "implicit" else args.inner_steps


def run(name: str, seed: int, args: argparse.Namespace, family: SinusoidFamily, test_seeds: list[int]) -> dict:
    """Meta-train θ₀ with one estimator; the meta-test curve (after its training inner steps) and the step times."""
    torch.manual_seed(seed)
    maml = MAML(family.model(), family, make_estimator(name, args), InnerSGD(args.inner_lr, training_steps(name, args)),
                meta_lr=args.meta_lr, tasks_per_step=args.tasks_per_step, seed=seed)
    curve, times = [], []

    def evaluate(step: int) -> None:
        curve.append((step, float(maml.evaluate(test_seeds, query_size=100).mean())))

    evaluate(0)
    for step in range(1, args.meta_steps + 1):
        times.append(maml.meta_step()["seconds"])
        if step % args.eval_every == 0 or step == args.meta_steps:
            evaluate(step)
    final = {k: float(maml.evaluate(test_seeds, steps=k, query_size=100).mean())
             for k in eval_steps(args)}
    return {"estimator": name, "seed": seed, "curve": curve, "final": final,
            "step_seconds": statistics.median(times), "skipped": maml.skipped}


def eval_steps(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(sorted({0, 1, args.inner_steps, args.implicit_inner_steps}))


def memory(name: str, steps: int, args: argparse.Namespace, family: SinusoidFamily) -> int:
    """Peak bytes of one task's meta-gradient with ``steps`` inner steps."""
    torch.manual_seed(0)
    maml = MAML(family.model(), family, make_estimator(name, args), InnerSGD(args.inner_lr, steps), tasks_per_step=1)
    task = maml.meta_task(family.sample(0))
    _, peak = peak_memory(lambda: maml.estimator.estimate(maml.params, task, maml.inner))
    return peak


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in dict.fromkeys(r["estimator"] for r in runs):
        curves = [r["curve"] for r in runs if r["estimator"] == name]
        steps = [s for s, _ in curves[0]]
        values = torch.tensor([[v for _, v in c] for c in curves])
        median = values.median(0).values
        line, = ax.plot(steps, median, label=name)
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0).values, values.max(0).values, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("meta-test MSE after its training inner steps")
    ax.set_yscale("log")
    ax.set_title("MAML on sinusoids: median over seeds (band: min–max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/maml_sinusoid"))
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--meta-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--tasks-per-step", type=int, default=5)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.02)
    parser.add_argument("--implicit-inner-steps", type=int, default=20)
    parser.add_argument("--lam", type=float, default=1.0, help="implicit: λ, the proximal strength")
    parser.add_argument("--cg-steps", type=int, default=5, help="implicit: conjugate-gradient steps")
    parser.add_argument("--damping", type=float, default=1.0, help="implicit: δ in ((1 + δ)I + H/λ)w = ∇L_test")
    parser.add_argument("--test-tasks", type=int, default=100)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    family = SinusoidFamily()
    test_seeds = [VALIDATION_SEED_BASE + 50_000 + k for k in range(args.test_tasks)]
    runs = []
    for name in args.estimators:
        for seed in range(args.seeds):
            runs.append(run(name, seed, args, family, test_seeds))
            print(f"{name} seed {seed}: {runs[-1]['final']} ({runs[-1]['step_seconds'] * 1e3:.1f} ms/meta-step, "
                  f"{runs[-1]['skipped']} skipped)", flush=True)
    peaks = {name: {k: memory(name, k, args, family) for k in (args.inner_steps, 4 * args.inner_steps)}
             for name in args.estimators}
    seconds = time.perf_counter() - start

    k, k4, ks = args.inner_steps, 4 * args.inner_steps, eval_steps(args)
    lines = [f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv)}` ({seconds:.0f} s, "
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads). {args.seeds} meta-training seeds × "
             f"{args.meta_steps} meta-steps of {args.tasks_per_step} tasks; meta-test MSE on {args.test_tasks} "
             f"held-out tasks after k SGD steps (lr {args.inner_lr}), median over seeds (min–max). Peak memory: "
             "one task's meta-gradient.", "",
             "| estimator | inner steps (training) | " + " | ".join(f"k = {j}" for j in ks)
             + f" | ms / meta-step | skipped meta-steps | peak memory, {k} inner steps | peak memory, {k4} inner steps |",
             "|---|---|" + "---|" * len(ks) + "---|---|---|---|"]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})" if len(values) > 1 \
            else f"{values[0]:.3f}"

    summary = {}
    for name in args.estimators:
        mine = [r for r in runs if r["estimator"] == name]
        finals = {j: [r["final"][j] for r in mine] for j in ks}
        ms = statistics.median(r["step_seconds"] for r in mine) * 1e3
        summary[name] = {"final_median": {j: statistics.median(v) for j, v in finals.items()}, "ms_per_step": ms,
                         "peak_bytes": peaks[name]}
        skipped = sum(r["skipped"] for r in mine)
        summary[name]["skipped"] = skipped
        lines.append(f"| {name} | {training_steps(name, args)} | " + " | ".join(cell(finals[j]) for j in ks)
                     + f" | {ms:.1f} | {skipped} | "
                     f"{peaks[name][k] / 1024:.0f} KiB | {peaks[name][k4] / 1024:.0f} KiB |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "maml_sinusoid.md").write_text(text + "\n")
    (args.out / "maml_sinusoid.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "runs": runs, "summary": summary}, indent=1))
    if args.plot:
        plot(runs, args.out / "maml_sinusoid.png")
        print(f"wrote {args.out / 'maml_sinusoid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
