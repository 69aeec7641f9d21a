"""Long horizons: does the loss keep falling far past the meta-training horizon?

Runs optimizers at their default settings (tuned Adam at the rate stored for the suite's own,
shorter horizon) on suite tasks
for many steps and checks, per seed, that the loss at the end (mean of the last 10% of steps)
is below the loss at a tenth of the run (mean of steps 5%-15%): issue 16's target 4 asks this
at 10× the longest meta-training horizon on the transformer and the MNIST MLP. It also reports
each seed's peak, the highest single-step loss past 15% of the run, against its loss at a tenth,
and counts the seeds that spiked (a peak above twice that loss): a run can spike and recover by
the end, which "still falling" alone would not show.

    python benchmarks/long_horizon.py --data ../shared/data --steps 10000 --optimizers lstm-gac,adam

Writes OUT/long_horizon.md and OUT/long_horizon.json (every curve, thinned to 500 points).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from learned_optim import suite
from learned_optim.benchmark import forked_map, train

HERE = Path(__file__).resolve().parent
SPIKE = 2.0  # a seed spiked if its peak past 15% of the run exceeds SPIKE × its loss at a tenth
_JOBS: dict[str, object] = {}  # what forked workers read: the families and specs


def window_mean(losses: torch.Tensor, start: float, stop: float) -> float:
    """Mean loss over steps [start·N, stop·N) (inf if any is non-finite)."""
    n = losses.numel()
    part = losses[int(start * n): max(int(start * n) + 1, int(stop * n))]
    return float(part.mean()) if bool(torch.isfinite(part).all()) else math.inf


def peak_after(losses: torch.Tensor, start: float) -> float:
    """The highest loss from step start·N on (inf if any is non-finite): a late spike's height."""
    part = losses[int(start * losses.numel()):]
    return float(part.max()) if bool(torch.isfinite(part).all()) else math.inf


def run(task_name: str, optimizer: str, seed: int, steps: int) -> dict:
    family = _JOBS["families"][task_name]  # type: ignore[index]
    spec, lr = _JOBS["specs"][(task_name, optimizer)]  # type: ignore[index]
    torch.set_num_threads(1)
    task = family.sample(seed)
    start = time.perf_counter()
    losses = train(task, lambda params: spec.factory(params, lr, task), steps)
    tenth, end = window_mean(losses, 0.05, 0.15), window_mean(losses, 0.9, 1.0)
    peak = peak_after(losses, 0.15)
    stride = max(1, steps // 500)
    return {"task": task_name, "optimizer": optimizer, "seed": seed, "initial": float(losses[0]),
            "at_tenth": tenth, "final": end, "falling": end < tenth,
            "peak": peak, "seconds": time.perf_counter() - start,
            "curve": [float(x) for x in losses[::stride]], "stride": stride}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/long_horizon.py")
    parser.add_argument("--tasks", default="transformer,mlp-paper-100", help="suite tasks (their families)")
    parser.add_argument("--optimizers", default="lstm-gac,ntm-bfgs,adam",
                        help="adam (the suite's tuned rate), adam-1e-3, lstm-gac[:WEIGHTS], ntm-bfgs[:WEIGHTS]")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run: FIRST .. FIRST + SEEDS − 1")
    parser.add_argument("--data", default=os.environ.get("LEARNED_OPTIM_DATA"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="results/long-horizon")
    args = parser.parse_args(argv)
    if args.steps < 20 or args.seeds < 1 or args.first_seed < 0:
        parser.error("--steps must be at least 20, --seeds at least 1 and --first-seed at least 0")
    names = [t for t in args.tasks.split(",") if t]
    optimizers = [o for o in args.optimizers.split(",") if o]
    try:
        tasks = suite.suite_tasks(names, root=args.data)
        specs = suite.suite_optimizers(optimizers)
        tuned = suite.load_tuned(HERE / "suite_lrs.json", tasks, [o for o in optimizers if suite.is_tuned(o)])
    except (KeyError, ValueError, FileNotFoundError) as error:
        parser.error(str(error.args[0] if isinstance(error, KeyError) else error))
    _JOBS["families"] = {n: f for n, (_, f) in tasks.items()}
    _JOBS["specs"] = {(t, o): (specs[o], tuned[t][o] if suite.is_tuned(o) else specs[o].lr_grid[0])
                      for t in names for o in optimizers}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(t, o, s, args.steps) for t in names for o in optimizers for s in seeds]
    start = time.perf_counter()
    rows = list(forked_map(run, jobs, args.jobs))
    seconds = time.perf_counter() - start
    command = shlex.join(["python", "benchmarks/long_horizon.py", *argv])
    lines = [f"Command: `{command}` ({seconds:.0f} s, {args.jobs} worker process(es); torch {torch.__version__}). "
             f"Loss at a tenth = mean of steps 5-15% of the run; at the end = mean of the last 10%; "
             f"peak = the highest single-step loss past 15%.", "",
             "| task | optimizer | lr | seeds still falling | median loss at a tenth | median loss at the end | "
             f"worst end / tenth | seeds spiking (peak > {SPIKE:g} × tenth) | worst peak / tenth |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in names:
        for o in optimizers:
            mine = [r for r in rows if r["task"] == t and r["optimizer"] == o]
            lr = _JOBS["specs"][(t, o)][1]  # type: ignore[index]
            worst, worst_peak = (max(r[key] / r["at_tenth"] if math.isfinite(r["at_tenth"]) else math.inf
                                     for r in mine) for key in ("final", "peak"))
            lines.append(f"| {t} | {o} | {suite.lr_label(o, lr)} | "
                         f"{sum(r['falling'] for r in mine)}/{len(mine)} | "
                         f"{statistics.median(r['at_tenth'] for r in mine):.4g} | "
                         f"{statistics.median(r['final'] for r in mine):.4g} | {worst:.3g} | "
                         f"{sum(r['peak'] > SPIKE * r['at_tenth'] for r in mine)}/{len(mine)} | {worst_peak:.3g} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_horizon.md").write_text("\n".join(lines) + "\n")
    (out / "long_horizon.json").write_text(json.dumps({"command": command, "seconds": seconds, "rows": rows}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
