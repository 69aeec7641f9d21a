"""``lr`` and ``weight_decay`` as users expect: the learned optimizers under a warmup-then-cosine
schedule (``torch.optim.lr_scheduler``) and decoupled weight decay, on the suite's transformer.

    python benchmarks/lr_schedule.py --optimizers lstm-gac,ntm-bfgs

For each optimizer at its default weights: constant lr (the default, 1), a linear warmup over
the first 10% of steps then a cosine decay to 0, and the same with ``weight_decay``. Reports
the median final loss (mean of the last 10% of steps) over seeds and how many diverged
(non-finite, or ending above the initial loss). Writes OUT/lr_schedule.md.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from learned_optim import suite
from learned_optim.benchmark import forked_map, quantile, train

_JOBS: dict[str, object] = {}


def warmup_cosine(steps: int, warmup_fraction: float = 0.1):
    """The lr factor at each step: linear from 1/W to 1 over W = warmup_fraction·steps, then cosine to 0."""
    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def run(optimizer: str, setting: str, seed: int, steps: int, weight_decay: float) -> dict:
    family, spec = _JOBS["family"], _JOBS["specs"][optimizer]  # type: ignore[index]
    torch.set_num_threads(1)
    task = family.sample(seed)  # type: ignore[attr-defined]
    decay = weight_decay if setting == "warmup-cosine + weight decay" else 0.0
    schedule = None if setting == "constant" else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps)))

    def make(params):
        opt = spec.factory(params, 1.0, task)
        for group in opt.param_groups:
            group["weight_decay"] = decay
        return opt

    losses = train(task, make, steps, schedule=schedule)
    final = suite.final_loss(losses)
    return {"optimizer": optimizer, "setting": setting, "seed": seed, "final": final,
            "diverged": suite.diverged(losses)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/lr_schedule.py")
    parser.add_argument("--task", default="transformer", help="a suite task")
    parser.add_argument("--optimizers", default="lstm-gac,ntm-bfgs", help="lstm-gac[:WEIGHTS], ntm-bfgs[:WEIGHTS]")
    parser.add_argument("--steps", type=int, default=None, help="default: the suite task's horizon")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="λ (per step at lr 1)")
    parser.add_argument("--data", default=os.environ.get("LEARNED_OPTIM_DATA"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="results/lr-schedule")
    args = parser.parse_args(argv)
    optimizers = [o for o in args.optimizers.split(",") if o]
    try:
        (task, family), = suite.suite_tasks([args.task], root=args.data).values()
        specs = {o: suite.learned_spec(o) for o in optimizers}
    except (KeyError, ValueError) as error:
        parser.error(str(error.args[0] if isinstance(error, KeyError) else error))
    steps = args.steps or task.steps
    _JOBS.update(family=family, specs=specs)
    settings = ["constant", "warmup-cosine", "warmup-cosine + weight decay"]
    jobs = [(o, s, seed, steps, args.weight_decay) for o in optimizers for s in settings for seed in range(args.seeds)]
    start = time.perf_counter()
    rows = list(forked_map(run, jobs, args.jobs))
    command = shlex.join(["python", "benchmarks/lr_schedule.py", *argv])
    lines = [f"Command: `{command}` ({time.perf_counter() - start:.0f} s; task {args.task}, {steps} steps, "
             f"seeds 0..{args.seeds - 1}, weight decay λ = {args.weight_decay:g}).", "",
             "| optimizer | lr setting | median final loss | IQR | diverged |", "| --- | --- | ---: | --- | ---: |"]
    for o in optimizers:
        for s in settings:
            finals = [r["final"] for r in rows if r["optimizer"] == o and r["setting"] == s]
            lines.append(f"| {o} | {s} | {quantile(finals, 0.5):.4g} | {quantile(finals, 0.25):.4g} – "
                         f"{quantile(finals, 0.75):.4g} | "
                         f"{sum(r['diverged'] for r in rows if r['optimizer'] == o and r['setting'] == s)}/{len(finals)} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_schedule.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
