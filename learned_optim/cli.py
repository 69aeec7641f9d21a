"""Command line: ``learned-optim`` (or ``python -m learned_optim``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from . import __version__, registry
from .meta.estimators import ESTIMATORS
from .meta.unroll import GRADIENT_MODES, PRECISIONS
from .tasks import families, get_family

if TYPE_CHECKING:
    from .meta import MetaTrainConfig

__all__ = ["main"]


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _cmd_list(args: argparse.Namespace) -> int:
    print("optimizers:")
    for name in registry.available():
        print(f"  {name:<24} {registry.info(name).summary}")
    print("baselines (benchmark only): sgd, nag, rmsprop, adam")
    print("task families:", ", ".join(families()))
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from . import benchmark

    baseline_specs = benchmark.baselines()
    wanted = _csv(args.optimizers) if args.optimizers != "all" else list(baseline_specs) + registry.available()
    specs = {}
    with _argument_errors(args):
        for name in wanted:
            if name in baseline_specs:
                specs[name] = baseline_specs[name]
            else:
                specs.update(benchmark.package_optimizers([name]))  # KeyError lists what exists
        family_kwargs = {"mnist-mlp": {"root": args.data}} if args.data else {}
        tasks = benchmark.default_tasks(_csv(args.tasks), args.steps, **family_kwargs)
        for name in ("steps", "seeds", "tune_seeds", "jobs"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    eval_seeds = list(range(args.seeds))
    tune_seeds = [10_000 + i for i in range(args.tune_seeds)]
    print(
        f"learned_optim {__version__} benchmark: {len(tasks)} tasks x {len(specs)} optimizers, "
        f"lr tuned on {len(tune_seeds)} seeds over a half-decade grid, {len(eval_seeds)} evaluation seeds"
    )
    start = time.perf_counter()
    results = benchmark.run_benchmark(
        tasks, specs, eval_seeds=eval_seeds, tune_seeds=tune_seeds, jobs=args.jobs, log=print
    )
    elapsed = time.perf_counter() - start
    header = (
        f"Final loss = mean of the last 10 steps; median and IQR over {len(eval_seeds)} seeds; "
        f"lr tuned on {len(tune_seeds)} separate seeds. Command: `learned-optim {' '.join(args.argv)}` "
        f"({elapsed:.0f} s with {args.jobs} worker process(es), torch {torch.__version__})."
    )
    table = benchmark.format_table(results)
    print()
    print(table)
    out = benchmark.save_results(results, args.out, header)
    print(f"\nwrote {out / 'benchmark.md'} and {out / 'benchmark.json'}")
    if args.plot:
        path = benchmark.plot_results(results, out / "benchmark.png")
        print(f"wrote {path}")
    return 0


def evaluate_dropin(rule, family, seeds: Sequence[int], steps: int) -> dict:
    """Train each held-out task with the drop-in optimizer of ``rule``; the benchmark's score."""
    from . import benchmark

    cls = cast(Any, registry.info(rule.name).cls)  # a learned optimizer: takes weights=
    finals = []
    for seed in seeds:
        task = family.sample(seed)
        finals.append(benchmark.final_loss(benchmark.train(task, lambda p: cls(p, weights=rule), steps)))
    return {
        "seeds": f"{seeds[0]}..{seeds[-1]}",
        "steps": steps,
        "score": "median over seeds of the mean of the last 10 losses",
        "median_final_loss": benchmark.quantile(finals, 0.5),
        "q25": benchmark.quantile(finals, 0.25),
        "q75": benchmark.quantile(finals, 0.75),
        "diverged": sum(not (f < float("inf")) for f in finals),
    }


def _start_distributed(device: str) -> tuple[int, str]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs);
    returns this process's rank and the device it meta-trains on (its own GPU)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), device


def _cmd_meta_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    rank, args.device = _start_distributed(args.device)
    try:
        return _meta_train(args, rank)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _json_argument(text: str | None, flag: str) -> dict:
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} is not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


