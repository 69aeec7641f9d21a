"""Why the parameter-relative default trails tuned Adam on the paper's quadratics: the step
grows with RMS(θ_t), and on a quadratic whose solution lies far from θ₀ that growth carries the
step past the curvature's stable size.

    python benchmarks/relative_scale.py --out results/relative-scale

For the default weights (or ``--weights``), on the main benchmark's quadratics (10-D, 100 steps,
seeds 0..9, final loss the mean of the last 10 steps, as ``learned-optim benchmark``) and on
some of the suite's tasks (their steps and final-loss window, evaluation seeds):

* ``as shipped``: the step is multiplied by each tensor's factor as the weights' config says (RMS(θ_t) + ε_θ,
  floored and discounted where ``relative_floor`` and ``shrink_discount`` are set);
* ``scale frozen at θ₀`` (an ablation, not an option of the package): each tensor's factor is
  taken once, at the first step, from θ₀, and kept;
* ``scale floored at θ₀'s``: the same weights with the package's ``relative_floor`` option, each
  tensor's factor max(s_t, s_0), so it follows θ up but not down;
* ``floored, shrink-discounted``: with ``shrink_discount`` too, max(s_0, s_t·m_t/s_0), m_t the lowest
  factor so far: growth after a shrink counts at the shrink's ratio;
* ``dead zone K×`` (``--dead-zone K``, another ablation): max(s_0, s_t − (K − 1)·s_0), the factor held
  at s_0 until θ's RMS passes K× its start and following its growth beyond.

``--hand-step C`` (another ablation) replaces the learned step sizes by a constant: the step is
−C·d on the β = 0.9 momentum direction d = m̂/√v̂ only, times the same factor, i.e. Adam with
lr = C·(RMS(θ_t) + ε_θ) (the LSTM still runs, unused). ``--quadratic-seeds`` sets the quadratics'
seeds apart from the suite tasks' (their median is heavy-tailed: 10 seeds hardly pin it down).

Per run it records the final loss, the growth RMS(θ_T)/RMS(θ₀) of the largest tensor, the lowest
RMS(θ_t)/RMS(θ₀) it reached on the way (below 1: it shrank first) and the spikes: steps whose loss exceeds 10× the lowest loss so far. Writes OUT/relative_scale.md and
OUT/relative_scale.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from learned_optim import LSTMOptimizer, suite
from learned_optim.benchmark import final_loss as benchmark_final_loss
from learned_optim.benchmark import train
from learned_optim.optim.lstm import DEFAULT_WEIGHTS
from learned_optim.rules import LSTMGACConfig, LSTMGACRule, load_rule
from learned_optim.tasks.synthetic import QuadraticFamily

MODES = ("as shipped", "scale frozen at θ₀", "scale floored at θ₀'s", "floored, shrink-discounted")
DEAD_ZONE = "dead zone "  # a mode "dead zone K×" (--dead-zone K)
SPIKE_FACTOR = 10.0  # a spike: a loss above this many times the lowest loss so far


def _replace_scales(optimizer: LSTMOptimizer, factor: Callable[[Any, Any], Any]) -> None:
    """Make ``optimizer`` use ``factor(s_t, s_0)`` for each tensor's RMS(θ_t) + ε_θ, s_0 the value at the
    tensor's first step (an ablation; a floor or discount in the config then sees these factors)."""
    rule = optimizer.rule
    computed = rule.tensor_param_scales
    first: dict[tuple[int, ...], list[torch.Tensor] | list[float]] = {}

    def replaced(params: Sequence[torch.Tensor]) -> list:
        key = tuple(p.data_ptr() for p in params)
        current = computed(params)  # fresh floats or 0-d tensors, which no step writes to
        start = first.setdefault(key, current)
        return [factor(s_t, s_0) for s_t, s_0 in zip(current, start)]

    rule.tensor_param_scales = replaced  # type: ignore[method-assign]


def freeze_scales(optimizer: LSTMOptimizer) -> None:
    """Make ``optimizer`` keep each tensor's RMS(θ) + ε_θ from its first step (the ablation)."""
    _replace_scales(optimizer, lambda s_t, s_0: s_0)


def dead_zone_scales(optimizer: LSTMOptimizer, k: float) -> None:
    """Make ``optimizer``'s factor max(s_0, s_t − (k − 1)·s_0): held at s_0 until θ's RMS passes k× its
    start, then following its growth (the ablation)."""
    _replace_scales(optimizer, lambda s_t, s_0: max(s_0, s_t - (k - 1) * s_0))


def optimizer_for(params: list[torch.Tensor], weights: str, mode: str) -> LSTMOptimizer:
    """``LSTMOptimizer`` with ``weights`` in one of :data:`MODES` (floored: their config with
    ``relative_floor``, and ``shrink_discount`` as said; frozen: the ablation :func:`freeze_scales`)."""
    if mode in MODES[2:]:
        rule, _ = load_rule(weights, expected_rule="lstm-gac")
        floored = LSTMGACRule(LSTMGACConfig(**{**rule.config.to_dict(), "relative_floor": True,
                                               "shrink_discount": mode == MODES[3]}))
        floored.load_state_dict(rule.state_dict())  # the floor and the discount add no tensor
        return LSTMOptimizer(params, weights=floored)
    optimizer = LSTMOptimizer(params, weights=weights)
    if mode == MODES[1]:
        freeze_scales(optimizer)
    elif mode.startswith(DEAD_ZONE):
        dead_zone_scales(optimizer, float(mode[len(DEAD_ZONE):].rstrip("×")))
    return optimizer


