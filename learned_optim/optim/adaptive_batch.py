"""Per-coordinate adaptive learning rate and suggested batch size from gradient signal and
noise (McAllester, TTIC 31230 SGD notes, "A complete algorithm").

Per coordinate i the notes keep running averages g̃[i], s̃[i] of the minibatch gradient and
its square, set B*[i] = λ_B·σ̃²[i]/(g̃²[i] + ε) (λ_B = 16 from the one-dimensional progress
bound, whose optimum is B* = 16σ²/g², η* = 1/(2L)) and step with η_B = (B/B*)·η*.
Taken literally this diverges; :func:`adaptive_batch_sgd` documents the repairs, and
:class:`AdaptiveBatchSGD` the defaults that depart from the notes (step gain, horizon, lr).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import RandomSampler, Sampler

from ..registry import register
from ._base import BatchSizeMixin, PackageOptimizer, check_batch_size, check_positive

__all__ = ["AdaptiveBatchSGD", "AdaptiveBatchSampler", "adaptive_batch_sgd", "coordinate_batch_size"]


def coordinate_batch_size(
    grad_average: Tensor, square_average: Tensor, batch_size: int, lambda_b: float, eps: float
) -> Tensor:
    """B*[i] = λ_B·σ̃²[i]/(g̃²[i] + ε), with the per-example variance σ̃² = B·(s̃ − g̃²).

    The averages are of batch gradients, whose variance is σ²/B; multiplying by B puts the
    noise back in per-example units, so B* does not depend on the batch size it was measured at.
    """
    mean_sq = grad_average * grad_average
    per_example_var = (square_average - mean_sq).clamp_min_(0.0).mul_(batch_size)
    return per_example_var.mul_(lambda_b).div_(mean_sq.add_(eps))


def adaptive_batch_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    grad_averages: list[Tensor],
    square_averages: list[Tensor],
    step: int,
    *,
    lr: float,
    batch_size: int,
    lambda_b: float,
    eps: float,
    warmup_steps: int,
    min_horizon: float,
    max_horizon: float,
    horizon_factor: float,
    step_gain: float = 1.0,
) -> None:
    """One in-place AdaptiveBatchSGD step at step number ``step`` (1-based).

    Sound version of the notes' algorithm:

    * units: the averages are of batch gradients, so σ̃² = B·Var(ĝ) (see
      :func:`coordinate_batch_size`); B* is in examples whatever B it was measured at;
    * averaging: the time constant is clamp(horizon_factor·B*/B, min_horizon, max_horizon)
      steps (the notes use B*/B), with the notes' 1/min(t, N) bias correction; the floor
      keeps the variance estimate from collapsing to zero and the cap keeps it responsive;
    * step size: η[i] = η*·min(1, step_gain·B/B*[i]); with ``step_gain`` = 1 this is the
      notes' η_B = (B/B*)·η*, which holds only for B ≤ B*, capped so that a step never
      exceeds η* = ``lr``;
    * η and the horizon come from the averages *before* this step's gradient enters them,
      so the step size is independent of the gradient it multiplies.

    During the first ``warmup_steps`` steps only the averages move (exact means), η = 0.
    """
    threshold = step_gain * batch_size
    for p, g, g_avg, s_avg in zip(params, grads, grad_averages, square_averages):
        if step > warmup_steps:
            b_star = coordinate_batch_size(g_avg, s_avg, batch_size, lambda_b, eps)
            # η*·min(1, κB/B*) = η*·κB / max(B*, κB); finite where B* = 0.
            eta = torch.reciprocal(b_star.clamp_min(threshold)).mul_(lr * threshold)
            horizon = b_star.mul_(horizon_factor / batch_size).clamp_(min_horizon, max_horizon)
            weight = torch.reciprocal(horizon.clamp_max_(step))
            g_avg.lerp_(g, weight)
            s_avg.lerp_(g * g, weight)
            p.addcmul_(eta, g, value=-1.0)
        else:
            g_avg.lerp_(g, 1.0 / step)
            s_avg.lerp_(g * g, 1.0 / step)


@register(
    "adaptive-batch-sgd",
    summary="SGD with per-coordinate learning rates and a suggested batch size from gradient noise",
    example_kwargs={"lr": 1e-2, "batch_size": 1},
    uses_batch_size=True,
)
class AdaptiveBatchSGD(BatchSizeMixin, PackageOptimizer):
    """SGD whose per-coordinate learning rate shrinks where gradient noise dominates.

    Per coordinate i: running averages g̃[i], s̃[i] of the minibatch gradient and its
    square; per-example variance σ̃²[i] = B·(s̃ − g̃²); B*[i] = λ_B·σ̃²/(g̃² + ε);
    η[i] = η*·min(1, κ·B/B*[i]); Φ[i] −= η[i]·ĝ[i]; the first K steps only average (η = 0).
    Coordinates whose signal is clear step at η* (the notes' 1/(2L), the user's ``lr``);
    noisy ones step as if their batch were larger. ``suggested_batch_size()`` gives the
    global noise scale λ_B·Σσ̃²/Σg̃² (McCandlish et al. 2018's simple noise scale times λ_B),
    which an :class:`AdaptiveBatchSampler` can follow; ``set_batch_size`` tells the optimizer
    the new B and converts the variance estimates to it.

    What makes the notes' algorithm sound (see :func:`adaptive_batch_sgd`): per-example units
    (σ̃² = B·Var(ĝ)); an averaging time constant clamp(horizon_factor·B*/B, min_horizon,
    max_horizon) steps, so the variance estimate cannot collapse to zero (floor) and follows
    the moving parameters (cap); and a step that never exceeds η*.

    Defaults that depart from the notes, and why:

    * ``step_gain`` κ = 2·λ_B (the notes/issue formula η_B = (B/B*)·η* is κ = 1). The notes
      pick B* and η* by maximising a *high-confidence* one-step bound (the 2σ/√B margin) and
      then scale η linearly below B*. For B ≪ B* the step that maximises the *expected*
      one-step decrease, E[ℓ(Φ − ηĝ)] ≤ ℓ − ηg² + ½Lη²(g² + σ²/B), is
      η = (1/L)·g²/(g² + σ²/B) ≈ B·g²/(Lσ²) = 2λ_B·(B/B*)·η*, i.e. 32 times the notes'
      value. The notes' own "complete algorithm" leaves this gain free (its meta-parameter
      λ_η in η = λ_η·g̃²/σ̃²); κ = 2λ_B is λ_η = 1/L, so in the noise-dominated regime
      η[i] = 2η*·B·g̃²/σ̃², independent of λ_B, which then only sets the suggested batch
      size. The cap η[i] ≤ η* is kept. Evidence (synthetic-data MLP, B = 32 and 128,
      25k–200k examples, ``benchmarks/adaptive_batch.py``): every coordinate of that MLP is
      noise-dominated (median B/B* ≈ 1e-3–5e-2, none above 1 at B = 32), so with κ = 1 the
      cap is never reached and the step is lr·B/B*. With κ = 1 at lr = 5 the final loss is
      1.24–1.68× tuned SGD's. κ = 1 does best near lr ≈ 30 (the noise-regime gain of κ = 32
      at lr ≈ 1), but then the coordinates that do reach B* ≤ B step at 30, and at B = 128
      the loss after 50k examples is 1.3–1.4× tuned SGD's (pilot runs). κ = 2λ_B gives that gain under a
      cap of a few units.
    * ``horizon_factor`` = 4 (notes: 1). With N = B*/B, g̃ averages B* examples, so its
      signal-to-noise ratio is only √λ_B = 4 and B* fluctuates by ±50%; four times longer
      doubles that SNR.
    * ``max_horizon`` = 100 steps (notes: none). The moments s̃ − g̃² include the drift of
      the mean gradient over the averaging window while Φ moves, and a stale g̃ misjudges
      the signal; the cap bounds both. It also bounds the B* that can be resolved: with an
      effective window of ≈ 2·max_horizon batches, E[g̃²] ≈ g² + σ²/(2·B·max_horizon), so
      estimates saturate near 2·λ_B·B·max_horizon and are within 25% of the truth only for
      B* ≲ λ_B·B·max_horizon/2. Raise it to measure larger B*. (A shorter cap, 20, lowers
      the MLP's loss by 1–2% through that saturation, which acts as a floor on η, at the
      price of resolving only B* ≲ 160·B; a drift-robust variance from successive
      differences, ½(ĝ_t − ĝ_{t−1})², changed the MLP losses by under 1%, so it is not
      offered.)
    * ``lr`` = η* = 5. The notes set η* = 1/(2L); L is not known to an optimizer, so this
      default is empirical, chosen on the synthetic-data MLP (task seeds 0–1). There the
      per-coordinate curvatures are far below the top Hessian eigenvalue (λ_max ≈ 1.2 at
      θ₀, 0.3 late), so η* = 1/(2λ_max) ≈ 0.4 is too cautious. On held-out seeds lr = 5 is
      within 1.04–1.10× tuned SGD's loss at B = 32 and 128 and 25k–200k examples; on one seed
      lr = 3 and 10 are within 1.05–1.26×, lr = 30 is 1.4–1.9×. It is not a universal value: on
      another problem set ``lr`` to about 1/(2L) for its per-coordinate curvature L.

    Args:
        lr: η*, the largest step size (the notes' 1/(2L)).
        batch_size: B of the coming steps; ``set_batch_size`` changes it and the running
            variance estimates are converted to the new B.
        lambda_b: λ_B (16 in the notes).
        eps: ε in B*'s denominator, in squared-gradient units.
        warmup_steps: K steps of averaging with η = 0.
        min_horizon / max_horizon: floor and cap, in steps, of the averaging time constant.
        horizon_factor: time constant = horizon_factor·B*/B steps (then clamped).
        step_gain: κ in η[i] = η*·min(1, κ·B/B*[i]); None means 2·λ_B (see above); 1 is the
            notes' η_B = (B/B*)·η*.
        check_finite: raise on NaN/inf gradients.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 5.0,
        *,
        batch_size: int,
        lambda_b: float = 16.0,
        eps: float = 1e-16,
        warmup_steps: int = 10,
        min_horizon: float = 10.0,
        max_horizon: float = 100.0,
        horizon_factor: float = 4.0,
        step_gain: float | None = None,
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            batch_size=batch_size,
            lambda_b=lambda_b,
            eps=eps,
            warmup_steps=warmup_steps,
            min_horizon=min_horizon,
            max_horizon=max_horizon,
            horizon_factor=horizon_factor,
            step_gain=step_gain,
            check_finite=check_finite,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr (η*)", allow_zero=True)
        check_positive(group["lambda_b"], "lambda_b (λ_B)")
        check_positive(group["eps"], "eps")
        check_positive(group["min_horizon"], "min_horizon")
        check_positive(group["max_horizon"], "max_horizon")
        check_positive(group["horizon_factor"], "horizon_factor")
        if group.get("step_gain") is not None:  # absent in state dicts saved before it existed
            check_positive(group["step_gain"], "step_gain")
        if group["min_horizon"] > group["max_horizon"]:
            raise ValueError(
                f"min_horizon ({group['min_horizon']}) exceeds max_horizon ({group['max_horizon']})"
            )
        k = group["warmup_steps"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {k!r}")
        check_batch_size(group)

    @staticmethod
    def _gain(group: dict[str, Any]) -> float:
        gain = group.get("step_gain")
        return 2.0 * group["lambda_b"] if gain is None else gain

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0)
        state["batch_size"] = group["batch_size"]
        state["grad_average"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["square_average"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    @staticmethod
    def _convert(state: dict, batch_size: int) -> None:
        """Re-express s̃ for batch size ``batch_size``, keeping g̃ and the per-example σ̃².

        Var(ĝ) = σ²/B, so s̃ − g̃² is scaled by B_old/B_new.
        """
        old = state["batch_size"]
        if old != batch_size:
            g_avg, s_avg = state["grad_average"], state["square_average"]
            mean_sq = g_avg * g_avg
            s_avg.sub_(mean_sq).mul_(old / batch_size).add_(mean_sq)
            state["batch_size"] = batch_size

    def set_batch_size(self, batch_size: int) -> None:
        """Tell the optimizer the minibatch size of the coming steps.

        The running averages are converted at once so that the per-example variance
        σ̃² = B·(s̃ − g̃²), and hence B*, are unchanged. (A batch size written directly into
        ``param_groups`` is converted the same way at the next step.)
        """
        super().set_batch_size(batch_size)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    self._convert(state, group["batch_size"])

    def _update_group(self, group, params, grads, states, originals) -> None:
        batch_size = group["batch_size"]
        for state in states:
            self._convert(state, batch_size)
        by_step: dict[int, list[int]] = {}
        for i, state in enumerate(states):
            state["step"] += 1
            by_step.setdefault(int(state["step"].item()), []).append(i)
        for t, idx in by_step.items():
            adaptive_batch_sgd(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [states[i]["grad_average"] for i in idx],
                [states[i]["square_average"] for i in idx],
                t,
                lr=group["lr"],
                batch_size=batch_size,
                lambda_b=group["lambda_b"],
                eps=group["eps"],
                warmup_steps=group["warmup_steps"],
                min_horizon=group["min_horizon"],
                max_horizon=group["max_horizon"],
                horizon_factor=group["horizon_factor"],
                step_gain=self._gain(group),
            )

    def _estimates(self) -> Iterator[tuple[dict[str, Any], Tensor, dict]]:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and int(state["step"]) > 0:
                    yield group, p, state

    def coordinate_batch_sizes(self) -> dict[Tensor, Tensor]:
        """B*[i] for every coordinate of every parameter stepped so far (keyed by parameter)."""
        return {
            p: coordinate_batch_size(
                s["grad_average"], s["square_average"], s["batch_size"], g["lambda_b"], g["eps"]
            )
            for g, p, s in self._estimates()
        }

    def suggested_batch_size(self) -> float | None:
        """λ_B·Σσ̃²/Σg̃² over all coordinates: the batch size the notes' bound favours.

        With sharded parameters (FSDP2) the sums are all-reduced, so every rank gets the
        suggestion of the whole model (call it on every rank).

        None until the warm-up has given every stepped parameter an estimate.
        """
        noise = torch.zeros((), dtype=torch.float64)
        signal = torch.zeros((), dtype=torch.float64)
        eps = 0.0
        seen = False
        for group, _, state in self._estimates():
            if int(state["step"]) < max(1, group["warmup_steps"]):
                return None
            g_avg, s_avg = state["grad_average"].double(), state["square_average"].double()
            mean_sq = g_avg * g_avg
            noise += group["lambda_b"] * state["batch_size"] * (s_avg - mean_sq).clamp_min(0).sum()
            signal += mean_sq.sum()
            eps = max(eps, group["eps"])
            seen = True
        if not seen:
            return None
        group = self._shard_group_of(p for _, p, _ in self._estimates())
        if group is not None:  # sharded params (FSDP): sum over every rank's coordinates
            import torch.distributed as dist

            totals = torch.stack((noise, signal)).to(next(p for _, p, _ in self._estimates()).device)
            dist.all_reduce(totals, group=group)
            noise, signal = totals.cpu()
        return float(noise / (signal + eps))


class AdaptiveBatchSampler(Sampler[list[int]]):
    """A batch sampler whose batch size follows ``optimizer.suggested_batch_size()``.

    Use as ``DataLoader(dataset, batch_sampler=AdaptiveBatchSampler(dataset, opt, ...))``.
    Before each batch it reads the suggestion, clamps it to [min_batch_size, max_batch_size],
    and changes the batch size only when the suggestion leaves the band
    [B/(1+hysteresis), B·(1+hysteresis)] around the current B; on a change it calls
    ``optimizer.set_batch_size``. With ``num_workers > 0`` the DataLoader prefetches batches
    ahead of the optimizer, so call ``optimizer.set_batch_size(len(batch))`` in the loop.
    ``history`` records the size of every batch drawn.
    """

    def __init__(
        self,
        data_source: Sized | Sampler[int],
        optimizer: AdaptiveBatchSGD,
        *,
        min_batch_size: int = 1,
        max_batch_size: int | None = None,
        hysteresis: float = 0.5,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if not hasattr(optimizer, "suggested_batch_size") or not hasattr(optimizer, "set_batch_size"):
            raise TypeError("optimizer must offer suggested_batch_size() and set_batch_size()")
        if isinstance(data_source, Sampler):
            self.sampler: Sampler[int] | Iterable[int] = data_source
        else:
            self.sampler = RandomSampler(data_source, generator=generator)  # type: ignore[arg-type]
        max_batch_size = max_batch_size if max_batch_size is not None else 2**31
        if not (1 <= min_batch_size <= max_batch_size):
            raise ValueError(
                f"need 1 <= min_batch_size <= max_batch_size, got {min_batch_size}, {max_batch_size}"
            )
        check_positive(hysteresis, "hysteresis", allow_zero=True)
        self.optimizer = optimizer
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.hysteresis = hysteresis
        self.drop_last = drop_last
        self.batch_size = min(max(optimizer.batch_size, min_batch_size), max_batch_size)
        self.history: list[int] = []
        if self.batch_size != optimizer.batch_size:
            optimizer.set_batch_size(self.batch_size)

    def _follow_suggestion(self) -> None:
        suggestion = self.optimizer.suggested_batch_size()
        if suggestion is None or suggestion != suggestion:  # None or NaN: no estimate yet
            return
        target = int(round(min(max(suggestion, self.min_batch_size), self.max_batch_size)))
        band = 1.0 + self.hysteresis
        if target > self.batch_size * band or target * band < self.batch_size:
            self.batch_size = target
            self.optimizer.set_batch_size(target)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        if self.optimizer.batch_size != self.batch_size:  # after a short final batch
            self.optimizer.set_batch_size(self.batch_size)
        self._follow_suggestion()
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                self.history.append(len(batch))
                yield batch
                batch = []
                self._follow_suggestion()
        if batch and not self.drop_last:
            self.history.append(len(batch))
            self.optimizer.set_batch_size(len(batch))
            yield batch
