"""Two or more learned rules on the same tasks of a family, task by task: did meta-training
make the rule better on its own training distribution, or only on the validation?

    python benchmarks/compare_rules.py --weights runs/a runs/b --family suite-mix \
        --family-kwargs '{"part": "meta-train"}' --tasks 8 --steps 1000 --data ../shared/data

Each rule runs (no graph, as the meta-trainer's validation does) on the tasks of seeds
SEED_BASE..SEED_BASE+TASKS−1 for STEPS steps. Prints a markdown table: per task, each rule's
mean log loss over the run (the meta-trainer's ``log`` meta-loss) and final loss (mean of the
last 10 steps), then how many tasks each rule is best on.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time

import torch

from learned_optim.meta.unroll import Unroll
from learned_optim.rules import load_rule
from learned_optim.tasks import get_family


def scores(rule: torch.nn.Module, family, seed: int, steps: int) -> tuple[float, float]:
    """(mean log loss, final loss) of ``rule`` on the task of ``seed`` (inf when it diverged)."""
    with torch.no_grad():
        unroll = Unroll(rule, family.stack([seed]))
        losses, _ = unroll.run(unroll.start(), steps, track=False)
    losses = losses[:, 0]
    if not bool(torch.isfinite(losses).all()):
        return math.inf, math.inf
    return float(losses.clamp_min(1e-30).log().mean()), float(losses[-min(10, steps):].mean())


def component_name(family, seed: int) -> str:
    """The mixture component a seed draws (the family's own name for a plain family)."""
    if hasattr(family, "choose"):
        return str(getattr(family.components[family.choose(seed)], "name", family.choose(seed)))
    return str(getattr(family, "name", "task"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/compare_rules.py")
    parser.add_argument("--weights", nargs="+", required=True, help="shipped names or paths of saved weights")
    parser.add_argument("--family", default="suite-mix")
    parser.add_argument("--family-kwargs", default="{}", help="JSON keyword arguments of the family")
    parser.add_argument("--data", default=None, help="MNIST directory (families that read it)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed-base", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.steps < 1:
        parser.error("--tasks and --steps must be positive")
    try:
        kwargs = json.loads(args.family_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--family-kwargs is not JSON: {error}")
    if args.data is not None:
        kwargs.setdefault("root", args.data)
    torch.set_num_threads(args.threads)
    family = get_family(args.family, **kwargs)
    rules = [load_rule(w)[0] for w in args.weights]
    start = time.perf_counter()
    header = "| seed | task | " + " | ".join(f"{w} log loss | {w} final" for w in args.weights) + " |"
    lines = [header, "| ---: | --- |" + " ---: | ---: |" * len(rules)]
    best = [0] * len(rules)
    for seed in range(args.seed_base, args.seed_base + args.tasks):
        row = [scores(rule, family, seed, args.steps) for rule in rules]
        best[min(range(len(rules)), key=lambda i: row[i][0])] += 1
        lines.append(f"| {seed} | {component_name(family, seed)} | "
                     + " | ".join(f"{log:.4g} | {final:.4g}" for log, final in row) + " |")
    command = "python benchmarks/compare_rules.py " + " ".join(shlex.quote(a) for a in argv)
    print(f"Command: `{command}` ({time.perf_counter() - start:.0f} s; {args.family} {kwargs}, "
          f"{args.steps} steps). Lowest mean log loss on: "
          + ", ".join(f"{w} {n}/{args.tasks}" for w, n in zip(args.weights, best)) + ".\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
