"""The LSTM+GAC rule's configuration: its architecture and fixed pre/post-processing, saved with
its weights, and the names of the LSTM's input rows (what a warm start matches by)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

__all__ = ["LSTMGACConfig", "default_chunk", "GAC_SCOPES", "INPUT_FEATURES", "RMS_EPSILON",
           "FRESH_MOMENTUM_STEP", "FRESH_RELATIVE_STEP", "STEP_CHUNK", "GPU_STEP_CHUNK", "reject_unknown_fields"]

GAC_SCOPES = ("tensor", "group")
# The LSTM's per-coordinate inputs. "log-sign": the paper's (log|x|/p, sign x) of ∇ and of each
# momentum sum: they carry the gradient's absolute scale, so a rule meta-trained on one scale
# sees another one out of distribution. "normalized": ∇/(√v + ε) and the momentum directions
# d_j = (1−β_j)·m_j/(√v + ε) (RNNprop's Adam-like inputs, Lv et al. 2017): bounded (|∇/√v| ≤
# 1/√(1−β₂)) and unchanged when the gradients are multiplied by any c > 0 (up to ε).
INPUT_FEATURES = ("log-sign", "normalized")
RMS_EPSILON = 1e-8  # ε of the normalized momentum directions (Adam's default)
GROWTH_BOUND = 5.0  # |g_t| of scale_growth is clamped here (e⁵ ≈ 148× the step factor at θ₀)
AGREEMENT_BOUND = 10.0  # |a_t| of momentum_agreement is clamped here (|∇/√v̂|·|m̂/√v̂| is a few in steady training)
# v and mean squares of θ are floored here before √ (a value 1e-15 below ε): √'s derivative at 0 is
# infinite, and a coordinate whose gradient is always 0 (a dead unit) or a scope of zeros would make
# the second-order meta-gradient inf·0 = NaN without it; the floor's own derivative there is 0.
SQRT_FLOOR = 1e-30
FRESH_MOMENTUM_STEP = 0.01  # a fresh "normalized" rule's step on its β≈0.9 direction: Adam(lr=0.01)-like
# A fresh rule with ``relative_step``: 0.1 × RMS(θ) on that direction, Adam(lr=0.01)-like for a
# tensor of RMS 0.1 (a typical weight matrix's at initialization)
FRESH_RELATIVE_STEP = 0.1
# Coordinates per chunk of the in-place step on the CPU: the gates of a chunk (80 × 16384
# floats, 5 MB) and its layer inputs stay in cache. At 1e6 coordinates on the 2-core CI machine
# (benchmarks/step_speed.py --sizes 1e6 --lstm-chunk N): 4096: 320 ms, 8192: 245 ms,
# 16384: 251 ms, 32768: 277 ms, 65536: 361 ms.
STEP_CHUNK = 16384
# On GPUs larger chunks mean fewer kernel launches (not measured yet: no GPU lent so far).
GPU_STEP_CHUNK = 2**20


def reject_unknown_fields(cls: type, data: dict[str, Any]) -> None:
    """Refuse, by name, keys of ``data`` that are not fields of the config dataclass ``cls``
    (a saved config from a newer version, or a typo in --rule-config)."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")


def default_chunk(device: torch.device) -> int:
    """Coordinates per chunk of the in-place steps on ``device``."""
    return STEP_CHUNK if device.type == "cpu" else GPU_STEP_CHUNK


