"""LSTMOptimizer: the learned LSTM+GAC update rule (Andrychowicz et al. 2016) as a drop-in
``torch.optim.Optimizer``.

Each step flattens the gradients of a param group into one vector, runs the rule on all
coordinates at once (:class:`~learned_optim.rules.LSTMGACRule`, under ``no_grad``) and adds
``lr`` times its output: θ_{t+1} = θ_t + lr·g_t. Every coordinate's rule state (LSTM hidden
and cell states, and momentum sums and their second moment if the weights use them) lives in
``optimizer.state[p]["rule_state"]`` (float32, shape (rule.config.state_rows, numel)), so
``state_dict`` round-trips like any torch optimizer's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..registry import register
from ..rules import LSTMGACRule, Segments, load_rule
from ._base import PackageOptimizer, check_positive

__all__ = ["LSTMOptimizer", "DEFAULT_WEIGHTS", "rule_fingerprint"]

#: The shipped weights LSTMOptimizer loads when none are named.
DEFAULT_WEIGHTS = "mnist"

_FRESH = object()


def rule_fingerprint(rule: torch.nn.Module) -> str:
    """sha256 of a rule's tensors (name, shape, float32 bytes): which φ an optimizer state belongs to."""
    digest = hashlib.sha256()
    for key, value in sorted(rule.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@register(
    "lstm-gac",
    summary="learned coordinatewise LSTM+GAC optimizer (Andrychowicz et al. 2016), shipped weights",
    example_kwargs={"lr": 1.0},
    lr_grid=(1.0,),
)
class LSTMOptimizer(PackageOptimizer):
    """The learned LSTM+GAC optimizer; one line replaces Adam::

        opt = learned_optim.LSTMOptimizer(model.parameters())   # default shipped weights

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        weights: the name of shipped weights (``learned_optim.available_weights()``), a path
            to ``NAME.safetensors``/``NAME.json``, an :class:`LSTMGACRule` (copied), or
            ``None`` for a freshly initialised rule (seeded by ``seed``; for meta-training).
        lr: multiplies the learned update; 1 is what the weights were meta-trained with.
        check_finite: refuse NaN/inf gradients (naming the parameter) before touching anything.
        seed: initialisation seed when ``weights`` is None.
    """

    def __init__(
        self,
        params: Iterable[Any],
        weights: str | os.PathLike | LSTMGACRule | None = DEFAULT_WEIGHTS,
        *,
        lr: float = 1.0,
        check_finite: bool = True,
        seed: int = 0,
    ) -> None:
        if weights is None:
            rule, meta = LSTMGACRule(seed=seed), {"name": None}
        elif isinstance(weights, LSTMGACRule):
            rule, meta = _copy_rule(weights), {"name": None}
        else:
            rule, meta = load_rule(weights, expected_rule=LSTMGACRule.name)
        rule.requires_grad_(False).eval()
        self.rule: LSTMGACRule = rule.to(torch.float32)
        self.weights_metadata: dict[str, Any] = meta
        self._fingerprint = rule_fingerprint(self.rule)
        self._rules_on: dict[torch.device, LSTMGACRule] = {}
        self._segments: dict[tuple, Segments] = {}  # GAC scopes per (device, tensor sizes): built once
        super().__init__(params, dict(lr=lr, check_finite=check_finite))

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr")

    def __getstate__(self) -> dict[str, Any]:
        """``Optimizer`` pickles only defaults, state and param groups; the rule comes along too."""
        state = super().__getstate__()
        state.update(rule=self.rule, weights_metadata=self.weights_metadata,
                     _fingerprint=self._fingerprint, _rules_on={}, _segments={})
        return state

    def _state_dtype(self, param: Tensor, key: str) -> torch.dtype:
        return self.rule.dtype if key == "rule_state" else super()._state_dtype(param, key)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        state["rule_state"] = self.rule.init_state(param.numel(), device=param.device)

    def _rule_on(self, device: torch.device) -> LSTMGACRule:
        if device == self.rule.device:
            return self.rule
        if device not in self._rules_on:
            self._rules_on[device] = _copy_rule(self.rule).to(device)
        return self._rules_on[device]

    def _update_group(self, group, params, grads, states, originals) -> None:
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        for device, indices in by_device.items():
            rule = self._rule_on(device)
            sizes = tuple(params[i].numel() for i in indices)
            key = (device, sizes)
            if key not in self._segments:
                self._segments[key] = rule.segments(sizes, device)
            flat_grad = torch.cat([grads[i].reshape(-1) for i in indices]).to(rule.dtype)
            rule_state = torch.cat([states[i]["rule_state"] for i in indices], dim=-1)
            update, new_state = rule(flat_grad, rule_state, self._segments[key])
            targets = [params[i] for i in indices]
            updates = [u.view(p.shape).to(p.dtype) for u, p in zip(update.split(sizes), targets)]
            torch._foreach_add_(targets, updates, alpha=group["lr"])
            torch._foreach_copy_([states[i]["rule_state"] for i in indices], list(new_state.split(sizes, dim=-1)))

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict`` plus the fingerprint of the rule the LSTM states belong to."""
        out = super().state_dict()
        out["rule"] = {"name": self.rule.name, "fingerprint": self._fingerprint}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by an LSTMOptimizer with the same weights (checked)."""
        saved = state_dict.get("rule")
        if saved is not None and saved.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "this state_dict was saved by an LSTMOptimizer with other weights "
                f"(rule fingerprint {str(saved.get('fingerprint'))[:12]}…, this optimizer's "
                f"{self._fingerprint[:12]}…); its rule states would be meaningless here"
            )
        super().load_state_dict(state_dict)


def _copy_rule(rule: LSTMGACRule) -> LSTMGACRule:
    fresh = LSTMGACRule(rule.config)
    fresh.load_state_dict({k: v.detach() for k, v in rule.state_dict().items()})
    return fresh.to(device=rule.device, dtype=rule.dtype)
