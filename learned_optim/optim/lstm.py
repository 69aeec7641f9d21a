"""LSTMOptimizer: the learned LSTM+GAC update rule (Andrychowicz et al. 2016) as a drop-in
``torch.optim.Optimizer``.

Each step flattens the gradients of a param group into one vector, runs the rule over all
coordinates in place, chunk by chunk (:meth:`~learned_optim.rules.LSTMGACRule.step_`), and
adds ``lr`` times its output: θ_{t+1} = θ_t + lr·g_t. Every coordinate's rule state (LSTM
hidden and cell states, and momentum sums and their second moment if the weights use them)
lives in ``optimizer.state[p]["rule_state"]`` (float32, shape (rule.config.state_rows, numel)),
so ``state_dict`` round-trips like any torch optimizer's. Those entries are views of one
(rows, N) buffer per param group and device, which the rule updates in place: no state is
concatenated or copied back per step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor

from ..kernels import use_fused
from ..registry import register
from ..rules import LSTMGACRule
from ..rules.lstm_gac import default_chunk
from ._base import check_positive
from ._learned import LearnedRuleOptimizer, check_state_dtype, rule_fingerprint

__all__ = ["LSTMOptimizer", "DEFAULT_WEIGHTS", "rule_fingerprint"]

#: The shipped weights LSTMOptimizer loads when none are named: "suite-relative-discount", the tensors of
#: "suite-relative-offset" with relative_floor and shrink_discount: the step is relative to each tensor's
#: RMS (relative_step ε_θ = 0.01, Celo's), a factor that follows the RMS up but never falls below its value
#: at the first step ("suite-relative-floor", the default before it), and whose growth after a shrink counts
#: at the shrink's ratio. Those tensors were meta-trained from a fresh rule on the suite's families, the
#: paper's MNIST MLP and quadratics ("suite-relative", then one more run with the quadratics' log meta-loss
#: floored at 0.01). "suite-steps-t500" steps in the parameters' units.
DEFAULT_WEIGHTS = "suite-relative-discount"


@register(
    "lstm-gac",
    summary="learned coordinatewise LSTM+GAC optimizer (Andrychowicz et al. 2016), shipped weights",
    example_kwargs={"lr": 1.0},
    lr_grid=(1.0,),
)
class LSTMOptimizer(LearnedRuleOptimizer):
    """The learned LSTM+GAC optimizer; one line replaces Adam::

        opt = learned_optim.LSTMOptimizer(model.parameters())   # default shipped weights

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        weights: the name of shipped weights (``learned_optim.available_weights()``), a path
            to ``NAME.safetensors``/``NAME.json``, an :class:`LSTMGACRule` (copied), or
            ``None`` for a freshly initialised rule (seeded by ``seed``; for meta-training).
        lr: multiplies the learned update; 1 is what the weights were meta-trained with.
        weight_decay: λ of decoupled weight decay, as in AdamW: θ ← θ·(1 − lr·λ) each step
            before the learned step (with the default lr of 1, λ is the fraction decayed per
            step: ``AdamW(lr=1e-3, weight_decay=0.01)`` decays by 1e-5 per step, as λ = 1e-5 does here).
        check_finite: refuse NaN/inf gradients (naming the parameter) before touching anything.
        seed: initialisation seed when ``weights`` is None.
        chunk_size: coordinates per chunk of the eager in-place step (a speed knob, not a
            change of the update; ``None``: 16384 on the CPU, where a chunk's working set then
            stays in cache, and 2²⁰ on GPUs, where larger chunks mean fewer kernel launches).
        fused: step through the Triton kernels (``learned_optim.kernels``): ``None`` where they
            can run (CUDA with triton installed, or CPU tensors under ``TRITON_INTERPRET=1``),
            ``True`` to require them, ``False`` for the eager step. Same update up to rounding.
        state_dtype: the dtype the per-coordinate rule state (LSTM h and c, momentum sums, v)
            is stored in: ``torch.float32`` (default) or ``torch.bfloat16`` (half the memory;
            all math stays float32). With bias correction the step count t is then kept per
            parameter in ``state[p]["step"]``, as Adam keeps it, since bfloat16 cannot count
            past 256.
    """

    rule_class = LSTMGACRule
    rule: LSTMGACRule

    def __init__(
        self,
        params: Iterable[Any],
        weights: str | os.PathLike | LSTMGACRule | None = DEFAULT_WEIGHTS,
        *,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        check_finite: bool = True,
        seed: int = 0,
        chunk_size: int | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        self._load(weights, seed, lambda s: LSTMGACRule(seed=s))
        self.state_dtype = check_state_dtype(state_dtype)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, check_finite=check_finite,
                                      chunk_size=chunk_size, fused=fused))

    @property
    def _count_apart(self) -> bool:
        """Whether the step counts t live in ``state[p]["step"]`` rather than in the rule state's t row."""
        return self.rule.config.bias_correction and self.state_dtype != torch.float32

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr")
        self._check_weight_decay(group)
        chunk = group.setdefault("chunk_size", None)  # a state_dict saved before the option existed
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk!r}")
        self._check_fused(group)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        cfg = self.rule.config
        rows = cfg.drop_in_rows - int(self._count_apart)
        state["rule_state"] = torch.zeros(rows, param.numel(), dtype=self.state_dtype, device=param.device)
        if self._count_apart:
            state["step"] = torch.zeros((), dtype=torch.float32)
        if cfg.origin_rows:  # s_0 of scale_growth/relative_floor (then m_t), per tensor: 0 until its first step
            state["scale_origin"] = torch.zeros(cfg.origin_rows, dtype=torch.float32, device=param.device)

    def _state_dtype(self, param: Tensor, key: str) -> torch.dtype:
        return torch.float32 if key == "scale_origin" else super()._state_dtype(param, key)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by an optimizer with the same weights, in either ``state_dtype``
        (converted: a float32 state's step-count row becomes ``state[p]["step"]`` and back)."""
        super().load_state_dict(self._converted_layout(state_dict))

    def _converted_layout(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        rows, origin_rows = self.rule.config.drop_in_rows, self.rule.config.origin_rows
        converted = {}
        for pid, entry in state_dict.get("state", {}).items():
            rule_state = entry.get("rule_state") if isinstance(entry, dict) else None
            if rule_state is not None:
                origin = entry.get("scale_origin")
                held = 0 if origin is None else origin.numel()
                if held != origin_rows:
                    raise ValueError(f"state of parameter {pid} holds {held} scale origin value(s) (scale_origin), "
                                     f"this optimizer's rule keeps {origin_rows} per tensor (s_0 with relative_floor or "
                                     "scale_growth, m_t with shrink_discount): it was saved with another config")
            if rule_state is None or not self.rule.config.bias_correction:
                converted[pid] = entry
                continue
            entry = dict(entry)
            if self._count_apart and rule_state.shape[0] == rows:  # t row → per-parameter step
                entry["step"] = self._step_of_count_row(rule_state[-1])
                entry["rule_state"] = rule_state[:-1]
            elif not self._count_apart and rule_state.shape[0] == rows - 1 and "step" in entry:  # and back
                t = self._count_row_of_step(entry.pop("step"), rule_state)
                entry["rule_state"] = torch.cat((rule_state.float(), t))
            converted[pid] = entry
        return {**state_dict, "state": converted}

    @staticmethod
    def _gather_origins(origins: Tensor, origin_rows: Tensor, sizes: tuple[int, ...]) -> None:
        """Each tensor's s_0 (and m_t) (R, n) back from the flat rows (R, N) the rule set, from the
        tensor's first coordinate (a shard with none of a tensor's coordinates keeps its 0)."""
        counts = torch.tensor(sizes, device=origin_rows.device)
        starts = (torch.cumsum(counts, 0) - counts).clamp_max(max(origin_rows.shape[-1] - 1, 0))
        if origin_rows.shape[-1]:
            origins.copy_(torch.where(counts > 0, origin_rows[:, starts], origins))

    def _update_group(self, group, params, grads, states, originals) -> None:
        # Sharded params (FSDP2 DTensors) arrive as this rank's shards; the GAC averages are
        # then all-reduced across the group they are sharded over, as if unsharded.
        process_group = self._shard_group_of(originals)
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        for device, indices in by_device.items():
            rule: LSTMGACRule = self._rule_on(device)
            sizes = tuple(params[i].numel() for i in indices)
            layout = self._layout(rule, device, sizes, process_group)
            rule_state = self._packed_state((id(group), device), [states[i] for i in indices], "rule_state")
            flat_grad, update = self._flat_grad((id(group), device), [grads[i] for i in indices], rule.dtype)
            chunk = group["chunk_size"] or default_chunk(device)
            steps = [states[i]["step"] for i in indices] if self._count_apart else []
            count = self._spread_row(steps, sizes, device) if steps else None
            targets = [params[i] for i in indices]
            # s_0 (then m_t) per tensor (scale_growth, relative_floor): one buffer whose elements the states
            # view, tensor by tensor; as (R, n), a row per kept number
            origins = self._packed_state((id(group), device, "scale_origin"), [states[i] for i in indices],
                                         "scale_origin").view(len(indices), -1).t() if rule.config.origin_rows else None
            # θ_t, for a parameter-relative step: per tensor, unless sharded (then flat, its scopes all-reduced)
            # or with scale_growth (whose g_t is an input per coordinate)
            per_tensor = rule.needs_params and process_group is None and not rule.config.scale_growth
            scales = rule.tensor_param_scales(targets) if per_tensor else None  # step() runs under no_grad
            if scales is not None and origins is not None:  # relative_floor: max(s_t, s_0) per tensor (or discounted)
                scales = rule.floored_tensor_scales(scales, origins)
            flat_params = torch.cat([p.detach().reshape(-1) for p in targets]).to(rule.dtype) \
                if rule.needs_params and not per_tensor else None
            origin_row = self._spread_row(origins, sizes, device) if origins is not None and not per_tensor else None
            rule.step_(flat_grad, rule_state, layout, update, chunk=chunk, count=count,
                       fused=use_fused(group["fused"], device), params=flat_params, apply_param_scale=not per_tensor,
                       origin=origin_row)
            if origin_row is not None:  # s_0 (m_t) as the rule set them: every coordinate of a tensor holds its own
                self._gather_origins(cast(Tensor, origins), origin_row, sizes)
            if steps:
                torch._foreach_add_(steps, 1.0)
            pieces = [u.view(p.shape) for u, p in zip(update.split(sizes), targets)]
            if scales is not None:
                torch._foreach_mul_(pieces, scales)
            updates = [u.to(p.dtype) for u, p in zip(pieces, targets)]
            self._decay(group, targets)
            torch._foreach_add_(targets, updates, alpha=group["lr"])
