"""The paper's MNIST experiments (Andrychowicz et al. 2016, Figures 4 and 5) on held-out images.

Optimizee: an MLP with cross-entropy, minibatches of 128, θ₀ IID Gaussian, trained on the
2,000 *held-out* images of the MNIST test set (``mnist-mlp`` with ``part="held-out"``; the
learned optimizer is meta-trained on the other 8,000). Settings:

    base        1 hidden layer of 20 sigmoid units, 100 steps        (Figure 4)
    steps-200   the base net for 200 steps                           (Figure 5: generalization)
    hidden-40   40 hidden units
    layers-2    two hidden layers of 20
    relu        ReLU instead of sigmoid
    steps-1000  the base net for 1,000 steps (no divergence: loss at 1,000 below loss at 100)

SGD, NAG (momentum 0.9), RMSprop and Adam get the learning rate with the lowest median final
loss on a half-decade grid over 3 tuning seeds (10000–10002), per setting; the learned
optimizer runs as meta-trained (lr 1). Evaluation: 20 seeds (0–19: other initialisations and
minibatch streams). Final loss = mean of the last 10 minibatch losses; median and IQR.

Usage: ``python benchmarks/mnist_figures.py --data ../shared/data --out results/mnist --plot``
(``--weights NAME[,NAME…]`` picks shipped or saved weights, each run as its own optimizer and
checked against the targets; a name is LSTMOptimizer's weights, or ``KIND:WEIGHTS`` as in the
suite, e.g. ``ntm-bfgs:ntm-bfgs-suite`` for NTMBFGS; default: LSTMOptimizer's default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from learned_optim.benchmark import OptimizerSpec, baselines, format_table, plot_median_band, quantile, run_benchmark
from learned_optim.optim.lstm import DEFAULT_WEIGHTS
from learned_optim.suite import is_learned, learned_spec
from learned_optim.tasks import get_family

SETTINGS = {  # name: (family kwargs, steps)
    "base": ({}, 100),
    "steps-200": ({}, 200),
    "hidden-40": ({"hidden": (40,)}, 100),
    "layers-2": ({"hidden": (20, 20)}, 100),
    "relu": ({"activation": "relu"}, 100),
    "steps-1000": ({}, 1000),
}
RELU_TOLERANCE = 1.10  # "no worse than 10% above tuned Adam"
BASELINES = ("nag", "adam", "rmsprop", "sgd")


def settings_table(results, learned: Sequence[str]) -> str:
    """One row per setting, one column per optimizer: median (IQR), with the tuned lr of baselines."""
    by = {(r.task, r.optimizer): r for r in results}
    columns = [*learned, *BASELINES]
    lines = ["| setting | " + " | ".join(c if c in learned else f"tuned {c}" for c in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for setting in dict.fromkeys(r.task for r in results):
        cells = []
        for c in columns:
            r = by[(setting, c)]
            cell = f"{r.quantile(0.5):.3g} ({r.quantile(0.25):.3g}–{r.quantile(0.75):.3g})"
            cells.append(cell if c in learned else f"{cell} lr {r.lr:.3g}")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(results, learned: str) -> list[str]:
    """The issue's targets, each met or not, from the results."""
    by = {(r.task, r.optimizer): r for r in results}
    lines = []
    for setting in ("base", "steps-200", "hidden-40", "layers-2"):
        mine = by[(setting, learned)].quantile(0.5)
        best = min((r for r in results if r.task == setting and r.optimizer != learned), key=lambda r: r.quantile(0.5))
        ok = mine < best.quantile(0.5)
        lines.append(f"- {setting}: {mine:.4g} vs best tuned baseline {best.optimizer} {best.quantile(0.5):.4g}: "
                     f"{'below every baseline' if ok else 'NOT below every baseline'}")
    mine, adam = by[("relu", learned)].quantile(0.5), by[("relu", "adam")].quantile(0.5)
    lines.append(f"- relu: {mine:.4g} vs tuned Adam {adam:.4g} (ratio {mine / adam:.2f}): "
                 f"{'within' if mine <= RELU_TOLERANCE * adam else 'NOT within'} 10% of Adam")
    curves = by[("steps-1000", learned)].curves
    at_100 = curves[:, 90:100].mean(1)
    at_1000 = curves[:, -10:].mean(1)
    falls = int((at_1000 < at_100).sum())
    lines.append(f"- steps-1000: loss at step 1,000 below loss at step 100 on {falls}/{len(at_100)} seeds "
                 f"(median {quantile(at_1000.tolist(), 0.5):.4g} vs {quantile(at_100.tolist(), 0.5):.4g})")
    return lines


