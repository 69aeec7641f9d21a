"""Command line: ``learned-optim`` (or ``python -m learned_optim``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

from . import __version__, registry
from .tasks import families

__all__ = ["main"]


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _cmd_list(args: argparse.Namespace) -> int:
    print("optimizers:")
    for name in registry.available():
        print(f"  {name:<24} {registry.info(name).summary}")
    print("baselines (benchmark only): sgd, nag, rmsprop, adam")
    print("task families:", ", ".join(families()))
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from . import benchmark

    baseline_specs = benchmark.baselines()
    wanted = _csv(args.optimizers) if args.optimizers != "all" else list(baseline_specs) + registry.available()
    specs = {}
    for name in wanted:
        if name in baseline_specs:
            specs[name] = baseline_specs[name]
        else:
            specs.update(benchmark.package_optimizers([name]))  # KeyError lists what exists
    family_kwargs = {"mnist-mlp": {"root": args.data}} if args.data else {}
    tasks = benchmark.default_tasks(_csv(args.tasks), args.steps, **family_kwargs)
    eval_seeds = list(range(args.seeds))
    tune_seeds = [10_000 + i for i in range(args.tune_seeds)]
    print(
        f"learned_optim {__version__} benchmark: {len(tasks)} tasks x {len(specs)} optimizers, "
        f"lr tuned on {len(tune_seeds)} seeds over a half-decade grid, {len(eval_seeds)} evaluation seeds"
    )
    start = time.perf_counter()
    results = benchmark.run_benchmark(
        tasks, specs, eval_seeds=eval_seeds, tune_seeds=tune_seeds, jobs=args.jobs, log=print
    )
    elapsed = time.perf_counter() - start
    header = (
        f"Final loss = mean of the last 10 steps; median and IQR over {len(eval_seeds)} seeds; "
        f"lr tuned on {len(tune_seeds)} separate seeds. Command: `learned-optim {' '.join(args.argv)}` "
        f"({elapsed:.0f} s with {args.jobs} worker process(es), torch {torch.__version__})."
    )
    table = benchmark.format_table(results)
    print()
    print(table)
    out = benchmark.save_results(results, args.out, header)
    print(f"\nwrote {out / 'benchmark.md'} and {out / 'benchmark.json'}")
    if args.plot:
        path = benchmark.plot_results(results, out / "benchmark.png")
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learned-optim", description="Learned and adaptive optimizers for PyTorch.")
    parser.add_argument("--version", action="version", version=f"learned_optim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="list optimizers and task families")
    p_list.set_defaults(func=_cmd_list)

    p_bench = sub.add_parser("benchmark", help="benchmark optimizers against tuned torch.optim baselines")
    p_bench.add_argument("--tasks", default="quadratic,rosenbrock,noisy-least-squares,mlp",
                         help="comma-separated task families (mnist-mlp needs --data or $LEARNED_OPTIM_DATA)")
    p_bench.add_argument("--optimizers", default="all", help="comma-separated names, or 'all'")
    p_bench.add_argument("--steps", type=int, default=None, help="steps per run (default: per task)")
    p_bench.add_argument("--seeds", type=int, default=10, help="evaluation seeds")
    p_bench.add_argument("--tune-seeds", type=int, default=3, help="seeds for the learning-rate search")
    p_bench.add_argument("--data", default=None, help="data directory holding mnist/ (for mnist-mlp)")
    p_bench.add_argument("--out", default="results", help="output directory for the table and plot")
    p_bench.add_argument("--plot", action="store_true", help="also write benchmark.png (needs matplotlib)")
    p_bench.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                         help="worker processes (default: all cores)")
    p_bench.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
