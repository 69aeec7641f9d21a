"""NTM-BFGS on stochastic tasks: the curvature condition's ε against minibatch noise.

The NTM-BFGS rule writes a pair (s, y) into its memory only if yᵀs > ε·‖y‖·‖s‖. With
minibatch gradients y = ∇ₜ₊₁ − ∇ₜ is mostly noise, nearly orthogonal to s, and a small ε admits
pairs with a huge ρ = 1/yᵀs. This runs each shipped NTM-BFGS weight with its own ε and with
others, on suite tasks and the built-in quadratic and Rosenbrock, over seeds:

    python benchmarks/ntm_curvature.py --data ../shared/data --eps weights,0.1

Writes OUT/ntm_curvature.md: median final loss (mean of the last 10% of steps) and divergences
(non-finite, or ending above the initial loss) per task, weight and ε.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from learned_optim import NTMBFGS, suite
from learned_optim.benchmark import forked_map, train
from learned_optim.tasks import get_family

BUILT_IN = {"quadratic": 100, "rosenbrock": 100}  # built-in benchmark families and their steps
_JOBS: dict[str, object] = {}


def run(task: str, weights: str, eps: float | None, seed: int) -> dict:
    family, steps = _JOBS["tasks"][task]  # type: ignore[index]
    torch.set_num_threads(1)
    sample = family.sample(seed)
    losses = train(sample, lambda params: NTMBFGS(params, weights=weights, curvature_eps=eps), steps)
    return {"task": task, "weights": weights, "eps": eps, "seed": seed, "final": suite.final_loss(losses),
            "diverged": suite.diverged(losses)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/ntm_curvature.py")
    parser.add_argument("--tasks", default="mlp-relu,mlp-tanh,conv,quadratic,rosenbrock",
                        help="suite tasks, or the built-in quadratic / rosenbrock")
    parser.add_argument("--weights", default="ntm-bfgs-mnist,ntm-bfgs-quadratic")
    parser.add_argument("--eps", default="weights,0.1", help="comma-separated ε values; 'weights': the weights' own")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--data", default=os.environ.get("LEARNED_OPTIM_DATA"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="results/ntm-curvature")
    args = parser.parse_args(argv)
    names = [t for t in args.tasks.split(",") if t]
    try:
        epsilons = [None if e == "weights" else float(e) for e in args.eps.split(",") if e]
        tasks = {}
        suite_names = [n for n in names if n not in BUILT_IN]
        for name, (spec, family) in suite.suite_tasks(suite_names, root=args.data).items():
            tasks[name] = (family, spec.steps)
        for name in names:
            if name in BUILT_IN:
                tasks[name] = (get_family(name), BUILT_IN[name])
    except (KeyError, ValueError) as error:
        parser.error(str(error.args[0] if isinstance(error, KeyError) else error))
    _JOBS["tasks"] = tasks
    weights = [w for w in args.weights.split(",") if w]
    jobs = [(t, w, e, s) for t in names for w in weights for e in epsilons for s in range(args.seeds)]
    start = time.perf_counter()
    rows = list(forked_map(run, jobs, args.jobs))
    command = shlex.join(["python", "benchmarks/ntm_curvature.py", *argv])
    lines = [f"Command: `{command}` ({time.perf_counter() - start:.0f} s, {args.jobs} worker process(es)); "
             f"seeds 0..{args.seeds - 1}, each task at its suite (or built-in benchmark) horizon.", "",
             "| task | weights | ε | median final loss | diverged |", "| --- | --- | ---: | ---: | ---: |"]
    for t in names:
        for w in weights:
            own = NTMBFGS([torch.nn.Parameter(torch.zeros(1))], weights=w).rule.config.curvature_eps
            for e in epsilons:
                mine = [r for r in rows if r["task"] == t and r["weights"] == w and r["eps"] == e]
                label = f"{own:g} (the weights')" if e is None else f"{e:g}"
                lines.append(f"| {t} | {w} | {label} | {statistics.median(r['final'] for r in mine):.4g} | "
                             f"{sum(r['diverged'] for r in mine)}/{len(mine)} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ntm_curvature.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