@contextlib.contextmanager
def _argument_errors(args: argparse.Namespace) -> Iterator[None]:
    """Bad arguments (an unknown name, a bad --task path, bad JSON, a bad value) end the command
    as argparse does: one line naming what is wrong, and exit status 2."""
    try:
        yield
    except (KeyError, ValueError, TypeError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        args.parser.error(str(message))


def _meta_train(args: argparse.Namespace, rank: int) -> int:
    with _argument_errors(args):
        trainer, eval_family, eval_task, eval_kwargs, task_kwargs = _meta_trainer(args)
    config = trainer.config
    if rank == 0:
        world = f", {trainer.world} processes" if trainer.world > 1 else ""
        print(f"meta-training {config.rule} on {config.task} ({trainer.device}{world}); "
              f"checkpoints and log in {trainer.workdir}/")
    summary = trainer.train()
    if rank != 0:  # rank 0 evaluates and writes the weights
        return 0
    print(f"trained {summary['episodes']} episodes ({summary['meta_steps']} meta-steps) in "
          f"{summary['train_seconds']:.0f} s; kept the weights of episode {summary['best_validation']['episode']} "
          f"(validation meta-loss {summary['best_validation']['meta_loss']:.4g}, median final loss "
          f"{summary['best_validation']['median_final_loss']:.4g})")
    trainer.rule.load_state_dict(trainer.best_rule)
    rule = trainer.rule.to("cpu").eval()
    evaluation = evaluate_dropin(rule, eval_family, list(range(args.eval_seeds)), config.horizon)
    evaluation["family"] = eval_task
    evaluation["family_kwargs"] = {k: v for k, v in eval_kwargs.items() if k != "root"}
    command = shlex.join(["learned-optim", *args.argv])  # copy-pasteable into a shell
    path = trainer.save_weights(args.out, {
        "task": {"family": config.task, "kwargs": {k: v for k, v in task_kwargs.items() if k != "root"}},
        "meta_training": {**config.to_dict(), **summary, "cpu_threads": torch.get_num_threads(),
                          "processes": trainer.world},
        "command": command,
        "evaluation": evaluation,
    })
    print(f"wrote {path} and {path.with_suffix('.safetensors')}")
    where = eval_task + (f" {json.dumps(evaluation['family_kwargs'])}" if evaluation["family_kwargs"] else "")
    print(f"evaluation on {where}, seeds 0..{args.eval_seeds - 1} (never meta-trained on), {config.horizon} steps, "
          f"drop-in optimizer: median final loss {evaluation['median_final_loss']:.4g} "
          f"(IQR {evaluation['q25']:.4g} – {evaluation['q75']:.4g}, {evaluation['diverged']} diverged)")
    return 0


def meta_train_config(args: argparse.Namespace) -> tuple[MetaTrainConfig, dict[str, Any]]:
    """The :class:`MetaTrainConfig` and task arguments that ``learned-optim meta-train`` ARGS runs
    (also how a recorded command is checked against the settings its weights record)."""
    from .meta import MetaTrainConfig

    task_kwargs = _json_argument(args.task_kwargs, "--task-kwargs")
    if args.data:
        task_kwargs["root"] = args.data
    config = MetaTrainConfig(
        rule=args.rule, rule_config=_json_argument(args.rule_config, "--rule-config"),
        init_weights=args.init_weights, init_controller=args.init_controller,
        task=args.task, task_kwargs=task_kwargs, horizon=args.horizon, horizon_min=args.horizon_min,
        validation_horizon=args.validation_horizon, burn_in=args.burn_in, reparametrize=args.reparametrize, truncation=args.truncation,
        tasks_per_step=args.tasks_per_step, episodes=args.episodes, time_limit=args.time_limit,
        meta_lr=args.meta_lr, meta_lr_schedule=args.meta_lr_schedule, clip_grad_norm=args.clip_grad_norm, gradient=args.gradient,
        estimator=args.estimator, pes_sigma=args.pes_sigma, pes_pairs=args.pes_pairs, trainable=args.trainable,
        loss_transform=args.loss_transform, select_by=args.select_by, validate_every=args.validate_every,
        validation_tasks=args.validation_tasks, checkpoint_every=args.checkpoint_every,
        validation_task_kwargs=_json_argument(args.validation_task_kwargs, "--validation-task-kwargs") or None,
        seed=args.seed, device=args.device, precision=args.precision,
    )
    return config, task_kwargs


def _meta_trainer(args: argparse.Namespace):
    """The trainer and the final evaluation's family, every argument checked before training starts."""
    from .meta import MetaTrainer

    if args.eval_seeds < 1:
        raise ValueError(f"--eval-seeds must be a positive integer, got {args.eval_seeds}")
    config, task_kwargs = meta_train_config(args)
    eval_task = args.eval_task or config.task
    eval_kwargs = _json_argument(args.eval_task_kwargs, "--eval-task-kwargs") if args.eval_task_kwargs else (
        {} if args.eval_task else {k: v for k, v in task_kwargs.items() if k != "root"})
    if args.data:
        eval_kwargs["root"] = args.data
    eval_family = get_family(eval_task, **eval_kwargs)
    workdir = args.workdir or f"{args.out}.run"
    trainer = MetaTrainer(config, workdir, progress=not args.no_progress,
                          command=shlex.join(["learned-optim", *args.argv]))
    return trainer, eval_family, eval_task, eval_kwargs, task_kwargs


def _cmd_export(args: argparse.Namespace) -> int:
    """Write the best validated φ of a meta-training run's checkpoint (the run may go on), or with
    ``--latest`` the φ it holds now (for when the validation's horizon is not the one of interest)."""
    from pathlib import Path

    from .meta.trainer import CHECKPOINT
    from .rules import load_rule, rule_from_config, save_rule

    path = Path(args.workdir) / CHECKPOINT
    if not path.is_file():
        args.parser.error(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    settings = json.loads(payload["config"])
    if settings.get("init_weights") and not settings.get("rule_config"):
        rule = load_rule(settings["init_weights"])[0]  # the run took the init weights' config
    else:
        rule = rule_from_config(settings["rule"], settings.get("rule_config") or {})
    rule.load_state_dict(payload["rule" if args.latest else "best_rule"])
    best = json.loads(payload["best"])
    command = shlex.join(["learned-optim", *args.argv])
    out = save_rule(rule.eval(), args.out, {
        "task": {"family": settings["task"],
                 "kwargs": {k: v for k, v in settings.get("task_kwargs", {}).items() if k != "root"}},
        "meta_training": {**settings, "episodes": payload["episode"], "train_seconds": round(payload["elapsed"], 1),
                          "skipped_truncations": payload["skipped"], "best_validation": best,
                          "commands": json.loads(payload.get("commands", "[]")),
                          "exported_from": str(path), "cpu_threads": torch.get_num_threads(),
                          "exported": f"the latest φ (episode {payload['episode']})" if args.latest
                          else "the best validated φ"},
        "command": command,
    })
    which = f"the latest weights (episode {payload['episode']}; the best validated were episode {best['episode']})" \
        if args.latest else f"the weights validated best (episode {best['episode']}, meta-loss {best['meta_loss']:.4g})"
    print(f"wrote {out} and {out.with_suffix('.safetensors')}: {which} of {payload['episode']} episodes, "
          f"{payload['elapsed']:.0f} s of training")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learned-optim", description="Learned and adaptive optimizers for PyTorch.")
    parser.add_argument("--version", action="version", version=f"learned_optim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="list optimizers and task families")
    p_list.set_defaults(func=_cmd_list, parser=p_list)

    p_bench = sub.add_parser("benchmark", help="benchmark optimizers against tuned torch.optim baselines")
    p_bench.add_argument("--tasks", default="quadratic,rosenbrock,noisy-least-squares,mlp",
                         help="comma-separated task families (mnist-mlp needs --data or $LEARNED_OPTIM_DATA)")
    p_bench.add_argument("--optimizers", default="all", help="comma-separated names, or 'all'; a learned optimizer may name its weights, e.g. ntm-bfgs:ntm-bfgs-mnist")
    p_bench.add_argument("--steps", type=int, default=None, help="steps per run (default: per task)")
    p_bench.add_argument("--seeds", type=int, default=10, help="evaluation seeds")
    p_bench.add_argument("--tune-seeds", type=int, default=3, help="seeds for the learning-rate search")
    p_bench.add_argument("--data", default=None, help="data directory holding mnist/ (for mnist-mlp)")
    p_bench.add_argument("--out", default="results", help="output directory for the table and plot")
    p_bench.add_argument("--plot", action="store_true", help="also write benchmark.png (needs matplotlib)")
    p_bench.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                         help="worker processes (default: all cores)")
    p_bench.set_defaults(func=_cmd_benchmark, parser=p_bench)

    p_meta = sub.add_parser("meta-train", help="meta-train a learned update rule and write its weights")
    p_meta.add_argument("--rule", default="lstm-gac", help="update rule to train")
    p_meta.add_argument("--rule-config", default=None, help="JSON of rule config overrides")
    p_meta.add_argument("--init-weights", default=None,
                        help="start from these weights (for ntm-bfgs, LSTM+GAC weights start its controller)")
    p_meta.add_argument("--init-controller", default=None,
                        help="ntm-bfgs: then take the controller from these LSTM+GAC weights, keeping the heads")
    p_meta.add_argument("--task", default="quadratic",
                        help="task family to meta-train on: a registered name (learned-optim list) or "
                             "'package.module:factory', an importable TaskFamily or a callable returning one")
    p_meta.add_argument("--task-kwargs", default=None, help="JSON of task family arguments")
    p_meta.add_argument("--data", default=None, help="data directory (for MNIST families)")
    p_meta.add_argument("--out", required=True, help="weights path without suffix, e.g. pretrained/NAME")
    p_meta.add_argument("--workdir", default=None, help="checkpoints and log (default: OUT.run); a rerun resumes")
    p_meta.add_argument("--episodes", type=int, default=1000, help="episodes of K tasks × horizon steps")
    p_meta.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds of training")
    p_meta.add_argument("--tasks-per-step", type=int, default=128, help="K tasks unrolled together")
    p_meta.add_argument("--horizon", type=int, default=100, help="T inner steps per episode")
    p_meta.add_argument("--horizon-min", type=int, default=None,
                        help="if given, each episode's horizon is drawn log-uniformly in [this, --horizon]")
    p_meta.add_argument("--validation-horizon", type=int, default=None, help="steps of validation runs (default: --horizon)")
    p_meta.add_argument("--burn-in", type=int, default=0,
                        help="B: each episode first runs its tasks (no graph) for a uniform draw in [0, B] steps, "
                             "then meta-trains on the next --horizon steps: late-training states, cheaply (0: off)")
    p_meta.add_argument("--reparametrize", type=float, default=1.0,
                        help="a ≥ 1: train on tasks whose tensors are in random units c, log-uniform in [1/a, a] (1: off)")
    p_meta.add_argument("--truncation", type=int, default=20, help="U inner steps per meta-step")
    p_meta.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate on φ")
    p_meta.add_argument("--meta-lr-schedule", default="constant", choices=["constant", "cosine"],
                        help="cosine: decay to 5%% of --meta-lr over --episodes")
    p_meta.add_argument("--clip-grad-norm", type=float, default=1.0, help="meta-gradient norm clip")
    p_meta.add_argument("--gradient", default="first-order", choices=list(GRADIENT_MODES),
                        help="how the optimizee gradient enters the meta-gradient: an input (first-order), "
                             "differentiated (second-order), or differentiated on an independent minibatch (gd-by-sgd)")
    p_meta.add_argument("--estimator", default="truncated-bptt", choices=list(ESTIMATORS),
                        help="the meta-gradient: backprop through each truncation (truncated-bptt), or persistent "
                             "evolution strategies (pes: no backward pass, no truncation bias; --gradient then unused)")
    p_meta.add_argument("--pes-sigma", type=float, default=0.01, help="PES: σ of the perturbations of φ")
    p_meta.add_argument("--pes-pairs", type=int, default=4, help="PES: antithetic pairs of particles")
    p_meta.add_argument("--trainable", nargs="+", default=None, metavar="NAME[a:b]",
                        help="train only these tensors of φ, whole or by rows, e.g. momentum_bias "
                             "'core.weights.0[4:7]' (the rest stays as it started; default: all)")
    p_meta.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                        help="float32; tf32: TF32 matrix products (CUDA); bf16: the tasks' losses under bfloat16 "
                             "autocast (validation stays float32)")
    p_meta.add_argument("--loss-transform", default="mean", choices=["mean", "log"],
                        help="meta-loss: mean of f (the paper) or mean of log f")
    p_meta.add_argument("--select-by", default="meta_loss", choices=["meta_loss", "median_final_loss"],
                        help="validation score that picks the kept weights (early stopping)")
    p_meta.add_argument("--validate-every", type=int, default=25, help="episodes between validations")
    p_meta.add_argument("--validation-tasks", type=int, default=128, help="held-out validation tasks")
    p_meta.add_argument("--validation-task-kwargs", default=None,
                        help='JSON arguments that override --task-kwargs for validation, e.g. \'{"part": "held-out"}\'')
    p_meta.add_argument("--checkpoint-every", type=int, default=25, help="episodes between checkpoints")
    p_meta.add_argument("--eval-seeds", type=int, default=20, help="held-out draws for the final evaluation")
    p_meta.add_argument("--eval-task", default=None, help="task family of the final evaluation (default: --task)")
    p_meta.add_argument("--eval-task-kwargs", default=None,
                        help='JSON arguments of the evaluation family, e.g. \'{"part": "held-out"}\'')
    p_meta.add_argument("--seed", type=int, default=0)
    p_meta.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p_meta.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_meta.set_defaults(func=_cmd_meta_train, parser=p_meta)

    p_export = sub.add_parser("export", help="write the best validated weights of a meta-training checkpoint")
    p_export.add_argument("--workdir", required=True, help="the run's checkpoint directory (meta-train's --workdir)")
    p_export.add_argument("--out", required=True, help="weights path without suffix")
    p_export.add_argument("--latest", action="store_true",
                          help="the φ the run holds now instead of the best validated one")
    p_export.set_defaults(func=_cmd_export, parser=p_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
