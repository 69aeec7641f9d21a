"""What the learned optimizers share: loading a rule (shipped name, path, module or fresh),
its fingerprint in ``state_dict`` (a state is only loaded by an optimizer with the same φ),
copies of the rule per device, and pickling the rule along with the optimizer."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import fused_unavailable
from ..rules import load_rule
from ._base import PackageOptimizer, check_positive

__all__ = ["LearnedRuleOptimizer", "rule_fingerprint", "check_state_dtype"]


def rule_fingerprint(rule: nn.Module) -> str:
    """sha256 of a rule's tensors (name, shape, float32 bytes): which φ an optimizer state belongs to."""
    digest = hashlib.sha256()
    for key, value in sorted(rule.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


STATE_DTYPES = (torch.float32, torch.bfloat16)


def check_state_dtype(dtype: Any) -> torch.dtype:
    """The ``state_dtype`` of a learned optimizer: float32 or bfloat16 (storage only; math is float32)."""
    if dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype


def copy_rule(rule: nn.Module) -> nn.Module:
    """An independent copy of a rule, cut from any graph."""
    fresh = copy.deepcopy(rule)
    fresh.requires_grad_(False)
    return fresh


class LearnedRuleOptimizer(PackageOptimizer):
    """Base of the optimizers that run a learned rule under ``no_grad``.

    ``rule_state_keys`` name the state entries that belong to the rule (kept in the rule's
    float32, whatever the param's dtype).
    """

    # A rule is an nn.Module with the interface learned_optim.rules describes (``name``, ``dtype``,
    # ``segments``, ``init_state``, ...), which nn.Module's typing cannot express: the base holds
    # it as Any; subclasses declare their rule's class (e.g. LSTMOptimizer's ``rule: LSTMGACRule``).
    rule_class: type[Any]
    rule: Any
    rule_state_keys: tuple[str, ...] = ("rule_state",)
    state_dtype: torch.dtype = torch.float32  # storage of the rule state (LSTMOptimizer's state_dtype=)

    def _load(self, weights: str | os.PathLike | nn.Module | None, seed: int,
              fresh: Callable[[int], nn.Module]) -> None:
        if weights is None:
            rule, meta = fresh(seed), {"name": None}
        elif isinstance(weights, self.rule_class):
            rule, meta = copy_rule(weights), {"name": None}
        elif isinstance(weights, nn.Module):
            raise TypeError(f"{type(self).__name__} needs an {self.rule_class.__name__}, got a {type(weights).__name__}")
        else:
            rule, meta = load_rule(weights, expected_rule=self.rule_class.name)
        rule.requires_grad_(False).eval()
        self.rule = rule.to(torch.float32)
        self.weights_metadata: dict[str, Any] = meta
        self._fingerprint = rule_fingerprint(self.rule)
        self._rules_on: dict[torch.device, Any] = {}
        self._segments: dict[tuple, Any] = {}  # layouts per (device, tensor sizes, shard group): built once
        self._packed: dict[tuple, tuple[Tensor, list[Tensor]]] = {}  # flat state buffers, see _packed_state
        self._flat: dict[tuple, tuple[Tensor, Tensor]] = {}  # flat gradient and update buffers, see _flat_grad

    def __getstate__(self) -> dict[str, Any]:
        """``Optimizer`` pickles only defaults, state and param groups; the rule comes along too."""
        state = super().__getstate__()
        state.update(rule=self.rule, weights_metadata=self.weights_metadata, state_dtype=self.state_dtype,
                     _fingerprint=self._fingerprint, _rules_on={}, _segments={}, _packed={}, _flat={})
        return state

    @staticmethod
    def _check_weight_decay(group: dict[str, Any]) -> None:
        check_positive(group.setdefault("weight_decay", 0.0), "weight_decay", allow_zero=True)  # 0: a state from before

    @staticmethod
    def _check_fused(group: dict[str, Any]) -> None:
        """``fused`` is None, False, or True where the kernels can run on every param's device."""
        fused = group.setdefault("fused", None)  # a state_dict saved before the option existed
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"fused must be True, False or None, got {fused!r}")
        if fused:
            for device in {p.device for p in group["params"]}:
                reason = fused_unavailable(device)
                if reason is not None:
                    raise ValueError(f"fused=True: {reason}")

    @staticmethod
    def _spread_row(scalars: list[Tensor] | Tensor, sizes: tuple[int, ...], device: torch.device) -> Tensor:
        """Per-parameter float32 scalars (the step counts t, or LSTMOptimizer's s_0 rows (R, n), already a
        tensor) spread over their coordinates: an (N,) float32 row (or (R, N) rows) on ``device``, which the
        rule advances as scratch."""
        values = (scalars if isinstance(scalars, Tensor) else torch.stack(scalars)).to(device, torch.float32)
        return torch.repeat_interleave(values, torch.tensor(sizes, device=device), dim=-1, output_size=sum(sizes))

    @staticmethod
    def _step_of_count_row(t_row: Tensor) -> Tensor:
        """A saved float32 state's step-count row (N,) as the per-parameter ``state[p]["step"]``."""
        return (t_row[0] if t_row.numel() else t_row.new_zeros(())).detach().to("cpu", torch.float32).clone()

    @staticmethod
    def _count_row_of_step(step: Any, like: Tensor) -> Tensor:
        """A per-parameter ``state[p]["step"]`` as a (1, N) float32 count row beside the rows ``like``."""
        return torch.as_tensor(step, dtype=torch.float32).to(like.device).expand(1, like.shape[1])

    @staticmethod
    def _decay(group: dict[str, Any], params: list[Tensor]) -> None:
        """Decoupled weight decay, as AdamW: θ ← θ·(1 − lr·λ), before the learned step is added
        (so a schedule that scales ``lr`` scales the decay with it)."""
        decay = group["lr"] * group["weight_decay"]
        if decay:
            torch._foreach_mul_(params, 1.0 - decay)

    def _state_dtype(self, param: Tensor, key: str) -> torch.dtype:
        return self.state_dtype if key in self.rule_state_keys else super()._state_dtype(param, key)

    def _rule_on(self, device: torch.device) -> Any:
        if device == self.rule.device:
            return self.rule
        if device not in self._rules_on:
            self._rules_on[device] = copy_rule(self.rule).to(device)
        return self._rules_on[device]

    def _layout(self, rule: Any, device: torch.device, sizes: tuple[int, ...], process_group: Any = None) -> Any:
        """The rule's layout for tensors of ``sizes`` coordinates (this rank's shards, when
        ``process_group`` shards them: then averages are all-reduced across it)."""
        key = (device, sizes, id(process_group))
        if key not in self._segments:
            self._segments[key] = rule.segments(sizes, device, process_group)
        return self._segments[key]

    def _packed_state(self, key: Any, states: list[dict], entry: str) -> Tensor:
        """One (R, N) buffer whose column blocks are ``states[i][entry]`` (R, nᵢ), which become
        views of it: the rule then steps a whole param group in place, with no cat of the
        states before the step and no copy back after.

        Packing copies once (first step, after ``load_state_dict``, or when the set of params
        with gradients changes); later steps find the same views and reuse the buffer.
        """
        views = [s[entry] for s in states]
        cached = self._packed.get(key)
        if cached is not None and len(cached[1]) == len(views) and all(a is b for a, b in zip(cached[1], views)):
            return cached[0]
        buffer = torch.cat(views, dim=-1)
        views = list(buffer.split([v.shape[-1] for v in views], dim=-1))
        for state, view in zip(states, views):
            state[entry] = view
        self._packed[key] = (buffer, views)
        return buffer

    def _flat_grad(self, key: Any, grads: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The gradients concatenated into one (N,) vector in ``dtype``, and an (N,) buffer for
        the update: both kept between steps (a fresh N-sized tensor per step costs page faults)."""
        size = sum(g.numel() for g in grads)
        buffers = self._flat.get(key)
        if buffers is None or buffers[0].numel() != size or buffers[0].dtype != dtype:
            buffers = (torch.empty(size, dtype=dtype, device=grads[0].device),
                       torch.empty(size, dtype=dtype, device=grads[0].device))
            self._flat[key] = buffers
        flat_grad, update = buffers
        torch.cat([g.reshape(-1) for g in grads], out=flat_grad)
        return flat_grad, update

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict`` plus the fingerprint of the rule the states belong to."""
        out = super().state_dict()
        out["rule"] = {"name": self.rule.name, "fingerprint": self._fingerprint}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by an optimizer with the same weights (checked)."""
        saved = state_dict.get("rule")
        if saved is not None and saved.get("fingerprint") != self._fingerprint:
            raise ValueError(
                f"this state_dict was saved by an {type(self).__name__} with other weights "
                f"(rule fingerprint {str(saved.get('fingerprint'))[:12]}…, this optimizer's "
                f"{self._fingerprint[:12]}…); its rule states would be meaningless here"
            )
        super().load_state_dict(state_dict)