def plot(results, learned: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    ran = [name for name in SETTINGS if any(r.task == name for r in results)]
    for ax in axes.flat[len(ran):]:
        ax.set_visible(False)
    for ax, setting in zip(axes.flat, ran):
        for r in sorted((r for r in results if r.task == setting), key=lambda r: r.optimizer not in learned):
            mine = r.optimizer in learned
            plot_median_band(ax, r, r.optimizer if mine else f"{r.optimizer} (lr {r.lr:.2g})", highlight=mine)
        ax.set(yscale="log", title=setting, xlabel="step", ylabel="minibatch loss (median, IQR)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learned_optimizers(names: Iterable[str]) -> dict[str, tuple[OptimizerSpec, dict]]:
    """The learned optimizers to run, by report name ("lstm-gac (NAME)", "ntm-bfgs (NAME)"): each
    entry is LSTMOptimizer's weights, or ``KIND:WEIGHTS`` (``ntm-bfgs:ntm-bfgs-suite``), at its
    default settings (lr 1), with its weights' metadata."""
    chosen = {}
    for entry in names:
        kind, weights = entry.split(":", 1) if is_learned(entry) else ("lstm-gac", entry)
        spec = learned_spec(f"{kind}:{weights}")
        probe = spec.factory([torch.zeros(1, requires_grad=True)], 1.0, None)
        name = f"{kind} ({probe.weights_metadata.get('name') or weights})"
        chosen[name] = (OptimizerSpec(name, spec.factory, (1.0,)), probe.weights_metadata)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="directory holding mnist/ (default: $LEARNED_OPTIM_DATA)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                        help="learned optimizer weights (names or paths, comma-separated)")
    parser.add_argument("--out", type=Path, default=Path("results/mnist"))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args(argv)

    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    tasks = {name: (get_family("mnist-mlp", root=args.data, part="held-out", **SETTINGS[name][0]), SETTINGS[name][1])
             for name in chosen}
    specs = dict(baselines())
    mine = learned_optimizers(w.strip() for w in args.weights.split(",") if w.strip())
    learned = list(mine)
    metadata = {name: meta for name, (_, meta) in mine.items()}
    specs.update({name: spec for name, (spec, _) in mine.items()})
    start = time.perf_counter()
    results = run_benchmark(tasks, specs, eval_seeds=range(args.seeds), tune_seeds=(10_000, 10_001, 10_002),
                            jobs=args.jobs, log=print)
    seconds = time.perf_counter() - start
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Command: `{command}` ({seconds:.0f} s, torch {torch.__version__}); {args.seeds} seeds, "
             "2,000 held-out MNIST images; final loss = mean of the last 10 minibatch losses.", "",
             "Median (IQR) per setting:", "", settings_table(results, learned), "",
             "Ranked per setting:", "", format_table(results), ""]
    if set(SETTINGS) <= set(chosen):
        for name in learned:
            others = [r for r in results if r.optimizer == name or r.optimizer not in learned]
            lines += [f"Targets, {name}:", *verdicts(others, name), ""]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mnist.md").write_text(text)
    (args.out / "mnist.json").write_text(json.dumps({"results": [r.to_json() for r in results],
                                                     "weights": metadata}, indent=1, default=str))
    if args.plot:
        plot(results, learned, args.out / "mnist.png")
        print(f"wrote {args.out / 'mnist.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