@dataclass(frozen=True)
class LSTMGACConfig:
    """Architecture and fixed pre/post-processing of the rule (saved with its weights)."""

    hidden_size: int = 20
    num_layers: int = 2
    gac_cells: int = 2  # per layer: units whose output is averaged over the scope
    gac_scope: str = "tensor"  # "tensor": one average per parameter tensor; "group": per param group
    preprocess_p: float = 10.0  # p of the log/sign preprocessing
    output_scale: float = 0.1  # the paper's MNIST value
    extra_inputs: int = 0  # inputs besides the 2 preprocessed features (NTM-BFGS's read)
    momentum_decays: tuple[float, ...] = ()  # β_j of the momentum sums (empty: the paper's rule)
    momentum_rms_decay: float | None = None  # β₂: normalize the momentum directions by √v (None: raw sums)
    input_features: str = "log-sign"  # the LSTM's inputs: "log-sign" (the paper's) or "normalized" (see INPUT_FEATURES)
    bias_correction: bool = False  # Adam's: m and v divided by 1 − βᵗ (one more state row: the step count t)
    absolute_step: bool = True  # the LSTM's own term s·(wᵀh + b), in the parameters' units (the paper's);
    # False: only the learned step sizes on the normalized directions d_j, a step that shrinks as Adam's does
    step_timescales: tuple[float, ...] = ()  # τ_k: the LSTM also reads tanh(t/τ_k) of the step count t
    # (needs bias_correction, which keeps t): bounded time features, so the rule can tell late
    # training from early and, past its meta-training horizon, sees the saturated values it knows
    direction_clip: float | None = None  # c: each normalized direction d_j clamped to [−c, c] per coordinate
    # (inputs and output; None: not clamped). Kingma & Ba's |Δ| ≲ α bound of Adam made exact: in steady
    # training |E m̂| ≤ √(E ∇²), but growing gradients push |d| past 1 (c = 1 cost the suite's convnets, c = 3
    # did not), and after a quiet stretch a sudden gradient makes
    # d up to (1−β)/√((1−β₂)(1−β²/β₂)) (18 for β = 0.5), the loss spikes of long runs
    step_decay_after: float | None = None  # t₀: past step t₀ the whole step is multiplied by √(t₀/t)
    # (None: never). The α_t = α/√t of Adam's convergence analysis (Kingma & Ba 2015, §4), from the
    # end of the meta-training horizon on: the rule steps as it was trained up to t₀ (exactly: the
    # factor is 1 there) and anneals past it, where it was never trained (needs bias_correction's t)
    relative_step: float | None = None  # ε_θ: the whole step × (RMS(θ) over the coordinate's GAC scope + ε_θ)
    # (None: steps in the parameters' units, as Adam's). Celo's parameter-relative step (Moudgil et al.
    # 2025): the same rule moves a tensor of RMS 1 (the paper's quadratics) 25× farther than one of RMS
    # 0.04 (an MNIST MLP's first layer), and rescaling a tensor θ → cθ (∇ → ∇/c) rescales its steps by c;
    # ε_θ keeps zero-initialized tensors (biases) moving. Needs the normalized directions (absolute_step=False)
    momentum_agreement: bool = False  # the LSTM also reads a_t = ∇_t·m̂_{t−1}/v̂_t for the momentum sum nearest
    # β = 0.9, clamped to ±AGREEMENT_BOUND: positive while the gradient keeps pointing where the steps have been
    # going, negative once a step overshot a valley (the gradient turned against the momentum). Invariant to the
    # gradients' scale and to θ → cθ per tensor, like the other normalized inputs (needs them, and bias_correction)
    scale_growth: bool = False  # the LSTM also reads g_t = log(s_t/s_0), how far the relative step's factor
    # s = RMS(θ) + ε_θ of the coordinate's scope has grown (or shrunk) since the first step, clamped to
    # ±GROWTH_BOUND (one more state row keeps s_0), and the factor becomes s_0·(s_t/s_0)^α with a learned
    # exponent α ∈ (0, 2) per coordinate (1 at the start: the plain relative step). A net whose weights grow 10×
    # wants its steps to grow with them; a quadratic, whose curvature does not change with θ's scale, wants a
    # step that does not. Invariant to θ → cθ per tensor (up to ε_θ). Needs relative_step
    relative_floor: bool = False  # the relative step's factor never falls below its value at the first step:
    # max(s_t, s_0) per scope (s_0 in the same state row as scale_growth's). Growing tensors (the nets' weights)
    # step as without it; a tensor that shrinks keeps θ₀'s step size, as Adam keeps its lr. Needs relative_step
    shrink_discount: bool = False  # with relative_floor, the factor is max(s_0, s_t·m_t/s_0), m_t = min_{τ≤t} s_τ the
    # lowest factor so far (one more state row): growth past a shrink counts at the shrink's ratio m_t/s_0. A tensor
    # whose RMS only grows (a net's weights, whose step should grow with them) steps as with the floor alone; one that
    # first shrank (pulled toward a solution whose scale is the problem's, as a quadratic's θ) and regrows keeps a
    # step nearer θ₀'s. Continuous: a 2% shrink discounts later growth by 2%. Needs relative_floor

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum_decays", tuple(self.momentum_decays))
        for tau in self.step_timescales:
            if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
                raise ValueError(f"step_timescales must be finite positive numbers, got {tau!r}")
        object.__setattr__(self, "step_timescales", tuple(float(tau) for tau in self.step_timescales))
        if self.step_timescales and not self.bias_correction:
            raise ValueError("step_timescales needs bias_correction (its state row counts the steps t)")
        for beta in self.momentum_decays:
            if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 < beta < 1:
                raise ValueError(f"momentum_decays must lie in (0, 1), got {beta!r}")
        beta2 = self.momentum_rms_decay
        if beta2 is not None:
            if not isinstance(beta2, (int, float)) or isinstance(beta2, bool) or not 0 < beta2 < 1:
                raise ValueError(f"momentum_rms_decay must lie in (0, 1) or be None, got {beta2!r}")
            if not self.momentum_decays:
                raise ValueError("momentum_rms_decay needs momentum_decays (it normalizes the momentum sums)")
            for beta in self.momentum_decays:
                if beta * beta >= beta2:
                    raise ValueError(f"momentum_rms_decay ({beta2}) must exceed the square of every momentum "
                                     f"decay (β² = {beta * beta:.6g} for β = {beta}) to keep steps bounded")
        for name in ("bias_correction", "absolute_step"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.absolute_step and (beta2 is None or not self.momentum_decays):
            raise ValueError("absolute_step=False needs momentum_decays and momentum_rms_decay: without the "
                             "LSTM's own term the step is the learned step sizes on the normalized directions")
        clip = self.direction_clip
        if clip is not None:
            if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not math.isfinite(clip) or clip <= 0:
                raise ValueError(f"direction_clip must be a finite positive number or None, got {clip!r}")
            if beta2 is None:
                raise ValueError("direction_clip needs momentum_rms_decay (it clamps the normalized directions)")
            object.__setattr__(self, "direction_clip", float(clip))
        after = self.step_decay_after
        if after is not None:
            if not isinstance(after, (int, float)) or isinstance(after, bool) or not math.isfinite(after) or after < 1:
                raise ValueError(f"step_decay_after must be a finite number of steps ≥ 1 or None, got {after!r}")
            if not self.bias_correction:
                raise ValueError("step_decay_after needs bias_correction (its state row counts the steps t)")
            object.__setattr__(self, "step_decay_after", float(after))
        rel = self.relative_step
        if rel is not None:
            if not isinstance(rel, (int, float)) or isinstance(rel, bool) or not math.isfinite(rel) or rel <= 0:
                raise ValueError(f"relative_step must be a finite positive number (ε_θ) or None, got {rel!r}")
            if self.absolute_step:
                raise ValueError("relative_step needs absolute_step=False: it scales the learned step sizes on the "
                                 "normalized directions, which carry no units of their own")
            object.__setattr__(self, "relative_step", float(rel))
        if not isinstance(self.momentum_agreement, bool):
            raise ValueError(f"momentum_agreement must be True or False, got {self.momentum_agreement!r}")
        if self.momentum_agreement and (self.input_features != "normalized" or not self.bias_correction):
            raise ValueError("momentum_agreement needs input_features 'normalized' and bias_correction "
                             "(a_t is ∇_t·m̂_{t−1}/v̂_t, bias-corrected with the step count t)")
        if not isinstance(self.scale_growth, bool):
            raise ValueError(f"scale_growth must be True or False, got {self.scale_growth!r}")
        if self.scale_growth and self.relative_step is None:
            raise ValueError("scale_growth needs relative_step (g_t is the growth of its factor RMS(θ) + ε_θ)")
        if not isinstance(self.relative_floor, bool):
            raise ValueError(f"relative_floor must be True or False, got {self.relative_floor!r}")
        if self.relative_floor and self.relative_step is None:
            raise ValueError("relative_floor needs relative_step (it floors that step's factor RMS(θ) + ε_θ)")
        if not isinstance(self.shrink_discount, bool):
            raise ValueError(f"shrink_discount must be True or False, got {self.shrink_discount!r}")
        if self.shrink_discount and not self.relative_floor:
            raise ValueError("shrink_discount needs relative_floor (it discounts the floored factor's growth)")
        if self.bias_correction and beta2 is None:
            raise ValueError("bias_correction needs momentum_rms_decay (it corrects the normalized directions)")
        if self.input_features not in INPUT_FEATURES:
            raise ValueError(f"input_features must be one of {INPUT_FEATURES}, got {self.input_features!r}")
        if self.input_features == "normalized" and beta2 is None:
            raise ValueError("input_features 'normalized' needs momentum_rms_decay (the features are divided by √v)")
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("gac_cells", "extra_inputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.gac_cells > self.hidden_size:
            raise ValueError(f"gac_cells ({self.gac_cells}) exceeds hidden_size ({self.hidden_size})")
        if self.gac_scope not in GAC_SCOPES:
            raise ValueError(f"gac_scope must be one of {GAC_SCOPES}, got {self.gac_scope!r}")
        for name in ("preprocess_p", "output_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["momentum_decays"] = list(self.momentum_decays)
        out["step_timescales"] = list(self.step_timescales)
        return out

    @property
    def input_size(self) -> int:
        """Inputs of the LSTM per coordinate: the features of ∇ and the momentum sums, then the extra rows."""
        return len(self.input_names())

    def input_names(self) -> list[str]:
        """The LSTM's input rows in order, by what they hold: the features of ∇ and the momentum
        sums, the time features tanh(t/τ_k), the agreement and the scale's growth, then the extra rows
        (a warm start matches them by name)."""
        signals = ["grad"] + [f"momentum[{beta:g}]" for beta in self.momentum_decays]
        features = ([f"log({s})" for s in signals] + [f"sign({s})" for s in signals]
                    if self.input_features == "log-sign" else signals)
        return (features + [f"tanh(t/{tau:g})" for tau in self.step_timescales]
                + ([f"agreement[{self.momentum_decays[self.main_momentum_row]:g}]"] if self.momentum_agreement else [])
                + (["log(scale/scale0)"] if self.scale_growth else [])
                + [f"extra[{e}]" for e in range(self.extra_inputs)])

    @property
    def main_momentum_row(self) -> int:
        """The momentum sum whose β is nearest 0.9: a fresh rule's step, and what ``momentum_agreement`` reads."""
        return min(range(len(self.momentum_decays)), key=lambda j: abs(self.momentum_decays[j] - 0.9))

    @property
    def lstm_rows(self) -> int:
        """Rows of the rule state holding LSTM h and c: 2·layers·hidden."""
        return 2 * self.num_layers * self.hidden_size

    @property
    def rms_rows(self) -> int:
        """Rows of the rule state for the normalization: v (if normalized), then the step count t
        (if bias-corrected)."""
        return int(self.momentum_rms_decay is not None) + int(self.bias_correction)

    @property
    def origin_rows(self) -> int:
        """Rows of the rule state after the normalization rows: s_0, the step factor at the first step
        (``scale_growth`` or ``relative_floor``; 0 until that step), then m_t, the lowest factor so far
        (``shrink_discount``)."""
        return int(self.scale_growth or self.relative_floor) + int(self.shrink_discount)

    @property
    def state_rows(self) -> int:
        """Rows of the rule state per coordinate: LSTM h and c, one per momentum sum, then v if
        normalized, t if bias-corrected, s_0 with ``scale_growth`` or ``relative_floor``, m_t with ``shrink_discount``."""
        return self.lstm_rows + len(self.momentum_decays) + self.rms_rows + self.origin_rows

    @property
    def drop_in_rows(self) -> int:
        """Rows per coordinate of a float32 ``LSTMOptimizer`` state: :attr:`state_rows` without s_0's (and
        m_t's), which the drop-in optimizer keeps as numbers per tensor."""
        return self.state_rows - self.origin_rows

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LSTMGACConfig:
        reject_unknown_fields(cls, data)
        return cls(**data)