def spikes(losses: torch.Tensor) -> int:
    """Steps whose loss is over SPIKE_FACTOR × the lowest loss before them."""
    lowest = torch.cummin(losses, 0).values
    return int((losses[1:] > SPIKE_FACTOR * lowest[:-1]).sum())


def hand_step(optimizer: LSTMOptimizer, size: float) -> None:
    """Replace ``optimizer``'s learned step sizes by −``size`` on its β = 0.9 direction (the ablation)."""
    rule = optimizer.rule
    with torch.no_grad():
        rule.momentum_weight.zero_()
        rule.momentum_bias.zero_()
        rule.momentum_bias[rule.config.main_momentum_row] = -size


def run(task, steps: int, weights: str, mode: str, hand: float | None = None) -> dict:
    """One run: its losses' summary and the largest tensor's RMS growth."""
    rms: list[float] = []  # RMS of the largest tensor: θ₀, then after each step

    def make(params: list[torch.Tensor]) -> LSTMOptimizer:
        largest = max(params, key=lambda p: p.numel())
        rms.append(float(largest.detach().square().mean().sqrt()))
        optimizer = optimizer_for(params, weights, mode)
        if hand is not None:
            hand_step(optimizer, hand)
        step = optimizer.step

        def step_and_record(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            rms.append(float(largest.detach().square().mean().sqrt()))
            return out

        optimizer.step = step_and_record  # type: ignore[method-assign]
        return optimizer

    losses = train(task, make, steps)
    ratios = [r / rms[0] if rms[0] > 0 else float("inf") for r in rms]
    return {"losses": losses, "growth": ratios[-1], "lowest": min(ratios), "spikes": spikes(losses)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--tasks", nargs="*", default=["mlp-paper-100", "mlp-relu", "mlp-tanh"],
                        help="suite tasks beside the quadratics")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 of each task")
    parser.add_argument("--quadratic-seeds", type=int, default=None,
                        help="seeds 0..N-1 of the quadratics (default: --seeds)")
    parser.add_argument("--hand-step", type=float, default=None, metavar="C",
                        help="ablation: the learned step sizes replaced by C on the β = 0.9 direction")
    parser.add_argument("--dead-zone", type=float, nargs="*", default=[], metavar="K",
                        help="ablation modes: the factor held at s_0 until θ's RMS passes K× its start")
    parser.add_argument("--data", default="../shared/data", help="MNIST directory (the suite's MNIST tasks)")
    parser.add_argument("--out", type=Path, default=Path("results/relative-scale"))
    args = parser.parse_args(argv)
    for name in ("seeds", "quadratic_seeds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if any(not k > 1 for k in args.dead_zone):
        parser.error(f"--dead-zone factors must exceed 1, got {args.dead_zone}")
    modes = MODES + tuple(f"{DEAD_ZONE}{k:g}×" for k in args.dead_zone)
    if args.hand_step is not None and not args.hand_step > 0:
        parser.error(f"--hand-step must be a positive step size, got {args.hand_step}")
    quadratic_seeds = args.seeds if args.quadratic_seeds is None else args.quadratic_seeds
    torch.set_num_threads(1)
    known = {t.name: t for t in suite.SUITE}
    unknown = [name for name in args.tasks if name not in known]
    if unknown:
        parser.error(f"unknown suite tasks {unknown}; the suite has {sorted(known)}")

    start = time.perf_counter()
    cases = [("quadratic", QuadraticFamily(), 100, benchmark_final_loss, quadratic_seeds)]
    cases += [(name, known[name].build(args.data), known[name].steps, suite.final_loss, args.seeds)
              for name in args.tasks]
    rows = []
    for name, family, steps, final, seeds in cases:
        for mode in modes:
            runs = [run(family.sample(seed), steps, args.weights, mode, args.hand_step) for seed in range(seeds)]
            finals = [final(r["losses"]) for r in runs]
            row = {"task": name, "mode": mode, "steps": steps, "seeds": seeds, "finals": finals,
                   "median_final": statistics.median(finals),
                   "median_growth": statistics.median(r["growth"] for r in runs),
                   "lowest": [r["lowest"] for r in runs],
                   "max_growth": max(r["growth"] for r in runs),
                   "seeds_with_spikes": sum(r["spikes"] > 0 for r in runs)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("finals", "lowest")}), flush=True)
    seconds = time.perf_counter() - start

    command = f"python benchmarks/{Path(__file__).name} {shlex.join(argv)}".strip()
    rule = "the learned step" if args.hand_step is None else f"steps replaced by {args.hand_step:g}·d (hand)"
    lines = [f"Command: `{command}` ({seconds:.0f} s, weights `{args.weights}`, {rule}, one thread). Growth: RMS(θ_T)/RMS(θ₀) of each run's largest tensor, lowest: the least RMS(θ_t)/RMS(θ₀) on the way; spikes: a loss over "
             f"{SPIKE_FACTOR:g}× the lowest before it.", "",
             "| task | steps | seeds | scale | median final loss | median growth | max growth | lowest RMS / start (min–max over seeds) | seeds with spikes |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['steps']} | 0..{r['seeds'] - 1} | {r['mode']} | {r['median_final']:.4g} | "
                     f"{r['median_growth']:.2f} | {r['max_growth']:.2f} | {min(r['lowest']):.2f}–{max(r['lowest']):.2f} | "
                     f"{r['seeds_with_spikes']}/{r['seeds']} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relative_scale.md").write_text(text + "\n")
    (args.out / "relative_scale.json").write_text(json.dumps({"command": command, "weights": args.weights, "hand_step": args.hand_step,
                                                              "seconds": seconds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
