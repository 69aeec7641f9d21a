"""How large NTM-BFGS's memory step gets beside its controller's: the ratio ‖m_t‖/‖u_t‖ per step.

The rule's step is g_t = u_t + m_t: u_t the controller's (LSTM+GAC, Adam-normalized, bounded),
m_t = −2σ(η)·i_t the memory's (BFGS-like, unbounded: ‖M‖ grows as ‖s‖/‖y‖ where the curvature
is tiny). ``trust_ratio`` τ resets the memory where ‖m_t‖ > τ·‖u_t‖; this measures the ratio
with the option off (the memory's raw proposals), to choose τ above what ordinary runs need.

    python benchmarks/ntm_trust.py --data ../shared/data --tasks quadratic,rosenbrock,noisy-least-squares,mlp --seeds 5

Tasks are the main benchmark's (their steps) or the suite's (``suite:NAME``, its steps);
``--steps`` overrides. Writes OUT/ntm_trust.md and OUT/ntm_trust.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from learned_optim import NTMBFGS, suite
from learned_optim.benchmark import DEFAULT_TASKS, forked_map, train
from learned_optim.rules import load_rule
from learned_optim.tasks import get_family

THRESHOLDS = (10, 100, 1000)


def family_of(name: str, data: str | None) -> tuple[Any, int]:
    """The task family and its number of steps: ``suite:NAME`` or a main-benchmark task."""
    if name.startswith("suite:"):
        task, family = suite.suite_tasks([name[len("suite:"):]], root=data)[name[len("suite:"):]]
        return family, task.steps
    if name not in DEFAULT_TASKS:
        raise KeyError(f"unknown task {name!r}: one of {', '.join(DEFAULT_TASKS)} or suite:NAME")
    return get_family(name), DEFAULT_TASKS[name]


def ratios_of_run(weights: str, name: str, seed: int, steps: int | None, data: str | None) -> dict[str, Any]:
    """One run with the trust region off: every step's ‖m_t‖/‖u_t‖ (over the whole param group)."""
    torch.set_num_threads(1)
    rule = load_rule(weights)[0]
    rule.config = replace(rule.config, trust_ratio=None)
    ratios: list[float] = []
    output = rule.heads.output

    def recorded(ctx, read):  # the heads' output g_t = u_t + m_t; m_t = g_t − u_t
        update = output(ctx, read)
        memory_step = update - ctx.controller_update
        ratios.append(float(memory_step.norm() / ctx.controller_update.norm().clamp_min(1e-30)))
        return update

    rule.heads.output = recorded  # this instance only
    family, default_steps = family_of(name, data)
    task = family.sample(seed)
    losses = train(task, lambda params: NTMBFGS(params, weights=rule), steps or default_steps)
    finite = [r for r in ratios if math.isfinite(r)]
    return {"task": name, "seed": seed, "steps": len(ratios), "final_loss": float(losses[-1]),
            "max": max(ratios) if ratios else 0.0, "ratios": ratios if len(ratios) <= 5000 else None,
            "quantiles": torch.quantile(torch.tensor(finite, dtype=torch.float64),
                                        torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist() if finite else [0, 0],
            "over": {str(k): sum(r > k for r in ratios) for k in THRESHOLDS},
            "first_over": {str(k): next((t for t, r in enumerate(ratios) if r > k), None) for k in THRESHOLDS}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/ntm_trust.py")
    parser.add_argument("--weights", default="ntm-bfgs-lstm-controller", help="NTM-BFGS weights (name or path)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="main-benchmark tasks or suite:NAME")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the task's)")
    parser.add_argument("--data", default=os.environ.get("LEARNED_OPTIM_DATA"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="results/ntm-trust")
    args = parser.parse_args(argv)
    names = [t for t in args.tasks.split(",") if t]
    try:
        rule, _ = load_rule(args.weights, expected_rule="ntm-bfgs")
        for name in names:
            family_of(name, args.data)
    except (KeyError, ValueError, FileNotFoundError) as error:
        parser.error(str(error.args[0] if isinstance(error, KeyError) else error))
    if args.seeds < 1 or args.first_seed < 0 or (args.steps is not None and args.steps < 1):
        parser.error("--seeds must be at least 1, --first-seed at least 0, --steps at least 1")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(args.weights, name, seed, args.steps, args.data) for name in names for seed in seeds]
    start = time.perf_counter()
    rows = list(forked_map(ratios_of_run, jobs, args.jobs))
    seconds = time.perf_counter() - start
    command = shlex.join(["python", "benchmarks/ntm_trust.py", *argv])
    lines = [f"Command: `{command}` ({seconds:.0f} s, {args.jobs} worker process(es); torch {torch.__version__}). "
             f"Weights `{args.weights}` with the trust region off; ratio = ‖memory step‖/‖controller step‖ per step.",
             "", "| task | seed | steps | median ratio | 99th percentile | max | steps over "
             + " / ".join(str(k) for k in THRESHOLDS) + " | final loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['seed']} | {r['steps']} | {r['quantiles'][0]:.3g} | {r['quantiles'][1]:.3g} | "
                     f"{r['max']:.3g} | {' / '.join(str(r['over'][str(k)]) for k in THRESHOLDS)} | {r['final_loss']:.4g} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ntm_trust.md").write_text("\n".join(lines) + "\n")
    (out / "ntm_trust.json").write_text(json.dumps({"command": command, "seconds": seconds, "rows": rows}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
