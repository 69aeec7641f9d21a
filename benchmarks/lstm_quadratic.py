"""LSTMOptimizer against tuned torch.optim baselines on the paper's 10-D quadratics.

Andrychowicz et al. 2016, Figure 2 (left): f(θ) = ‖Wθ − y‖², W (10×10), y and θ₀ IID standard
Gaussian, 100 steps. The learned optimizer runs with shipped weights as meta-trained (no lr
search); SGD, NAG (momentum 0.9), RMSprop and Adam get the learning rate with the lowest
median final loss on a half-decade grid over 3 tuning draws (seeds 10000–10002), then run on
20 held-out evaluation draws (seeds 0–19; meta-training never sees seeds below 10⁸).
Score = mean of the last 10 losses; median and interquartile range over the draws, because
a few ill-conditioned draws dominate any mean.

Usage: ``python benchmarks/lstm_quadratic.py --out results/lstm_quadratic --plot``
(about 20 s on 2 CPU cores). The meta-training time comes from the weights' JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from learned_optim import LSTMOptimizer
from learned_optim.benchmark import OptimizerSpec, baselines, format_table, plot_median_band, run_benchmark
from learned_optim.tasks import get_family

TARGET = 0.015  # the bound on the learned optimizer's median final loss


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in sorted(results, key=lambda r: r.quantile(0.5)):
        lstm = "lstm" in r.optimizer
        plot_median_band(ax, r, r.optimizer if lstm else f"{r.optimizer} (lr {r.lr:.2g})", highlight=lstm)
    ax.set(yscale="log", xlabel="step", ylabel="loss (median, IQR band; 20 draws)",
           title="10-D quadratics ‖Wθ − y‖²")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="quadratic", help="shipped weights name or path")
    parser.add_argument("--out", type=Path, default=Path("results/lstm_quadratic"))
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None, metavar="LR",
                        help="also run the weights with lr (the learned step × lr) tuned over these values, as "
                             "the baselines' lrs are: how far the step's scale, not its direction, is off")
    args = parser.parse_args(argv)
    if args.lr_grid is not None and not all(math.isfinite(lr) and lr > 0 for lr in args.lr_grid):
        parser.error(f"--lr-grid needs positive finite numbers, got {args.lr_grid}")

    probe = LSTMOptimizer([torch.zeros(1, requires_grad=True)], weights=args.weights)
    meta = probe.weights_metadata
    name = f"lstm-gac ({meta.get('name', args.weights)})"
    specs = dict(baselines())
    def learned(params, lr, task):
        return LSTMOptimizer(params, weights=args.weights, lr=lr)

    specs[name] = OptimizerSpec(name, learned, (1.0,))  # the default setting: lr 1
    if args.lr_grid is not None:
        specs[f"{name}, lr tuned"] = OptimizerSpec(f"{name}, lr tuned", learned, tuple(args.lr_grid))
    start = time.perf_counter()
    results = run_benchmark({"quadratic": (get_family("quadratic"), 100)}, specs,
                            eval_seeds=range(args.seeds), tune_seeds=(10_000, 10_001, 10_002), jobs=args.jobs)
    seconds = time.perf_counter() - start
    training = meta.get("meta_training", {})
    default = next(r for r in results if r.optimizer == name)
    best_baseline = min((r for r in results if r.optimizer in baselines()), key=lambda r: r.quantile(0.5))
    verdict = (default.quantile(0.5) <= TARGET and default.quantile(0.5) < best_baseline.quantile(0.5))
    lines = [
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv if argv is not None else __import__('sys').argv[1:])}` "
        f"({seconds:.0f} s, torch {torch.__version__}). {args.seeds} held-out draws, 100 steps; final loss = "
        "mean of the last 10 steps.",
        "",
        format_table(results),
        "",
        f"Weights `{meta.get('name')}`: meta-trained in {training.get('train_seconds', '?')} s on "
        f"{training.get('device', '?')} ({training.get('cpu_threads', '?')} CPU threads), "
        f"{training.get('episodes', '?')} episodes of {training.get('tasks_per_step', '?')} tasks; made by "
        f"`{meta.get('command', '?')}`.",
        "",
        f"Target (median ≤ {TARGET} and below every tuned baseline): "
        f"{'met' if verdict else 'NOT met'} — {default.quantile(0.5):.4g} vs best baseline "
        f"{best_baseline.optimizer} {best_baseline.quantile(0.5):.4g}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lstm_quadratic.md").write_text(text)
    (args.out / "lstm_quadratic.json").write_text(json.dumps(
        {"results": [r.to_json() for r in results], "weights": {k: v for k, v in meta.items() if k != "path"},
         "target_met": verdict}, indent=1, default=str))
    if args.plot:
        plot(results, args.out / "lstm_quadratic.png")
        print(f"wrote {args.out / 'lstm_quadratic.png'}")
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main())
