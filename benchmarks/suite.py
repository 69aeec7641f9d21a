"""The evaluation suite: learned optimizers at their default settings against tuned built-ins on
the kinds of model people train (MLPs, convnets, a transformer and a GRU language model).

    python benchmarks/suite.py --data ../shared/data --plot                  # everything, stored lrs
    python benchmarks/suite.py --data ../shared/data --optimizers adam,lstm-gac:runs/mine   # a new weight
    python benchmarks/suite.py --data ../shared/data --retune                # retune the baselines first

Baselines' learning rates come from ``benchmarks/suite_lrs.json`` (tuned on seeds 10000-10002
over a half-decade grid; ``--retune`` remakes the file for the tasks and baselines asked for).
Writes ``OUT/suite.md`` (summary, ratio matrix, a table per task), ``OUT/suite.json`` (every
number and curve) and with ``--plot`` ``OUT/suite.png``. Definitions of every score:
``learned_optim.suite``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import learned_optim
from learned_optim import suite

HERE = Path(__file__).resolve().parent
DEFAULT_LRS = HERE / "suite_lrs.json"
BASELINES = ["sgd", "nag", "rmsprop", "adam", "adamw"]


def default_learned() -> list[str]:
    """Every shipped weight, each with the optimizer it belongs to."""
    return [f"{info['rule']}:{name}" for name, info in sorted(learned_optim.available_weights().items())]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/suite.py")
    parser.add_argument("--tasks", default="all", help=f"comma-separated, or 'all': {', '.join(t.name for t in suite.SUITE)}")
    parser.add_argument("--optimizers", default="all",
                        help="comma-separated: sgd, nag, rmsprop, adam, adamw (tuned), adam-1e-3 (untuned), "
                             "lstm-gac[:WEIGHTS], ntm-bfgs[:WEIGHTS] (default settings); 'all': these with every "
                             "shipped weight. Ratios and speedups need adam.")
    parser.add_argument("--seeds", type=int, default=len(suite.EVAL_SEEDS), help="evaluation seeds 0..N-1")
    parser.add_argument("--retune", action="store_true", help="tune the baselines asked for and store their lrs")
    parser.add_argument("--tune-only", action="store_true", help="with --retune: stop after tuning")
    parser.add_argument("--lrs", default=str(DEFAULT_LRS), help="stored tuned learning rates (JSON)")
    parser.add_argument("--data", default=os.environ.get("LEARNED_OPTIM_DATA"),
                        help="data directory holding mnist/ (default $LEARNED_OPTIM_DATA)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--out", default="results/suite", help="output directory")
    parser.add_argument("--plot", action="store_true", help="also write suite.png (needs matplotlib)")
    parser.add_argument("--reuse", default=[], nargs="+", metavar="SUITE_JSON",
                        help="take the rows of earlier runs' suite.json (same task, optimizer, seeds and lr) "
                             "instead of running them again: a new weight is then scored against stored baselines")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be positive")
    task_names = None if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        args.task_map = suite.suite_tasks(task_names, args.data)
        names = ([*BASELINES, suite.UNTUNED, *default_learned()] if args.optimizers == "all"
                 else [o.strip() for o in args.optimizers.split(",") if o.strip()])
        for name in names:  # refuse a bad name before anything runs
            spec = suite.suite_optimizers([name])[name]
            if ":" in name:
                spec.factory([torch.zeros(1, requires_grad=True)], 1.0, None)  # loads (and checks) the weights
        args.names = names
    except (KeyError, ValueError, FileNotFoundError) as error:
        parser.error(str(error.args[0] if isinstance(error, KeyError) else error))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/suite.py", *argv])
    start = time.perf_counter()
    lrs_path = Path(args.lrs)
    if args.retune:
        previous = json.loads(lrs_path.read_text()) if lrs_path.is_file() else None
        tuned = suite.tune_suite(args.task_map, args.names, jobs=args.jobs, log=print)
        if previous:  # keep rates of baselines not retuned on these tasks
            for task, entry in tuned.items():
                old = previous["tasks"].get(task, {})
                if old.get("definition") == entry["definition"]:
                    tuned[task] = {**old, **entry}
        suite.save_tuned(lrs_path, tuned, command, previous)
        print(f"wrote {lrs_path} ({time.perf_counter() - start:.0f} s)")
        if args.tune_only:
            return 0
    lrs = suite.load_tuned(lrs_path, args.task_map, args.names)
    seeds = list(range(args.seeds))
    print(f"suite: {len(args.task_map)} tasks x {len(args.names)} optimizers x {len(seeds)} seeds, "
          f"{args.jobs} worker process(es)")
    reuse, commands = [], []
    for path in args.reuse:
        earlier = json.loads(Path(path).read_text())
        reuse += [suite.SuiteResult.from_json(r) for r in earlier["results"]]
        commands.append(f"`{earlier['command']}`")
    eval_start = time.perf_counter()
    results = suite.evaluate_suite(args.task_map, args.names, lrs, seeds, jobs=args.jobs, log=print, reuse=reuse)
    seconds = time.perf_counter() - eval_start
    reused = sum(any(r is q for q in reuse) for r in results)
    header = (f"Command: `{command}` ({seconds:.0f} s of evaluation with {args.jobs} worker process(es) of "
              f"{'1 thread' if args.jobs > 1 else f'{torch.get_num_threads()} threads'}; {suite.environment()}). "
              f"Tuned lrs from `{lrs_path.name}`. Final loss = mean of the last 10% of steps; median and IQR over "
              f"seeds 0..{len(seeds) - 1}."
              + (f" {reused} of the {len(results)} rows were reused from {', '.join(args.reuse)} (commands: "
                 f"{'; '.join(commands)}); their times are those runs'." if reused else ""))
    report = suite.format_report(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.md").write_text(header + "\n\n" + report + "\n")
    (out / "suite.json").write_text(json.dumps({
        "command": command, "seconds": seconds, "environment": suite.environment(),
        "tasks": {n: {**t.definition(f), "description": t.description} for n, (t, f) in args.task_map.items()},
        "summary": suite.summarize(results), "results": [r.to_json() for r in results]}) + "\n")
    print("\n" + header + "\n\n" + report)
    print(f"\nwrote {out / 'suite.md'} and {out / 'suite.json'}")
    if args.plot:
        print(f"wrote {suite.plot_suite(results, out / 'suite.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
