"""Meta-training speed: meta-steps per second of the meta-trainer on the built-in settings.

One meta-step is one truncation (U = 20 inner steps of K tasks, then backprop and Adam on φ).
For each setting, ``--episodes`` episodes (T/U meta-steps each) are timed after one warm-up
episode, on ``--device``; validation, checkpoints and logs are not part of the time.

Settings (the ones the shipped weights were trained with):
* ``quadratic``: LSTM+GAC, the paper's 10-D quadratics, K = 128 tasks, first order;
* ``quadratic-second-order``: the same with second-order meta-gradients;
* ``mnist-mlp``: LSTM+GAC with momentum inputs on the MNIST MLP mix, K = 1 (needs ``--data``);
* ``ntm-bfgs-quadratic``: NTM-BFGS on the 10-D quadratics, K = 128;
* ``suite-mix-relative``: the last meta-training stage of the LSTMOptimizer default (truncated
  BPTT on the whole rule, K = 2 tasks of the suite's families, reparametrized, with the paper's
  MNIST MLP, the quadratics (their loss offset by 0.01) eight times and the suite's tanh MLP twice
  in the mix), from the default weights (needs ``--data``);
* ``suite-mix-pes``: the last stage of the default before it, ``suite-steps-t500`` (PES, 4
  antithetic pairs, its two step-size tensors trained, the paper's MNIST MLP in the mix), from
  those weights (needs ``--data``);
* ``ntm-bfgs-suite-mix-pes``: the same for the NTMBFGS default's own last stage (the quadratics
  added to the mix; the heads' readout and the controller's read-input rows trained; needs ``--data``).

The suite settings time episodes of T = 100 (5 meta-steps): a meta-step's cost does not depend on
the episode's length, so seconds per meta-step times a recipe's meta-steps estimates its training time.

Usage: ``python benchmarks/meta_speed.py --out results/meta_speed [--data ../shared/data] [--device cuda]
[--precision float32 bf16] [--settings quadratic suite-mix-pes]`` (each setting once per precision:
``tf32`` needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from learned_optim.meta import PRECISIONS, MetaTrainConfig, MetaTrainer
from learned_optim.optim.lstm import DEFAULT_WEIGHTS
from learned_optim.optim.ntm import NTM_DEFAULT_WEIGHTS

MOMENTUM = {"momentum_decays": [0.5, 0.9, 0.99], "momentum_rms_decay": 0.99}


def settings(data: str | None) -> dict[str, dict]:
    out = {
        "quadratic": dict(rule="lstm-gac", task="quadratic", tasks_per_step=128),
        "quadratic-second-order": dict(rule="lstm-gac", task="quadratic", tasks_per_step=128, gradient="second-order"),
        "ntm-bfgs-quadratic": dict(rule="ntm-bfgs", task="quadratic", tasks_per_step=128),
    }
    if data:
        out["mnist-mlp"] = dict(rule="lstm-gac", rule_config=MOMENTUM, task="mnist-mlp-mix",
                                task_kwargs={"root": data, "examples_per_task": 2000}, tasks_per_step=1,
                                loss_transform="log")
        stage = dict(task="suite-mix", tasks_per_step=2, horizon=100, truncation=20, reparametrize=2.0,
                     loss_transform="log")
        paper_mlp = ["mnist-mlp", {"root": data, "part": "meta-train"}]
        tanh = ["mnist-mlp-nn", {"activation": "tanh", "image_side": 14, "widths": [32, 64], "root": data,
                                 "part": "meta-train"}]
        out["suite-mix-relative"] = dict(rule="lstm-gac", init_weights=DEFAULT_WEIGHTS, **stage, task_kwargs={
            "root": data, "extra": [paper_mlp, *[["quadratic", {"loss_offset": 0.01}]] * 8, tanh, tanh]})
        suite = dict(stage, estimator="pes", pes_pairs=4, task_kwargs={"root": data, "extra": [paper_mlp]})
        out["suite-mix-pes"] = dict(rule="lstm-gac", init_weights="suite-steps-t500", pes_sigma=0.001,
                                    trainable=["momentum_weight", "momentum_bias"], **suite)
        ntm_suite = dict(suite, task_kwargs={**suite["task_kwargs"], "extra": [*suite["task_kwargs"]["extra"], "quadratic"]})
        out["ntm-bfgs-suite-mix-pes"] = dict(  # the NTM defaults' last stage: the readout and read rows trained
            rule="ntm-bfgs", init_weights=NTM_DEFAULT_WEIGHTS, pes_sigma=0.01,
            trainable=["heads.readout.weight", "heads.readout.bias", "controller.core.weights.0[7:9]"], **ntm_suite)
    return out


def meta_steps_per_second(config: MetaTrainConfig, episodes: int) -> tuple[float, float, int]:
    """(meta-steps per second, seconds per episode, meta-steps skipped) over ``episodes`` timed
    episodes. A meta-step whose loss is not finite or explodes is skipped and ends its episode
    (MetaTrainer's rule); it counts as run, the rest of its episode does not."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = MetaTrainer(config, workdir, progress=False, log=None)
        trainer.run_episode()  # warm-up: allocator, caches, lazy state
        trainer.episode += 1
        skipped_before = trainer.skipped
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        steps = 0
        for _ in range(episodes):
            steps += len(trainer.run_episode())
            trainer.episode += 1
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        seconds = time.perf_counter() - start
        skipped = trainer.skipped - skipped_before
    return (steps + skipped) / seconds, seconds / episodes, skipped


def write_report(out: Path, argv: list[str], rows: list[dict], seconds: float, device: torch.device) -> str:
    """meta_speed.md and .json of the rows so far (rewritten after each row: a cut-off run keeps them)."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv)}` ({seconds:.0f} s, torch "
             f"{torch.__version__}, {where}). One meta-step = one truncation of 20 inner steps of K tasks.", "",
             "| setting | rule | K | gradient | estimator | precision | meta-steps / s | s / episode (5 meta-steps) "
             "| skipped |", "|---|---|---:|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['rule']} | {r['tasks_per_step']} | {r['gradient']} | {r['estimator']} "
                     f"| {r['precision']} | {r['meta_steps_per_second']:.3g} | {r['seconds_per_episode']:.3g} "
                     f"| {r['skipped']} |")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta_speed.md").write_text(text + "\n")
    (out / "meta_speed.json").write_text(json.dumps({"device": where, "rows": rows}, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="directory holding mnist/ (adds the MNIST setting)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=list(PRECISIONS))
    parser.add_argument("--settings", nargs="+", default=None, help="these settings only (default: all)")
    parser.add_argument("--out", type=Path, default=Path("results/meta_speed"))
    args = parser.parse_args(argv)
    available = settings(args.data)
    unknown = sorted(set(args.settings or []) - set(available))
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; known here: {sorted(available)}"
                     + ("" if args.data else " (mnist-mlp and the suite settings need --data)"))

    start = time.perf_counter()
    rows: list[dict] = []
    text = write_report(args.out, argv, rows, 0.0, torch.device(args.device))
    for name, kwargs in available.items():
        if args.settings and name not in args.settings:
            continue
        for precision in args.precision:
            config = MetaTrainConfig(device=args.device, episodes=10**6, precision=precision, **kwargs)
            rate, per_episode, skipped = meta_steps_per_second(config, args.episodes)
            rows.append({"setting": name, "rule": config.rule, "tasks_per_step": config.tasks_per_step,
                         "gradient": config.gradient, "estimator": config.estimator, "precision": precision,
                         "meta_steps_per_second": rate, "seconds_per_episode": per_episode, "skipped": skipped})
            print(json.dumps(rows[-1]), flush=True)
            text = write_report(args.out, argv, rows, time.perf_counter() - start, torch.device(args.device))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
