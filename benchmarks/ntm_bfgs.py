"""NTM-BFGS against LSTM+GAC, torch.optim.LBFGS and tuned first-order baselines.

Tasks (100 steps each, 20 held-out draws, seeds 0–19; meta-training never sees seeds below
10⁸): the paper's 10-D quadratics ‖Wθ − y‖² (W Gaussian) and 50-D ill-conditioned
quadratics (Hessian condition number 10⁴, ``ill-conditioned-quadratic``). The learned
optimizers run with shipped weights as meta-trained (no lr search): NTM-BFGS
``ntm-bfgs-quadratic`` and LSTM+GAC ``quadratic`` (both meta-trained on the 10-D family
only). SGD, NAG, RMSprop and Adam get the lr with the lowest median final loss on a
half-decade grid over 3 tuning draws. ``torch.optim.LBFGS`` runs one iteration per step with
its strong-Wolfe line search (lr 1, history 10): each of its steps may evaluate f and ∇f up
to 25 times, where every other optimizer evaluates them once. Score = mean of the last 10
losses; median and IQR over the draws.

With ``--data DIR`` (holding mnist/), also the MNIST MLP of the paper (held-out images, 20
draws, 100 steps): limited-memory NTM-BFGS ``ntm-bfgs-mnist`` against the LSTM default
``mnist`` and tuned Adam/NAG.

Usage: ``python benchmarks/ntm_bfgs.py --out results/ntm_bfgs --plot [--data ../shared/data]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from learned_optim import NTMBFGS, LSTMOptimizer
from learned_optim.benchmark import OptimizerSpec, baselines, format_table, plot_median_band, run_benchmark
from learned_optim.tasks import get_family


class LBFGSPerStep:
    """torch.optim.LBFGS driven like the others (``zero_grad``, ``step()``): one iteration per
    step, the task's loss as its closure (it needs f for the line search)."""

    def __init__(self, params, task, lr: float = 1.0) -> None:
        self.params, self.task = params, task
        self.inner = torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=10, line_search_fn="strong_wolfe")
        self.evaluations = 0

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def _closure(self) -> torch.Tensor:
        self.evaluations += 1
        self.inner.zero_grad()
        loss = self.task.loss(self.params)
        loss.backward()
        return loss

    def step(self) -> None:
        self.inner.step(self._closure)


def specs(ntm_weights: str, lstm_weights: str, with_lbfgs: bool = True,
          first_order: tuple[str, ...] = ("sgd", "nag", "rmsprop", "adam")) -> dict[str, OptimizerSpec]:
    out = {name: spec for name, spec in baselines().items() if name in first_order}
    if with_lbfgs:
        out["lbfgs"] = OptimizerSpec("lbfgs", lambda p, lr, t: LBFGSPerStep(p, t, lr), (1.0,))
    out[f"lstm-gac ({lstm_weights})"] = OptimizerSpec(
        f"lstm-gac ({lstm_weights})", lambda p, lr, t: LSTMOptimizer(p, weights=lstm_weights, lr=lr), (1.0,))
    out[f"ntm-bfgs ({ntm_weights})"] = OptimizerSpec(
        f"ntm-bfgs ({ntm_weights})", lambda p, lr, t: NTMBFGS(p, weights=ntm_weights, lr=lr), (1.0,))
    return out


def plot(sections: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(6.0 * len(sections), 4.2))
    axes = [axes] if len(sections) == 1 else list(axes)
    for ax, (title, results) in zip(axes, sections.items()):
        for r in sorted(results, key=lambda r: r.quantile(0.5)):
            learned = r.optimizer.startswith(("ntm", "lstm"))
            label = r.optimizer if learned or r.optimizer == "lbfgs" else f"{r.optimizer} (lr {r.lr:.2g})"
            plot_median_band(ax, r, label, highlight=r.optimizer.startswith("ntm"))
        ax.set(yscale="log", xlabel="step", ylabel="loss (median, IQR band)", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ntm-weights", default="ntm-bfgs-quadratic")
    parser.add_argument("--lstm-weights", default="quadratic")
    parser.add_argument("--data", default=None, help="directory holding mnist/ (adds the MNIST comparison)")
    parser.add_argument("--out", type=Path, default=Path("results/ntm_bfgs"))
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    tune = (10_000, 10_001, 10_002)
    sections = {}
    tasks = {"10-D quadratics": ("quadratic", get_family("quadratic"), 100),
             "50-D quadratics, condition 1e4": ("ill-conditioned-quadratic", get_family("ill-conditioned-quadratic"), 100)}
    for title, (name, family, steps) in tasks.items():
        sections[title] = run_benchmark({name: (family, steps)}, specs(args.ntm_weights, args.lstm_weights),
                                        eval_seeds=range(args.seeds), tune_seeds=tune, jobs=args.jobs)
    if args.data:
        family = get_family("mnist-mlp", root=args.data, part="held-out")
        sections["MNIST MLP (held-out)"] = run_benchmark(
            {"mnist-mlp": (family, 100)}, specs("ntm-bfgs-mnist", "mnist", with_lbfgs=False, first_order=("nag", "adam")),
            eval_seeds=range(args.seeds), tune_seeds=tune, jobs=args.jobs)
    seconds = time.perf_counter() - start

    lines = [f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv)}` ({seconds:.0f} s, "
             f"torch {torch.__version__}). {args.seeds} held-out draws; final loss = mean of the last 10 steps.", ""]
    verdicts = {}
    for title, results in sections.items():
        lines += [f"**{title}**", "", format_table(results), ""]
        ntm = next(r for r in results if r.optimizer.startswith("ntm"))
        others = [r for r in results if r is not ntm and r.optimizer != "lbfgs"]
        best = min(others, key=lambda r: r.quantile(0.5))
        verdicts[title] = ntm.quantile(0.5) < best.quantile(0.5)
        lines += [f"NTM-BFGS median {ntm.quantile(0.5):.4g} vs the best of LSTM+GAC and the tuned first-order "
                  f"baselines, {best.optimizer} {best.quantile(0.5):.4g}: {'below' if verdicts[title] else 'NOT below'}.", ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ntm_bfgs.md").write_text(text)
    (args.out / "ntm_bfgs.json").write_text(json.dumps(
        {title: [r.to_json() for r in results] for title, results in sections.items()} | {"below_best": verdicts},
        indent=1, default=str))
    if args.plot:
        plot(sections, args.out / "ntm_bfgs.png")
        print(f"wrote {args.out / 'ntm_bfgs.png'}")
    return 0 if verdicts["10-D quadratics"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
