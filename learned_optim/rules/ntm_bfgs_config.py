"""NTM-BFGS's configuration (saved with its weights): the controller's LSTM+GAC config, the
heads, the memory's form and the safeguards (skip rule, backtrack, resets, trust region)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .lstm_gac_config import LSTMGACConfig, reject_unknown_fields

__all__ = ["NTMBFGSConfig", "MEMORY_FORMS", "CARRIED_ROWS"]

MEMORY_FORMS = ("auto", "dense", "limited")
CARRIED_ROWS = 4  # rows per coordinate after the controller's: previous gradient ∇, key r, step s, read i


def _default_controller() -> LSTMGACConfig:
    return LSTMGACConfig(extra_inputs=2)


@dataclass(frozen=True)
class NTMBFGSConfig:
    """Architecture of the rule (saved with its weights). The controller is an LSTM+GAC
    config whose two extra inputs are the preprocessed previous read."""

    controller: LSTMGACConfig = field(default_factory=_default_controller)
    write_heads: int = 3  # W; BFGS needs 3
    memory: str = "auto"  # "dense", "limited", or "auto" (dense up to 1,024 coordinates per group)
    memory_capacity: int = 30  # K write pairs kept by the limited form (10 steps of 3 heads)
    initial_scale: float = 0.01  # γ: M₀ = γ·I (the first step is −γ·∇ plus the controller's)
    curvature_eps: float = 1e-3  # ε of the skip rule: write only if yᵀs > ε·‖y‖·‖s‖ (bounds the learnable curvature)
    backtrack: bool = True  # step back −s/2 when the last step raised f (estimated from gradients)
    reset_on_backtrack: bool = False  # M back to M₀ where the backtrack fires (the step through M went uphill)
    reset_indefinite: bool = True  # M back to M₀ where yᵀMy < 0 (before a write) or ∇ᵀM∇ < 0 (after it)
    detach_memory: bool = True  # meta-gradients do not flow through the memory carried between steps
    trust_ratio: float | None = None  # τ: M back to M₀ where the memory's step exceeds τ × the controller's (group norms)
    bfgs_write_bases: bool = False  # write vectors and coefficients (P, Q, α) fixed at BFGS's; only the modulations learned

    def __post_init__(self) -> None:
        if isinstance(self.controller, dict):
            object.__setattr__(self, "controller", LSTMGACConfig.from_dict(self.controller))
        if self.controller.extra_inputs != 2:
            raise ValueError(f"the controller's extra_inputs must be 2 (the preprocessed previous read), "
                             f"got {self.controller.extra_inputs}")
        if self.controller.relative_step is not None:
            raise ValueError("NTM-BFGS's controller cannot take relative_step: the memory's step is added in the "
                             "parameters' units, so a parameter-relative controller step would change the balance "
                             "the heads were meta-trained for (not supported)")
        if not isinstance(self.write_heads, int) or isinstance(self.write_heads, bool) or self.write_heads < 1:
            raise ValueError(f"write_heads must be a positive integer, got {self.write_heads!r}")
        if self.memory not in MEMORY_FORMS:
            raise ValueError(f"memory must be one of {MEMORY_FORMS}, got {self.memory!r}")
        if not isinstance(self.memory_capacity, int) or isinstance(self.memory_capacity, bool) \
                or self.memory_capacity < self.write_heads:
            raise ValueError(f"memory_capacity must be an integer ≥ write_heads ({self.write_heads}), "
                             f"got {self.memory_capacity!r}")
        for name in ("initial_scale", "curvature_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        for name in ("backtrack", "reset_on_backtrack", "reset_indefinite", "detach_memory", "bfgs_write_bases"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        ratio = self.trust_ratio
        if ratio is not None:
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 0:
                raise ValueError(f"trust_ratio must be a finite positive number or None, got {ratio!r}")
            object.__setattr__(self, "trust_ratio", float(ratio))

    @property
    def state_rows(self) -> int:
        """Rows of the per-coordinate state: the controller's, then ∇_{t−1}, r_{t−1}, s_{t−1}, i_{t−1}."""
        return self.controller.state_rows + CARRIED_ROWS

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["controller"] = self.controller.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NTMBFGSConfig:
        reject_unknown_fields(cls, data)
        data = dict(data)
        if "controller" in data:
            controller = dict(data["controller"])
            controller.setdefault("extra_inputs", 2)
            data["controller"] = LSTMGACConfig.from_dict(controller)
        return cls(**data)
