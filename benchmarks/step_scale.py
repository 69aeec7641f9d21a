"""Calibrate a learned rule's step size on held-out tasks: the rule's output times κ, for a few κ,
scored by the meta-trainer's validation; writes the weights with the best κ built in.

    python benchmarks/step_scale.py --weights suite --scales 0.5 0.7 1 --data ../shared/data --out runs/suite-k

A rule's step g_t = s·(wᵀh + b) + Σ_j (u_jᵀh + c_j)·d_j is linear in (w, b, u, c): multiplying
them by κ gives exactly κ·g_t from the same LSTM state, i.e. the optimizer at ``lr=κ`` without
the user passing one. Meta-training by truncated unrolls prefers steps larger than the best
for long runs (see the README's suite section); this one-dimensional search scores the whole
horizon instead. Prints a markdown table; ``--out`` writes the weights at the best κ (lowest
validation meta-loss, or with ``--select-by median_final_loss`` the lowest median final loss),
their metadata naming this command and the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from learned_optim.meta.trainer import VALIDATION_SEED_BASE, validate
from learned_optim.rules import load_rule, save_rule
from learned_optim.rules.lstm_gac import LSTMGACRule
from learned_optim.tasks import get_family

STEP_TENSORS = ("output_weight", "output_bias", "momentum_weight", "momentum_bias")  # g_t is linear in these


def scaled(rule: LSTMGACRule, factor: float) -> dict[str, torch.Tensor]:
    """φ with the output's step tensors multiplied by ``factor`` (the rest unchanged)."""
    return {k: v.detach().clone() * factor if k in STEP_TENSORS else v.detach().clone()
            for k, v in rule.state_dict().items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/step_scale.py")
    parser.add_argument("--weights", required=True, help="LSTM+GAC weights (a shipped name or a path)")
    parser.add_argument("--scales", type=float, nargs="+", required=True, help="the factors κ to score")
    parser.add_argument("--family", default="suite-mix")
    parser.add_argument("--family-kwargs", default='{"part": "held-out"}', help="JSON keyword arguments")
    parser.add_argument("--data", default=None, help="MNIST directory (families that read it)")
    parser.add_argument("--validation-tasks", type=int, default=6)
    parser.add_argument("--horizon", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--select-by", default="meta_loss", choices=["meta_loss", "median_final_loss"],
                        help="the validation score whose lowest value picks κ (the meta-trainer's choices: the mean "
                             "log loss over the run, or the median over tasks of the final loss)")
    parser.add_argument("--out", default=None, help="write the weights at the best κ here (PATH.json/.safetensors)")
    args = parser.parse_args(argv)
    if any(not k > 0 for k in args.scales):
        parser.error(f"--scales must be positive, got {args.scales}")
    kwargs = json.loads(args.family_kwargs)
    if args.data is not None:
        kwargs.setdefault("root", args.data)
    torch.set_num_threads(args.threads)
    rule, metadata = load_rule(args.weights, expected_rule="lstm-gac")
    original = scaled(rule, 1.0)
    family = get_family(args.family, **kwargs)
    seeds = [VALIDATION_SEED_BASE + k for k in range(args.validation_tasks)]
    start = time.perf_counter()
    results = []
    for factor in args.scales:
        rule.load_state_dict({k: v * factor if k in STEP_TENSORS else v for k, v in original.items()})
        results.append((factor, validate(rule, family, seeds, args.horizon, "log")))
    best_factor, best = min(results, key=lambda r: r[1][args.select_by])
    command = "python benchmarks/step_scale.py " + " ".join(shlex.quote(a) for a in argv)
    lines = [f"Command: `{command}` ({time.perf_counter() - start:.0f} s; validation: {args.validation_tasks} "
             f"{args.family} tasks {kwargs}, {args.horizon} steps, mean log loss; κ picked by "
             f"{args.select_by}).", "",
             "| κ | validation meta-loss | median final loss |", "| ---: | ---: | ---: |"]
    lines += [f"| {k:g} | {s['meta_loss']:.4g} | {s['median_final_loss']:.4g} |" for k, s in results]
    print("\n".join(lines))
    if args.out is not None:
        rule.load_state_dict({k: v * best_factor if k in STEP_TENSORS else v for k, v in original.items()})
        # The source's provenance moves under step_scale: its commands made the source, not these weights,
        # and its scores are not these weights' scores.
        own = ("format", "name", "rule", "config", "tensors_sha256", "torch_version", "date")
        source = {k: v for k, v in metadata.items() if k not in own}
        meta = {"step_scale": {"from": str(args.weights), "factor": best_factor, "command": command,
                               "select_by": args.select_by,
                               "validation": [{"factor": k, **s} for k, s in results], "source": source}}
        path = save_rule(rule, args.out, meta)
        print(f"\nwrote {path} (κ = {best_factor:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
