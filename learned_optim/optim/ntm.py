"""NTMBFGS: the learned NTM-BFGS rule (Andrychowicz et al. 2016, appendix) as a drop-in
``torch.optim.Optimizer``.

Each step flattens the gradients of a param group into one vector and runs the rule on all
its coordinates at once (:class:`~learned_optim.rules.NTMBFGSRule`, under ``no_grad``):
θ_{t+1} = θ_t + lr·g_t. One memory M is shared by all coordinates of a param group, so the
group's params must live on one device. State, all in ``optimizer.state`` (so
``state_dict`` round-trips):

- ``state[p]["rule_state"]``: every coordinate's controller state and its previous key, step
  and read (float32, (rule.config.state_rows, numel)); with ``state_dtype=torch.bfloat16``
  the controller's rows only, in bfloat16, and the last 4 (the previous gradient, key, step and
  read, which the memory's inner products use) in ``state[p]["carried"]``, float32, and a
  bias-corrected controller's step count t in ``state[p]["step"]`` (float32, as Adam keeps it);
- the group's memory, in the state of the group's first param that has a gradient:
  ``"memory"`` (dense (1, n, n), or limited (1, 2, K, n)) and ``"memory_params"`` (a list of
  the positions in the group of the params it covers). The memory spans exactly the params that
  have gradients; when that set changes, it starts again from M₀.

Memory cost per param group of n coordinates (float32): dense 4·n² bytes (4 MB at n = 1,000),
limited 8·K·n bytes (K = 30: 240 bytes per parameter, against Adam's 8).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..kernels import use_fused
from ..registry import register
from ..rules import NTMBFGSRule
from ..rules.lstm_gac import default_chunk
from ._base import check_positive, shard_group
from ._learned import LearnedRuleOptimizer, check_state_dtype

__all__ = ["NTMBFGS", "NTM_DEFAULT_WEIGHTS"]

#: The shipped weights NTMBFGS loads when none are named: "ntm-bfgs-k3-short", which has
#: "ntm-bfgs-k3"'s config (the controller's β₂ = 0.985; the limited memory keeps only the latest
#: step's three write pairs, K = 3) and "suite-steps-t500" (LSTMOptimizer's default until
#: "suite-relative", since followed by "suite-relative-offset", "-floor" and "-discount") as its controller;
#: only the memory's learned part (read multiplier η, write modulations δ_w, the controller's two
#: read-input rows) was meta-trained for it, by 437 s of PES, so its whole recorded chain fits 3 hours.
#: "ntm-bfgs-k3" (the default before it) is the same config with "ntm-bfgs-bases"' tensors, whose
#: memory part had 6,126 s of meta-training at β₂ 0.999 and K = 30. "ntm-bfgs-bases" is the
#: controller "suite-steps-t500" with memory heads meta-trained for it, the memory's trust region
#: τ = 1000, BFGS's own write bases and the dense memory for small param groups (memory="auto").
#: "ntm-bfgs-trust" has the learned bases and the limited memory; "ntm-bfgs-decay" ends lower on
#: small MLPs but stalls on transformers; "ntm-bfgs-mnist" is an MNIST-MLP specialist;
#: "ntm-bfgs-quadratic" is ahead on the paper's quadratics and diverges on Rosenbrock and on small MLPs.
NTM_DEFAULT_WEIGHTS = "ntm-bfgs-k3-short"


@register(
    "ntm-bfgs",
    summary="learned NTM-BFGS optimizer (Andrychowicz et al. 2016): LSTM+GAC controller, shared low-rank memory",
    example_kwargs={"lr": 1.0},
    lr_grid=(1.0,),
)
class NTMBFGS(LearnedRuleOptimizer):
    """The learned quasi-Newton optimizer NTM-BFGS; one line replaces Adam::

        opt = learned_optim.NTMBFGS(model.parameters())   # default shipped weights ("ntm-bfgs-k3-short")

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. Each param
            group shares one memory, so its params must be on one device.
        weights: shipped weights' name, a path to ``NAME.safetensors``/``NAME.json``, an
            :class:`~learned_optim.rules.NTMBFGSRule` (copied), or ``None`` for a freshly
            initialised rule (BFGS plus an untrained controller; seeded by ``seed``).
        memory: ``"dense"``, ``"limited"`` or ``"auto"`` (dense up to 1,024 coordinates per
            group); None keeps the weights' setting.
        memory_capacity: K, the write pairs the limited memory keeps; None keeps the weights'.
        curvature_eps: ε of the skip rule (a pair is written only if yᵀs > ε·‖y‖·‖s‖); None
            keeps the weights'. Minibatch noise makes y nearly orthogonal to s, and the weights'
            1e-3 then admits pairs with ρ = 1/yᵀs up to 1000/(‖y‖·‖s‖): ``ntm-bfgs-quadratic``
            (meta-trained on deterministic quadratics) blows up on MNIST MLPs with it and
            trains them with 0.1 (see README, "NTM-BFGS on stochastic tasks").
        lr: multiplies the learned update; 1 is what the weights were meta-trained with (the
            rule's memory is built from its own steps, so other values change its meaning).
        weight_decay: λ of decoupled weight decay, as in AdamW: θ ← θ·(1 − lr·λ) each step
            before the learned step (with the default lr of 1, λ is the fraction decayed per
            step: ``AdamW(lr=1e-3, weight_decay=0.01)`` decays by 1e-5 per step, as λ = 1e-5 does here).
        check_finite: refuse NaN/inf gradients (naming the parameter) before touching anything.
        seed: initialisation seed when ``weights`` is None.
        fused: step the LSTM+GAC controller through the Triton kernels (``learned_optim.kernels``):
            ``None`` where they can run (CUDA with triton installed, or CPU tensors under
            ``TRITON_INTERPRET=1``), ``True`` to require them, ``False`` for the eager step.
        state_dtype: ``torch.float32`` (default) or ``torch.bfloat16``: the dtype the
            controller's per-coordinate state (LSTM h and c, momentum sums, v) is stored in; the
            carried rows, the memory and a bias-corrected controller's step count (then in
            ``state[p]["step"]``) stay float32.
    """

    rule_class = NTMBFGSRule
    rule: NTMBFGSRule
    rule_state_keys = ("rule_state", "memory", "carried")

    def __init__(
        self,
        params: Iterable[Any],
        weights: str | os.PathLike | NTMBFGSRule | None = NTM_DEFAULT_WEIGHTS,
        *,
        memory: str | None = None,
        memory_capacity: int | None = None,
        curvature_eps: float | None = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        check_finite: bool = True,
        seed: int = 0,
        fused: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        self._load(weights, seed, lambda s: NTMBFGSRule(seed=s))
        self.state_dtype = check_state_dtype(state_dtype)
        if memory is not None or memory_capacity is not None or curvature_eps is not None:
            try:
                self.rule = self.rule.with_memory(memory, memory_capacity, curvature_eps)
            except (TypeError, ValueError) as error:
                raise ValueError(f"NTMBFGS: {error}") from None
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, check_finite=check_finite, fused=fused))

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr")
        self._check_weight_decay(group)
        self._check_fused(group)
        if self.rule.config.memory == "dense" and any(shard_group(p) is not None for p in group["params"]):
            raise ValueError("NTMBFGS: the dense memory (n × n) cannot be sharded across ranks, and these "
                             "parameters are sharded (FSDP); use memory='limited' (or 'auto', which picks it)")
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"NTMBFGS shares one memory per param group, so a group's params must be on one "
                             f"device; this group has params on {', '.join(sorted(map(str, devices)))}")

    @property
    def _split(self) -> bool:
        """Whether the controller's rows are stored apart (in ``state_dtype``) from the carried rows."""
        return self.state_dtype != torch.float32

    @property
    def _count_apart(self) -> bool:
        """Whether a bias-corrected controller's step counts t live in ``state[p]["step"]`` (float32,
        as Adam keeps them) rather than in the last controller row: a bfloat16 row cannot count."""
        return self._split and self.rule.config.controller.bias_correction

    def _state_dtype(self, param: Tensor, key: str) -> torch.dtype:
        if key == "rule_state":
            return self.state_dtype
        return self.rule.dtype if key in self.rule_state_keys else super()._state_dtype(param, key)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        controller_rows = self.rule.config.controller.state_rows
        if self._split:
            state["rule_state"] = torch.zeros(controller_rows - int(self._count_apart), param.numel(),
                                              dtype=self.state_dtype, device=param.device)
            if self._count_apart:
                state["step"] = torch.zeros((), dtype=torch.float32)
            state["carried"] = torch.zeros(self.rule.config.state_rows - controller_rows, param.numel(),
                                           dtype=self.rule.dtype, device=param.device)
        else:
            state["rule_state"] = torch.zeros(self.rule.config.state_rows, param.numel(), dtype=self.rule.dtype,
                                              device=param.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by an optimizer with the same weights, in either ``state_dtype``
        (converted: the carried rows move between ``rule_state`` and ``carried``, and a
        bias-corrected controller's step-count row to ``state[p]["step"]`` and back)."""
        controller_rows = self.rule.config.controller.state_rows
        counted = self.rule.config.controller.bias_correction
        converted = {}
        for pid, entry in state_dict.get("state", {}).items():
            rule_state = entry.get("rule_state") if isinstance(entry, dict) else None
            if rule_state is not None:
                entry = dict(entry)
                if self._split and "carried" not in entry:  # float32 layout → split
                    entry["carried"] = rule_state[controller_rows:].float()
                    entry["rule_state"] = rule_state[:controller_rows]
                    if counted:  # the t row → a per-parameter step, as LSTMOptimizer keeps it
                        entry["step"] = self._step_of_count_row(rule_state[controller_rows - 1])
                        entry["rule_state"] = rule_state[:controller_rows - 1]
                elif not self._split and "carried" in entry:  # and back
                    rows = [rule_state.float()]
                    if counted and "step" in entry:
                        rows.append(self._count_row_of_step(entry.pop("step"), rule_state))
                    entry["rule_state"] = torch.cat((*rows, entry.pop("carried").float()))
            converted[pid] = entry
        super().load_state_dict({**state_dict, "state": converted})

    def _update_group(self, group, params, grads, states, originals) -> None:
        device = params[0].device
        rule = self._rule_on(device)
        sizes = tuple(p.numel() for p in params)  # of this rank's shards, for sharded (FSDP) params,
        layout = self._layout(rule, device, sizes, self._shard_group_of(originals))  # whose sums are all-reduced
        positions = {id(p): i for i, p in enumerate(group["params"])}
        covered = [positions[id(p)] for p in originals]
        owner = states[0]
        memory = owner.get("memory")
        if memory is None or list(owner.get("memory_params", ())) != covered:
            memory = None  # first step, or other params have gradients now: start from M₀
            for p in group["params"]:  # one memory per group: drop any other (stale) copy
                other = self.state.get(p)
                if other is not None and other is not owner:
                    other.pop("memory", None)
                    other.pop("memory_params", None)
        flat_grad, update = self._flat_grad((id(group), device), grads, rule.dtype)
        coords = self._packed_state((id(group), device), states, "rule_state")  # stepped in place
        carried = self._packed_state((id(group), device, "carried"), states, "carried") if self._split else None
        if memory is None:
            _, memory = rule.init_state(flat_grad.numel(), device=device, segments=layout)
        steps = [state["step"] for state in states] if self._count_apart else []
        count = self._spread_row(steps, sizes, device) if steps else None
        new_memory = rule.step_(flat_grad, (coords, memory), layout, update, chunk=default_chunk(device),
                               fused=use_fused(group["fused"], device), carried=carried, count=count)
        if steps:
            torch._foreach_add_(steps, 1.0)
        updates = [u.view(p.shape).to(p.dtype) for u, p in zip(update.split(sizes), params)]
        self._decay(group, params)
        torch._foreach_add_(params, updates, alpha=group["lr"])
        owner["memory"] = new_memory
        owner["memory_params"] = covered
