"""Is a meta-training run's change of φ better than a random change of the same size?

    learned-optim export --workdir runs/NAME.run --out runs/NAME-best        # φ where it started (if never improved)
    learned-optim export --workdir runs/NAME.run --out runs/NAME-now --latest
    python benchmarks/meta_direction.py --start runs/NAME-best --end runs/NAME-now --data ../shared/data

Scores, with the meta-trainer's own validation (the held-out suite-mix tasks of the validation
seeds, no graph, mean log loss), the start φ₀, the end φ₁, RANDOM changes φ₀ + δ with δ drawn
at random per tensor, on the entries the run changed (a run of ``--trainable`` rows changes only
those), and scaled to the norm of that tensor's φ₁ − φ₀, and (``--per-tensor``)
φ₀ plus one tensor's change alone. If φ₁ scores worse than φ₀ while random changes of the same
size do not, the meta-gradient steered φ somewhere worse: the estimator is biased for this
objective, not merely noisy. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from learned_optim.meta.trainer import VALIDATION_SEED_BASE, validate
from learned_optim.rules import load_rule
from learned_optim.tasks import get_family


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/meta_direction.py")
    parser.add_argument("--start", required=True, help="weights φ₀ (a shipped name or a path)")
    parser.add_argument("--end", required=True, help="weights φ₁ of the same rule and config")
    parser.add_argument("--family", default="suite-mix")
    parser.add_argument("--family-kwargs", default='{"part": "held-out"}', help="JSON keyword arguments")
    parser.add_argument("--data", default=None, help="MNIST directory (families that read it)")
    parser.add_argument("--validation-tasks", type=int, default=6)
    parser.add_argument("--horizon", type=int, default=2000)
    parser.add_argument("--random", type=int, default=2, help="random changes to score")
    parser.add_argument("--per-tensor", action="store_true", help="also φ₀ plus each tensor's change alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    kwargs = json.loads(args.family_kwargs)
    if args.data is not None:
        kwargs.setdefault("root", args.data)
    torch.set_num_threads(args.threads)
    start_rule, _ = load_rule(args.start)
    end_rule, _ = load_rule(args.end)
    if start_rule.name != end_rule.name or start_rule.config != end_rule.config:
        parser.error("--start and --end must be weights of the same rule and config")
    family = get_family(args.family, **kwargs)
    seeds = [VALIDATION_SEED_BASE + k for k in range(args.validation_tasks)]
    phi0 = {k: v.detach().clone() for k, v in start_rule.state_dict().items()}  # copies: loading φ writes in place
    phi1 = end_rule.state_dict()
    change = {k: phi1[k] - phi0[k] for k in phi0}
    gen = torch.Generator().manual_seed(args.seed)

    def scored(label: str, delta: dict[str, torch.Tensor]) -> str:
        start_rule.load_state_dict({k: phi0[k] + delta[k] for k in phi0})
        s = validate(start_rule, family, seeds, args.horizon, "log")
        size = sum(float(d.square().sum()) for d in delta.values()) ** 0.5
        return f"| {label} | {size:.4g} | {s['meta_loss']:.4g} | {s['median_final_loss']:.4g} |"

    def random_like(d: torch.Tensor) -> torch.Tensor:
        z = torch.randn(d.shape, generator=gen, dtype=d.dtype) * (d != 0)  # where the run moved φ
        return z * (d.norm() / z.norm().clamp_min(1e-30))

    t0 = time.perf_counter()
    zero = {k: torch.zeros_like(v) for k, v in phi0.items()}
    rows = [scored("φ₀ (start)", zero), scored("φ₁ (end)", change)]
    rows += [scored(f"φ₀ + random change {i + 1}", {k: random_like(d) for k, d in change.items()})
             for i in range(args.random)]
    if args.per_tensor:
        rows += [scored(f"φ₀ + the change of `{key}` alone", {**zero, key: change[key]}) for key in phi0]
    command = "python benchmarks/meta_direction.py " + " ".join(shlex.quote(a) for a in argv)
    print(f"Command: `{command}` ({time.perf_counter() - t0:.0f} s; validation: {args.validation_tasks} "
          f"{args.family} tasks {kwargs}, {args.horizon} steps, mean log loss).\n")
    print("| φ | ‖change‖ | validation meta-loss | median final loss |\n| --- | ---: | ---: | ---: |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
