"""The outer loop: meta-training a learned rule's parameters φ with Adam.

One *episode* draws K tasks from the family and unrolls them for the horizon T, cut into
truncations of U steps; each truncation is one meta-step (an estimator's gradient, clipped,
then Adam on φ). Every ``validate_every`` episodes the rule is run (no graph) on fixed
held-out validation tasks and the best φ is kept (early stopping); every
``checkpoint_every`` episodes everything needed to resume is written, so a killed run loses
at most one checkpoint interval. A truncation whose meta-loss or gradient is not finite, or
whose optimizees blew up (loss above ``explode_ratio`` × their initial loss), is skipped,
reported in the log, and its episode abandoned; φ never sees it.

The kept φ is the one with the best validation ``select_by`` score: the meta-loss (the
training objective), or the median over validation tasks of the final loss (mean of the
last 10 steps: the benchmark's score).

Seeds: episode e of a run with seed s trains on family seeds TRAIN_SEED_BASE + s·10⁸ + e·K + k;
validation uses VALIDATION_SEED_BASE + k. Neither meets the benchmark's evaluation seeds
(0, 1, …) or its tuning seeds (10,000, …), so evaluations are on held-out draws.

Data-parallel: when ``torch.distributed`` is initialized (e.g. under ``torchrun``), each of
the W ranks unrolls its K/W of an episode's K tasks, the meta-gradients (and the logged
losses) are averaged across the ranks before clipping and Adam, so every rank holds the
same φ, the one a single process drawing all K tasks would reach (up to float rounding).
Rank 0 alone validates (and sends the scores to the others), writes checkpoints and logs;
the time limit follows the slowest rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..rules import load_rule, rule_from_config, save_rule
from ..rules.lstm_gac import LSTMGACRule, widened_inputs
from ..rules.weights import _RULES
from ..tasks import TaskFamily, TaskStack, get_family, random_scales, reparametrized
from .estimators import ESTIMATORS, LOSS_TRANSFORMS, PersistentES, TruncatedBPTT, meta_loss
from .trainable import trainable_masks
from .unroll import GRADIENT_MODES, PRECISIONS, Unroll, check_precision, float32_matmul_precision

__all__ = ["MetaTrainConfig", "MetaTrainer", "validate", "resolve_device",
           "TRAIN_SEED_BASE", "VALIDATION_SEED_BASE"]

TRAIN_SEED_BASE = 1_000_000_000
VALIDATION_SEED_BASE = 100_000_000
SELECT_BY = ("meta_loss", "median_final_loss")
SCHEDULES = ("constant", "cosine")
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cpu`` / ``cuda[:i]`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


@dataclass
class MetaTrainConfig:
    """Everything that defines a meta-training run (saved in checkpoints and weights metadata)."""

    rule: str = "lstm-gac"
    rule_config: dict[str, Any] = field(default_factory=dict)
    init_weights: str | None = None  # start φ from these weights (NTM-BFGS: its controller from LSTM+GAC ones)
    init_controller: str | None = None  # NTM-BFGS: then replace its controller by these LSTM+GAC weights'
    # tensors (the heads kept from init_weights; the controller's extra input rows start at zero)
    task: str = "quadratic"
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    horizon: int = 100  # T (with horizon_min: the longest an episode draws)
    horizon_min: int | None = None  # if set, episode horizons log-uniform in [horizon_min, horizon] (see episode_horizon)
    validation_horizon: int | None = None  # steps of a validation run (default: horizon)
    burn_in: int = 0  # B: each episode first runs its tasks with the rule, no graph, for a uniform draw in
    # [0, B] steps, then meta-trains on the next horizon steps (see episode_burn_in)
    reparametrize: float = 1.0  # a ≥ 1: each training task's tensors in random units c ∈ [1/a, a] (1: off)
    truncation: int = 20  # U
    tasks_per_step: int = 128  # K, unrolled together
    episodes: int = 1000
    time_limit: float | None = None  # seconds of training; stops early (then validates)
    meta_lr: float = 1e-3  # Adam on φ
    meta_lr_schedule: str = "constant"  # or "cosine": decays to 5% of meta_lr at the last episode
    clip_grad_norm: float = 1.0
    gradient: str = "first-order"
    estimator: str = "truncated-bptt"  # or "pes": persistent evolution strategies (no backward, no truncation bias)
    pes_sigma: float = 0.01  # σ of PES's perturbations of φ
    pes_pairs: int = 4  # antithetic pairs of PES (each unrolls the episode's tasks twice)
    trainable: list[str] | None = None  # the part of φ trained: tensor names, whole or as NAME[a:b] rows
    # (see meta.trainable); the rest stays as it started. None: all of φ
    loss_transform: str = "mean"
    select_by: str = "meta_loss"  # validation score that picks the kept φ: "meta_loss" or "median_final_loss"
    validate_every: int = 25  # episodes
    validation_tasks: int = 128
    validation_task_kwargs: dict[str, Any] | None = None  # validate on the task family with these arguments
    # instead (e.g. {"part": "held-out"}: held-out data); None: the training family itself
    checkpoint_every: int = 25  # episodes
    explode_ratio: float = 1e4
    seed: int = 0
    device: str = "auto"
    precision: str = "float32"  # or "tf32" (CUDA) / "bf16" (tasks under autocast): see meta.unroll; validation stays float32

    def __post_init__(self) -> None:
        if self.rule not in _RULES:
            raise ValueError(f"unknown rule {self.rule!r}; known: {', '.join(sorted(_RULES))}")
        for name in ("horizon", "truncation", "tasks_per_step", "episodes", "validate_every",
                     "validation_tasks", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.horizon % self.truncation:
            raise ValueError(f"horizon ({self.horizon}) must be a multiple of truncation ({self.truncation})")
        if not isinstance(self.burn_in, int) or isinstance(self.burn_in, bool) or self.burn_in < 0:
            raise ValueError(f"burn_in must be a non-negative integer (0: off), got {self.burn_in!r}")
        for name in ("horizon_min", "validation_horizon"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.horizon_min is not None and not self.truncation <= self.horizon_min <= self.horizon:
            raise ValueError(f"horizon_min ({self.horizon_min}) must lie between truncation ({self.truncation}) "
                             f"and horizon ({self.horizon})")
        if not isinstance(self.reparametrize, (int, float)) or not math.isfinite(self.reparametrize) \
                or self.reparametrize < 1:
            raise ValueError(f"reparametrize must be a finite number ≥ 1 (1: off), got {self.reparametrize!r}")
        for name in ("meta_lr", "clip_grad_norm", "explode_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive, got {self.time_limit!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not isinstance(self.pes_sigma, (int, float)) or not math.isfinite(self.pes_sigma) or self.pes_sigma <= 0:
            raise ValueError(f"pes_sigma must be a finite positive number, got {self.pes_sigma!r}")
        if not isinstance(self.pes_pairs, int) or isinstance(self.pes_pairs, bool) or self.pes_pairs < 1:
            raise ValueError(f"pes_pairs must be a positive integer, got {self.pes_pairs!r}")
        if self.trainable is not None and (not isinstance(self.trainable, (list, tuple)) or not self.trainable
                                           or not all(isinstance(s, str) for s in self.trainable)):
            raise ValueError(f"trainable must be None or a non-empty list of tensor names, got {self.trainable!r}")
        if self.trainable is not None:
            self.trainable = list(self.trainable)
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {self.gradient!r}")
        if self.meta_lr_schedule not in SCHEDULES:
            raise ValueError(f"meta_lr_schedule must be one of {SCHEDULES}, got {self.meta_lr_schedule!r}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {SELECT_BY}, got {self.select_by!r}")
        if self.loss_transform not in LOSS_TRANSFORMS:
            raise ValueError(f"loss_transform must be one of {LOSS_TRANSFORMS}, got {self.loss_transform!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training(self) -> dict[str, Any]:
        """The settings that shape φ (not where or how long it ran): a resume must match these."""
        keep = ("rule", "rule_config", "init_weights", "init_controller", "task", "task_kwargs", "horizon", "horizon_min",
                "validation_horizon", "burn_in", "reparametrize", "truncation", "tasks_per_step",
                "meta_lr", "meta_lr_schedule", "clip_grad_norm", "gradient", "estimator", "pes_sigma", "pes_pairs", "trainable", "loss_transform", "select_by", "validate_every",
                "validation_tasks", "validation_task_kwargs", "explode_ratio", "seed", "precision")
        return {k: getattr(self, k) for k in keep}


@torch.no_grad()
def validate(rule: nn.Module, family: TaskFamily, seeds: list[int], horizon: int,
             loss_transform: str = "mean", device: torch.device | None = None) -> dict[str, float]:
    """Run the rule (no graph) on the tasks of ``seeds`` for ``horizon`` steps.

    Returns the meta-loss over the whole horizon and the median over tasks of the final
    loss (mean of the last 10 steps, the benchmark's score); a diverged task scores inf.
    """
    unroll = Unroll(rule, family.stack(seeds, device=device))
    state = unroll.start()
    losses, _ = unroll.run(state, horizon, track=False)
    losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf))
    final = losses[-min(10, horizon):].mean(0)
    value = meta_loss(losses, loss_transform)
    return {"meta_loss": float(value) if torch.isfinite(value) else math.inf,
            "median_final_loss": float(final.median())}


class MetaTrainer:
    """Meta-trains a rule per a :class:`MetaTrainConfig`, writing checkpoints and a log in ``workdir``."""

    def __init__(self, config: MetaTrainConfig, workdir: str | os.PathLike,
                 progress: bool = True, log: Callable[[str], None] | None = print,
                 family: TaskFamily | None = None, command: str | None = None) -> None:
        self.config = config
        self.command = command  # the shell command running this trainer, recorded in the checkpoint
        self.workdir = Path(workdir)
        self.rank, self.world = _distributed_rank_and_size()
        if config.tasks_per_step % self.world:
            raise ValueError(f"tasks_per_step ({config.tasks_per_step}) must be a multiple of the number of "
                             f"processes ({self.world}): each unrolls an equal share of an episode's tasks")
        self.progress = progress and self.rank == 0
        self.print = (log or (lambda _msg: None)) if self.rank == 0 else (lambda _msg: None)
        self.device = resolve_device(config.device)
        check_precision(config.precision, self.device)
        # ``family`` (e.g. a ModuleFamily of the user's own model) replaces config.task's lookup.
        self.family = family if family is not None else get_family(config.task, **config.task_kwargs)
        if family is not None and config.validation_task_kwargs is not None:
            raise ValueError("validation_task_kwargs rebuilds the family from config.task; with a family "
                             "object given, pass it validation data of its own instead")
        self.validation_family = self.family if config.validation_task_kwargs is None else get_family(
            config.task, **{**config.task_kwargs, **config.validation_task_kwargs})
        torch.manual_seed(config.seed)
        self.rule = rule_from_config(config.rule, config.rule_config)
        if config.init_weights is not None:
            self._warm_start(config.init_weights)
        if config.init_controller is not None:
            self._swap_controller(config.init_controller)
        self.rule = self.rule.to(self.device)
        self.masks = trainable_masks(self.rule, config.trainable)  # checked here, before any training
        self.best_rule = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}
        self.optimizer = torch.optim.Adam(self.rule.parameters(), lr=config.meta_lr)
        self.estimator: TruncatedBPTT | PersistentES = (
            TruncatedBPTT(config.loss_transform) if config.estimator == "truncated-bptt"
            else PersistentES(config.loss_transform, config.pes_sigma, config.pes_pairs, seed=config.seed + self.rank,
                              masks=self.masks))
        self.episode = 0
        self.best: dict[str, Any] = {"meta_loss": math.inf, "median_final_loss": math.inf, "episode": -1}
        self.elapsed = 0.0
        self.skipped = 0
        self.validated_at = -1  # the episode of the last validation
        self.commands: list[dict[str, Any]] = []  # each command that ran on this workdir, from the episode it began at
        self.validation_seeds = [VALIDATION_SEED_BASE + k for k in range(config.validation_tasks)]

    def _warm_start(self, weights: str) -> None:
        """φ from ``weights``: the same rule's weights (and, with no ``rule_config`` given, its
        config), or LSTM+GAC ones for NTM-BFGS's controller."""
        start, _ = load_rule(weights)
        if start.name == self.rule.name and not self.config.rule_config:
            self.rule = start  # the weights' own config: what "start from these weights" means
        elif start.name == self.rule.name:
            state, wanted = start.state_dict(), self.rule.state_dict()
            if isinstance(start, LSTMGACRule) and isinstance(self.rule, LSTMGACRule) \
                    and start.config.input_names() != self.rule.config.input_names():
                state = widened_inputs(state, start.config, self.rule.config)  # new inputs start at zero
            if set(wanted) <= set(state):  # drop surplus weights: terms the given config turns off
                state = {k: v for k, v in state.items() if k in wanted}  # (absolute_step=False: w and b)
            try:
                self.rule.load_state_dict(state)
            except RuntimeError as error:
                raise ValueError(f"init weights {weights!r} do not fit the rule config given "
                                 f"({self.config.rule_config}); leave the rule config empty to take theirs "
                                 f"({str(error).splitlines()[0]})") from None
        elif hasattr(self.rule, "load_controller") and start.name == "lstm-gac":
            cast(Any, self.rule).load_controller(start)  # a rule method nn.Module's typing does not know
        else:
            raise ValueError(f"cannot start a {self.rule.name!r} rule from {start.name!r} weights ({weights})")

    def _swap_controller(self, weights: str) -> None:
        """NTM-BFGS's controller from LSTM+GAC ``weights``, its heads as they are (a new controller
        for trained heads)."""
        if not hasattr(self.rule, "load_controller"):
            raise ValueError(f"init_controller is for a rule with a controller (ntm-bfgs), not {self.rule.name!r}")
        start, _ = load_rule(weights)
        if start.name != "lstm-gac":
            raise ValueError(f"init_controller needs lstm-gac weights; {weights!r} are {start.name!r} weights")
        cast(Any, self.rule).load_controller(start)

    # ------------------------------------------------------------------ checkpoints and log

    def _checkpoint_path(self) -> Path:
        return self.workdir / CHECKPOINT

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": json.dumps(self.config.training()),
            "episode": self.episode,
            "elapsed": self.elapsed,
            "skipped": self.skipped,
            "validated_at": self.validated_at,
            "best": json.dumps(self.best),
            "commands": json.dumps(self.commands),
            "rule": self.rule.state_dict(),
            "best_rule": self.best_rule,
            "adam": self.optimizer.state_dict(),
        }
        tmp = self._checkpoint_path().with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self._checkpoint_path())  # never a half-written checkpoint

    def try_resume(self) -> bool:
        """Load ``workdir/checkpoint.pt`` if there is one; it must be of the same training settings."""
        path = self._checkpoint_path()
        if not path.exists():
            return False
        payload = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(payload["config"])
        for key, default in (("precision", "float32"), ("horizon_min", None), ("validation_horizon", None),
                             ("reparametrize", 1.0), ("validation_task_kwargs", None),
                             ("estimator", "truncated-bptt"), ("pes_sigma", 0.01), ("pes_pairs", 4),
                             ("trainable", None), ("burn_in", 0), ("init_controller", None)):
            saved.setdefault(key, default)  # a checkpoint from before the option
        if saved != json.loads(json.dumps(self.config.training())):
            diff = sorted(k for k in saved if saved.get(k) != self.config.training().get(k))
            raise ValueError(f"{path} is a checkpoint of other training settings ({', '.join(diff)}); "
                             "use another --workdir or remove it")
        self.rule.load_state_dict(payload["rule"])
        self.best_rule = payload["best_rule"]
        self.optimizer.load_state_dict(payload["adam"])
        self.episode, self.elapsed, self.skipped = payload["episode"], payload["elapsed"], payload["skipped"]
        self.best = json.loads(payload["best"])
        self.validated_at = payload["validated_at"]
        self.commands = json.loads(payload.get("commands", "[]"))  # none recorded before the option
        if self.rank == 0:
            self._trim_log(self.episode)
        self.print(f"resumed from {path} at episode {self.episode} ({self.elapsed:.0f} s trained)")
        return True

    def _trim_log(self, episode: int) -> None:
        """Drop log records written after the checkpoint (they will be written again)."""
        path = self.workdir / LOG
        if path.exists():
            def before(record: dict) -> bool:  # validations at `episode` precede its checkpoint
                e = record.get("episode", 0)
                return e < episode or (e == episode and record.get("kind") == "validation")

            kept = [line for line in path.read_text().splitlines() if line.strip() and before(json.loads(line))]
            path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ training

    def _episode_seeds(self, episode: int) -> list[int]:
        """This rank's share of episode ``episode``'s K task seeds (all K in a single process)."""
        k = self.config.tasks_per_step
        share = k // self.world
        return [TRAIN_SEED_BASE + self.config.seed * 10**8 + episode * k + i
                for i in range(self.rank * share, (self.rank + 1) * share)]

    def meta_lr(self, episode: int) -> float:
        """Adam's learning rate in ``episode`` (a function of the episode: resumes stay exact)."""
        cfg = self.config
        if cfg.meta_lr_schedule == "constant":
            return cfg.meta_lr
        progress = min(1.0, episode / max(1, cfg.episodes - 1))
        return cfg.meta_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    def episode_horizon(self, episode: int) -> int:
        """T of ``episode``: ``horizon``, or with ``horizon_min`` a log-uniform draw in
        [horizon_min, horizon] rounded to whole truncations (a function of seed and episode, so
        resumes and the ranks agree). Long horizons teach the rule what users run it for."""
        cfg = self.config
        if cfg.horizon_min is None:
            return cfg.horizon
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + episode)
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        drawn = math.exp(math.log(cfg.horizon_min) + u * (math.log(cfg.horizon) - math.log(cfg.horizon_min)))
        return min(cfg.horizon, max(cfg.truncation, round(drawn / cfg.truncation) * cfg.truncation))

    def episode_burn_in(self, episode: int) -> int:
        """Steps run before ``episode``'s meta-training: 0, or with ``burn_in`` = B a uniform draw in
        [0, B] (a function of seed and episode). The meta-gradient then sees states from late in
        long runs, where a rule trained on short ones overshoots, at the cost of plain steps
        (an estimator's truncation costs 2·pairs unrolls for PES)."""
        cfg = self.config
        if not cfg.burn_in:
            return 0
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + episode + 13)
        return int(torch.randint(cfg.burn_in + 1, (), generator=gen))

    def episode_stack(self, episode: int) -> TaskStack:
        """The K tasks of ``episode`` (this rank's share), in random units if ``reparametrize`` > 1."""
        cfg = self.config
        stack = self.family.stack(self._episode_seeds(episode), device=self.device)
        if cfg.reparametrize > 1:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + episode + 7)
            gen.manual_seed(int(torch.randint(2**62, (), generator=gen)) + self.rank)
            stack = reparametrized(stack, random_scales(stack, cfg.reparametrize, gen))
        return stack

    def run_episode(self) -> list[float]:
        """One episode: K fresh tasks, T/U meta-steps. Returns the applied meta-losses."""
        cfg = self.config
        stack = self.episode_stack(self.episode)
        for group in self.optimizer.param_groups:
            group["lr"] = self.meta_lr(self.episode)
        unroll = Unroll(self.rule, stack, cfg.gradient, cfg.precision)
        state = unroll.start()
        applied: list[float] = []
        burn_in = self.episode_burn_in(self.episode)
        if burn_in:
            with torch.no_grad():
                losses, state = unroll.run(state, burn_in, track=False)
            final = float(losses[-1].mean())
            record = {"kind": "burn-in", "episode": self.episode, "steps": burn_in, "final_loss": final}
            bad = not math.isfinite(final) or final > cfg.explode_ratio * float(state.initial_losses.mean())
            if _any_rank(bad, self.world):  # every rank skips together, or the others would wait in the all-reduce
                self.skipped += 1
                record["skipped"] = ("non-finite" if not math.isfinite(final) else "exploded") if bad \
                    else "exploded on another rank"
                self._log(record)
                self.print(f"episode {self.episode}: burn-in of {burn_in} steps {record['skipped']}; "
                           f"skipped ({self.skipped} so far)")
                return applied
            self._log(record)
        for truncation in range(self.episode_horizon(self.episode) // cfg.truncation):
            with float32_matmul_precision(cfg.precision):  # the meta-gradient's backward pass too
                result = self.estimator.estimate(self.rule, unroll, state, cfg.truncation)
            params = list(self.rule.parameters())
            for p, g, mask in zip(params, result.grads, self.masks):
                p.grad = torch.zeros_like(p) if g is None else g if mask is None else g * mask  # frozen: Adam moves 0
            initial = float(state.initial_losses.mean())
            if self.world > 1:  # average gradients and losses over the ranks' shares of the tasks
                result.meta_loss, result.final_loss, initial = _average_across_ranks(
                    [cast(Tensor, p.grad) for p in params],  # every grad was set just above
                    [result.meta_loss, result.final_loss, initial])
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)  # the norm before clipping
            exploded = result.final_loss > cfg.explode_ratio * initial
            record = {"kind": "train", "episode": self.episode, "truncation": truncation,
                      "meta_loss": result.meta_loss, "grad_norm": float(norm), "final_loss": result.final_loss}
            if not (math.isfinite(result.meta_loss) and torch.isfinite(norm)) or exploded:
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped += 1
                record["skipped"] = "non-finite" if not exploded else "exploded"
                self._log(record)
                self.print(f"episode {self.episode} truncation {truncation}: {record['skipped']} meta-loss "
                           f"{result.meta_loss:.4g}; skipped, episode abandoned ({self.skipped} so far)")
                break
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._log(record)
            applied.append(result.meta_loss)
            state = result.state
        return applied

    def run_validation(self) -> dict[str, float]:
        self.rule.eval()
        if self.rank == 0:
            scores = validate(self.rule, self.validation_family, self.validation_seeds,
                              self.config.validation_horizon or self.config.horizon,
                              self.config.loss_transform, self.device)
        if self.world > 1:  # the others wait for rank 0's scores, so all keep the same best φ
            import torch.distributed as dist

            box = [scores if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            scores = cast("dict[str, float]", box[0])  # rank 0's, filled in by the broadcast
        key = self.config.select_by
        improved = scores[key] < self.best[key]
        if improved:
            self.best = {**scores, "episode": self.episode}
            self.best_rule = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}
        self.validated_at = self.episode
        self._log({"kind": "validation", "episode": self.episode, **scores, "best": improved,
                   "elapsed": self.elapsed})
        return scores

    def train(self) -> dict[str, Any]:
        """Run (or resume) to ``episodes`` or ``time_limit``; returns a summary. φ = the best validated."""
        from tqdm.auto import tqdm

        cfg = self.config
        self.try_resume()
        if self.command is not None:
            self.commands.append({"command": self.command, "from_episode": self.episode})
        if self.validated_at < 0:
            self.run_validation()  # the untrained rule is the first candidate
        bar = tqdm(total=cfg.episodes, initial=self.episode, disable=not self.progress, unit="episode",
                   dynamic_ncols=True)
        running = None
        while self.episode < cfg.episodes and (cfg.time_limit is None or self.elapsed < cfg.time_limit):
            start = time.perf_counter()
            losses = self.run_episode()
            self.episode += 1
            self.elapsed += _slowest_rank(time.perf_counter() - start, self.world)
            if losses:
                value = sum(losses) / len(losses)
                running = value if running is None else 0.9 * running + 0.1 * value
            if self.episode % cfg.validate_every == 0:
                self.run_validation()
            if self.episode % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(meta_loss=f"{running:.4g}" if running is not None else "-",
                            best_val=f"{self.best[cfg.select_by]:.4g}", skipped=self.skipped)
        bar.close()
        if self.validated_at != self.episode:
            self.run_validation()
        self.save_checkpoint()
        self.rule.load_state_dict(self.best_rule)
        meta_steps = sum(self.episode_horizon(e) for e in range(self.episode)) // cfg.truncation
        return {"episodes": self.episode, "meta_steps": meta_steps,
                "train_seconds": round(self.elapsed, 1), "skipped_truncations": self.skipped,
                "best_validation": self.best, "device": str(self.device), "commands": self.commands}

    def save_weights(self, out: str | os.PathLike, metadata: dict[str, Any]) -> Path:
        """Write the best φ as ``out.safetensors`` + ``out.json``."""
        self.rule.load_state_dict(self.best_rule)
        return save_rule(self.rule.to("cpu"), out, metadata)


def _distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_across_ranks(grads: list[Tensor], values: list[float]) -> list[float]:
    """Average ``grads`` (in place) and ``values`` over the ranks, in one all-reduce."""
    import torch.distributed as dist

    world = dist.get_world_size()
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor(values, dtype=grads[0].dtype,
                                                                    device=grads[0].device)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset:].tolist()


def _any_rank(flag: bool, world: int) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _slowest_rank(seconds: float, world: int) -> float:
    """The longest of the ranks' ``seconds``: every rank then stops at the same episode."""
    if world == 1:
        return seconds
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)
