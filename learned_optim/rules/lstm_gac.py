"""The coordinatewise LSTM+GAC update rule of Andrychowicz et al. 2016.

One 2-layer LSTM (20 units per layer) with weights φ shared by every coordinate; each
coordinate has its own hidden and cell state. Layered like optax:

    preprocess (log/sign, p = 10)  →  LSTM+GAC core  →  linear output × output scale

and θ_{t+1} = θ_t + g_t with g_t the output. Global averaging cells (GAC): the first
``gac_cells`` units of each layer output the *average* of their activation over all
coordinates in a scope (one parameter tensor, or one param group), which lets the rule see
global quantities such as the gradient norm (enough for L2 gradient clipping).

Option beyond the paper, ``momentum_decays`` (β₁…β_M): each coordinate also keeps momentum
sums m_j ← β_j·m_j + ∇ (in the rule state). They enter twice: as extra preprocessed inputs of
the LSTM, and in the output, g_t = s·(wᵀh + b) + Σ_j (u_jᵀh + c_j)·m_j, a learned
per-coordinate step size on each momentum direction (momentum inputs as in Wichrowska et al.
2017 and Metz et al. 2020; an LSTM that scales hand-designed directions, as in Almeida et al.
2021). With u = c = 0, the starting point, this is the plain rule; c_j alone is heavy-ball
momentum, which the plain rule, seeing only log|∇| and sign ∇, can express only roughly.

With ``momentum_rms_decay`` (β₂) set, the momentum directions are normalized per coordinate as
in Adam: v ← β₂·v + (1−β₂)·∇² (one more state row) and the output uses
d_j = (1−β_j)·m_j / (√v + ε) instead of m_j. Then |d_j| ≤ (1−β_j)/√((1−β₂)(1−β_j²/β₂)) for
any gradient sequence (Cauchy–Schwarz; β_j² < β₂ is required), so every step is bounded and
invariant to the scale of the gradients: a rule meta-trained on one loss scale cannot blow up
on another the way unnormalized heavy ball does with too large a step size.

With ``input_features="normalized"`` the LSTM reads those normalized quantities too (∇/√v and
the d_j) instead of the log/sign features, so the whole rule, inputs and output, is unchanged
when the gradients are rescaled (per tensor or overall): the step's size is what the rule
learned, in the parameters' units, like Adam's lr (``lr`` of the drop-in optimizer multiplies it).

With ``step_timescales`` (τ_k) the LSTM also reads tanh(t/τ_k) of the step count t (kept by
bias correction): bounded time features (VeLO and Celo feed the fraction of training done; a
drop-in optimizer does not know the total, so these saturate instead), with which the rule can
act differently late in training than early, and past its meta-training horizon sees the
saturated values it was trained on rather than new ones.

With ``direction_clip`` (c) every d_j is clamped to [−c, c] per coordinate, in the inputs and the
output. Adam's step is only approximately bounded by its lr (Kingma & Ba 2015, §2.1): while the
gradients are stationary |E m̂| ≤ √(E ∇²) (Jensen), but whenever recent gradients outgrow v
|d_j| exceeds 1 (the fast β = 0.5 direction does so in ordinary training: c = 1 cost the suite's
convnets, c = 3 did not), and after a quiet stretch (v decayed) a larger gradient makes |d_j| up to
the bound above, so long runs spike from near-converged losses. The clamp makes the bound exact: the step on d_j is at most c times its
learned step size.

With ``step_decay_after`` (t₀) the whole step is multiplied by √(t₀/t) past step t₀ (exactly 1
before): the α_t = α/√t of Adam's convergence analysis (Kingma & Ba 2015, §4), applied from the end
of the meta-training horizon, beyond which the rule was never trained. A fixed schedule, not a
learned one; a ``torch.optim.lr_scheduler`` schedule multiplies it as it multiplies ``lr``.

With ``relative_step`` (ε_θ) the whole step is multiplied by RMS(θ) + ε_θ, the RMS over the
coordinate's GAC scope (one tensor by default): Celo's parameter-relative step (Moudgil et al.
2025). The learned step sizes are then fractions of the tensor's scale rather than amounts in its
units, so one rule serves unit-scale problems (the paper's quadratics) and nets whose weights are
25× smaller, and a reparametrization θ → cθ of a tensor (∇ → ∇/c) multiplies its steps by c (up to
ε_θ). The rule then needs θ: ``rule(grad, state, segments, params=θ)``.

With ``momentum_agreement`` the LSTM also reads a_t = ∇_t·m̂_{t−1}/v̂_t for the momentum sum nearest
β = 0.9 (clamped to ±AGREEMENT_BOUND): about +1 while each gradient repeats the direction the steps have
been taking, negative once a step overshot a valley and the gradient turned against the momentum. The
other inputs hold this only implicitly (∇_t and d_0.5 together give m_{t−1}, but not their product), and a
relative step that grows with RMS(θ) overshoots on a problem whose curvature does not shrink as θ grows
(the paper's quadratics). Scale-free and per-tensor reparametrization-free like the other normalized inputs;
no state of its own (m_{t−1} is read before m advances). Weights without it are widened with a zero input
row (:func:`widened_inputs`), which steps exactly as before.

With ``scale_growth`` the LSTM also reads g_t = log(s_t/s_0) (clamped to ±GROWTH_BOUND), the growth of the
relative step's factor s = RMS(θ) + ε_θ since the first step, whose s_0 one more state row keeps (0 until then).
The relative step makes every step a fraction of the tensor's current scale, which is what nets whose weights grow
10× want, and not what a quadratic wants, whose curvature does not change with θ's scale: with the factor held
at s_0 the shipped default's learned steps end 2× lower on the paper's quadratics (1,000 seeds), and 3–28× higher
on the nets. g_t lets the rule tell them apart, and it chooses how much of the growth its step follows: the
factor becomes s_t·exp((α_t − 1)·g_t) = s_0·(s_t/s_0)^α_t, α_t = 1 + tanh(wᵀh + b) ∈ (0, 2) per coordinate from
the top layer (w = b = 0: α = 1, the plain relative step exactly). Invariant to θ → cθ per tensor (up to ε_θ).
With ``relative_floor`` the factor is max(s_t, s_0) (the same s_0 row): it follows θ up, not down. With
``shrink_discount`` too, max(s_0, s_t·m_t/s_0), m_t the lowest factor so far (one more row): a tensor that first
shrank (a quadratic's θ on its way to a solution) counts its later growth at the shrink's ratio m_t/s_0 ≤ 1,
while one whose RMS only grows (a net's weights) steps as with the floor alone.

The rule is functional: ``rule(grad, state, segments) -> (update, new_state)``. The drop-in
:class:`~learned_optim.LSTMOptimizer` calls it under ``no_grad``; the meta-trainer calls it
with the graph kept. There is no second copy of this math anywhere: the in-place step of the
drop-in optimizers (``step_``, in :mod:`.lstm_gac_inplace`) runs these same methods over chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .lstm_cell import LSTMGACCore
from .lstm_gac_config import (
    AGREEMENT_BOUND,
    FRESH_MOMENTUM_STEP,
    FRESH_RELATIVE_STEP,
    GROWTH_BOUND,
    RMS_EPSILON,
    SQRT_FLOOR,
    STEP_CHUNK,
    LSTMGACConfig,
    default_chunk,
)
from .lstm_gac_inplace import InPlaceStep, _Scratch
from .param_scale import TensorScales, flat_param_scale
from .preprocess import log_sign_preprocess
from .segments import Segments

__all__ = ["LSTMGACConfig", "LSTMGACRule", "default_chunk", "widened_inputs", "STEP_CHUNK"]


class LSTMGACRule(InPlaceStep, nn.Module):
    """The learned update rule g(∇, state; φ): preprocess → LSTM+GAC → linear × scale."""

    name = "lstm-gac"

    def __init__(self, config: LSTMGACConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config or LSTMGACConfig()
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        num_momenta = len(cfg.momentum_decays)
        self.core = LSTMGACCore(cfg.input_size, cfg.hidden_size, cfg.num_layers, cfg.gac_cells, gen)
        bound = 1.0 / math.sqrt(cfg.hidden_size)
        output_weight = (torch.rand(cfg.hidden_size, 1, generator=gen) * 2 - 1) * bound  # drawn either way:
        if cfg.absolute_step:  # the rest of φ's initialization does not depend on the flag
            self.output_weight = nn.Parameter(output_weight)
            self.output_bias = nn.Parameter(torch.zeros(1))
        if cfg.scale_growth:  # w, b of the growth exponent α = 1 + tanh(wᵀh + b): 1 at the start
            self.growth_weight = nn.Parameter(torch.zeros(cfg.hidden_size, 1))
            self.growth_bias = nn.Parameter(torch.zeros(1))
        if num_momenta:  # u_j, c_j: step sizes on the momentum sums, zero at the start
            self.momentum_weight = nn.Parameter(torch.zeros(cfg.hidden_size, num_momenta))
            self.momentum_bias = nn.Parameter(torch.zeros(num_momenta))
        if cfg.input_features == "normalized":
            # A fresh rule of this kind starts as a working optimizer, not as noise: the LSTM's
            # own term off (w = 0) and a step of FRESH_MOMENTUM_STEP on the momentum direction
            # whose β is nearest 0.9, i.e. Adam without bias correction (the meta-gradient of
            # w, u is not zero, so the LSTM is trained from the first meta-step).
            with torch.no_grad():
                if cfg.absolute_step:
                    self.output_weight.zero_()
                nearest = cfg.main_momentum_row
                self.momentum_bias[nearest] = -(FRESH_MOMENTUM_STEP if cfg.relative_step is None
                                                else FRESH_RELATIVE_STEP)
        self._decays: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}  # (β, 1−β) per dtype/device
        self._inverse_timescales: dict[tuple[torch.dtype, torch.device], Tensor] = {}  # 1/τ_k per dtype/device
        self._scratch: dict[tuple[torch.dtype, torch.device], _Scratch] = {}  # step_'s buffers
        self._tensor_scales: TensorScales | None = None  # tensor_param_scales' helper, made on first use

    def _momentum_decays(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """β_j and 1−β_j as (M, 1) tensors in ``like``'s dtype and device, made once (exactly from the config's floats)."""
        key = (like.dtype, like.device)
        if key not in self._decays:
            beta = torch.tensor(self.config.momentum_decays, dtype=like.dtype, device=like.device).unsqueeze(1)
            self._decays[key] = (beta, 1 - beta)
        return self._decays[key]

    @property
    def needs_params(self) -> bool:
        """Whether the step reads θ (``relative_step``): callers then pass the flat parameters."""
        return self.config.relative_step is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.core.weights[0].dtype

    @property
    def device(self) -> torch.device:
        return self.core.weights[0].device

    def init_state(self, num_coordinates: int, device: torch.device | str | None = None,
                   segments: Segments | None = None) -> Tensor:
        """The zero state (R, N) for N = ``num_coordinates``: R = ``config.state_rows`` rows per coordinate.

        ``segments`` is accepted for a uniform rule interface (rules with group state need it).
        """
        return torch.zeros(self.config.state_rows, num_coordinates, dtype=self.dtype,
                           device=device if device is not None else self.device)

    def split_state(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Views of a state (R, N): LSTM h and c (L, 2, H, N), the momentum sums (M, N) and the
        normalization rows (v, then t with bias correction: 0 to 2, N); with ``scale_growth`` or
        ``relative_floor`` the last row, s_0, is :meth:`scale_origin`'s."""
        cfg = self.config
        if state.dim() != 2 or state.shape[0] != cfg.state_rows:
            raise ValueError(f"rule state must have shape ({cfg.state_rows}, N), got {tuple(state.shape)}")
        lstm, momentum, second_moment, _ = state.split((cfg.lstm_rows, len(cfg.momentum_decays), cfg.rms_rows,
                                                        cfg.origin_rows))
        return lstm.view(cfg.num_layers, 2, cfg.hidden_size, state.shape[1]), momentum, second_moment

    def segments(self, sizes: Sequence[int], device: torch.device | str | None = None,
                 process_group: Any = None) -> Segments:
        """The GAC scopes for a param group whose tensors have ``sizes`` coordinates (this rank's
        shards of them, with the ``process_group`` they are sharded across)."""
        if self.config.gac_scope == "group":
            return Segments.single(int(sum(sizes)), process_group)
        return Segments.from_sizes(sizes, device, process_group)

    def segments_from(self, tensor_scopes: Segments, group_scopes: Segments) -> Segments:
        """The GAC scopes given both partitions of the coordinates: per tensor and per group
        (a param group, or a task in the meta-trainer); picks by ``config.gac_scope``."""
        return group_scopes if self.config.gac_scope == "group" else tensor_scopes

    def forward(self, grad: Tensor, state: Tensor, segments: Segments,
                extra: Tensor | None = None, params: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """g_t and the new state from flat gradients (N,) and states (R, N).

        ``extra`` (extra_inputs, N) feeds additional per-coordinate inputs (NTM-BFGS's read);
        ``params`` (N,) are the flat θ_t, which a rule with ``relative_step`` needs.
        """
        update, new_state, _ = self.step(grad, state, segments, extra, params)
        return update, new_state

    def step(self, grad: Tensor, state: Tensor, segments: Segments,
             extra: Tensor | None = None, params: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` that also returns the top LSTM layer's output (H, N), for rules that
        use this one as a controller (NTM-BFGS drives its memory heads from it)."""
        cfg = self.config
        self._check_extra(extra)
        self._check_params(params, grad)
        lstm_state, momentum, second_moment = self.split_state(state)
        scale = self.param_scale(params, segments) if params is not None and self.needs_params else None
        if cfg.origin_rows:
            origin = self.kept_origin(cast(Tensor, scale), self.scale_origin(state))
            scale = self.floored_scale(cast(Tensor, scale), origin)
        if cfg.scale_growth:
            growth = self.scale_growth(cast(Tensor, scale), origin)
            extra = growth if extra is None else torch.cat((growth, extra))
        features, momentum, second_moment = self.signals(grad, momentum, second_moment, extra)
        top, new_lstm = self.core(features, lstm_state, segments)
        update = self.output(top, momentum, second_moment)
        if cfg.scale_growth:
            update = update * self.grown_scale(cast(Tensor, scale), growth, top)
        elif scale is not None:
            update = update * scale
        new_state = new_lstm.view(cfg.lstm_rows, -1)
        if cfg.momentum_decays:
            new_state = torch.cat((new_state, momentum, second_moment))
        if cfg.origin_rows:
            new_state = torch.cat((new_state, origin))
        return update, new_state, top

    def scale_origin(self, state: Tensor) -> Tensor:
        """The state's origin rows (origin_rows, N) (``scale_growth``, ``relative_floor``): s_0, the step
        factor at the first step, then with ``shrink_discount`` m_t, the lowest factor so far; 0 before it."""
        rows = self.config.origin_rows
        if not rows:
            raise ValueError("this rule keeps no scale origin (scale_growth and relative_floor are off)")
        return state[-rows:]

    def kept_origin(self, scale: Tensor, origin: Tensor) -> Tensor:
        """The origin rows (origin_rows, n) after this step, from the factors s_t (n,) and the kept rows
        (origin_rows, n): s_t where none is kept yet (0; every factor is at least ε_θ > 0), and with
        ``shrink_discount`` m_t = min(m_{t−1}, s_t)."""
        kept = torch.where(origin > 0, origin, scale.unsqueeze(0))
        if self.config.shrink_discount:
            kept = torch.cat((kept[:1], torch.minimum(kept[1:], scale.unsqueeze(0))))
        return kept

    def floored_scale(self, scale: Tensor, origin: Tensor) -> Tensor:
        """The factor (n,) from s_t (n,) and the origin rows: max(s_t, s_0) with ``relative_floor``,
        max(s_t·m_t/s_0, s_0) with ``shrink_discount`` too, else s_t as it is."""
        cfg = self.config
        if not cfg.relative_floor:
            return scale
        start = origin[0]
        if cfg.shrink_discount:
            scale = scale * (origin[1] / start)
        return torch.maximum(scale, start)

    def grown_scale(self, scale: Tensor, growth: Tensor, top: Tensor) -> Tensor:
        """The step factor (n,) with ``scale_growth``: s_t·exp((α − 1)·g_t) = s_0·(s_t/s_0)^α, the learned
        exponent α = 1 + tanh(wᵀh + b) from the top layer's output h (H, n), g_t (1, n) as the LSTM read it."""
        exponent = torch.tanh(torch.addmm(self.growth_bias.unsqueeze(1), self.growth_weight.t(), top))  # α − 1
        return scale * torch.exp(exponent * growth).squeeze(0)

    def scale_growth(self, scale: Tensor, origin: Tensor) -> Tensor:
        """g_t = log(s_t/s_0) (1, n), clamped to ±GROWTH_BOUND, from the factors s_t (n,) and the origin
        rows (s_0 first)."""
        return torch.log(scale.unsqueeze(0) / origin[:1]).clamp(-GROWTH_BOUND, GROWTH_BOUND)

    def signals(self, grad: Tensor, momentum: Tensor, second_moment: Tensor, extra: Tensor | None = None,
                in_place: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The LSTM's inputs (preprocessed ∇ and momentum sums, then ``extra``) and the advanced
        m ← β·m + ∇ (M, n) and v ← β₂·v + (1−β₂)·∇² (0 or 1, n); ``in_place`` writes m and v
        into the given state views (the chunked step) instead of fresh tensors."""
        cfg = self.config
        g = grad.unsqueeze(0)
        signals = g
        if cfg.momentum_agreement:  # ∇_t·m_{t−1}, before m advances (in place, it is overwritten below)
            row = cfg.main_momentum_row
            agreement = g * momentum[row:row + 1]
        if cfg.momentum_decays:
            momentum = torch.addcmul(g, self._momentum_decays(momentum)[0], momentum,
                                     out=momentum if in_place else None)
            signals = torch.cat((g, momentum))
        if cfg.momentum_rms_decay is not None:
            beta2 = cfg.momentum_rms_decay
            v, count = second_moment.split((1, cfg.rms_rows - 1))
            v_out, count_out = (v, count) if in_place else (None, None)
            v = torch.addcmul(torch.mul(v, beta2, out=v_out), g, g, value=1 - beta2, out=v_out)
            if cfg.bias_correction:
                count = torch.add(count, 1, out=count_out)
            second_moment = second_moment if in_place else torch.cat((v, count))
        if cfg.input_features == "log-sign":
            features = log_sign_preprocess(signals, cfg.preprocess_p).flatten(0, 1)  # (2·(1+M), n)
        else:  # ∇/(√v̂ + ε) and the directions d_j, bounded and invariant to the gradients' scale
            features = torch.cat((g / self._rms(second_moment), self.directions(momentum, second_moment)))
        if cfg.step_timescales:
            features = torch.cat((features, self.time_features(second_moment)))
        if cfg.momentum_agreement:
            features = torch.cat((features, self.agreement(agreement, second_moment)))
        if extra is not None:
            features = torch.cat((features, extra), dim=0)
        return features, momentum, second_moment

    def time_features(self, second_moment: Tensor) -> Tensor:
        """tanh(t/τ_k) (T, n) of the advanced step counts t (the last normalization row)."""
        key = (second_moment.dtype, second_moment.device)
        inverse = self._inverse_timescales.get(key)
        if inverse is None:
            inverse = 1 / torch.tensor(self.config.step_timescales, dtype=second_moment.dtype,
                                       device=second_moment.device).unsqueeze(1)
            self._inverse_timescales[key] = inverse
        return torch.tanh(second_moment[-1:] * inverse)

    def agreement(self, product: Tensor, second_moment: Tensor) -> Tensor:
        """a_t = ∇_t·m̂_{t−1}/v̂_t (1, n) from the product ∇_t·m_{t−1} (1, n) and the advanced v and t:
        m̂_{t−1} = (1−β)·m_{t−1}/(1 − β^{t−1}) (m_0 = 0 makes a_1 = 0), v̂_t as in :meth:`_rms`
        (squared), clamped to ±AGREEMENT_BOUND (``momentum_agreement``)."""
        beta = self.config.momentum_decays[self.config.main_momentum_row]
        previous = torch.clamp_min(second_moment[-1:] - 1, 1)  # t − 1, at least 1 (where m_{t−1} = 0 anyway)
        average = product * ((1 - beta) / (1 - torch.pow(beta, previous)))
        return (average / self._rms(second_moment).square()).clamp_(-AGREEMENT_BOUND, AGREEMENT_BOUND)

    def output(self, top: Tensor, momentum: Tensor, second_moment: Tensor, out: Tensor | None = None) -> Tensor:
        """g_t (n,) from the top layer's output (H, n) and the advanced momentum sums and v:
        s·(wᵀh + b) (unless ``absolute_step`` is off), plus Σ_j (u_jᵀh + c_j)·d_j with momentum
        directions d_j (into ``out`` if given)."""
        cfg = self.config
        own = torch.addmm(self.output_bias, self.output_weight.t(), top).squeeze(0) * cfg.output_scale \
            if cfg.absolute_step else None
        if not cfg.momentum_decays:
            return cast(Tensor, own) if out is None else out.copy_(cast(Tensor, own))  # (no sums: the config requires the own term)
        step_sizes = torch.addmm(self.momentum_bias.unsqueeze(1), self.momentum_weight.t(), top)  # (M, n)
        directions = momentum if cfg.momentum_rms_decay is None else self.directions(momentum, second_moment)
        moves = step_sizes * directions
        update = torch.sum(moves, 0, out=out) if own is None else torch.add(own, moves.sum(0), out=out)
        if cfg.step_decay_after is None:
            return update
        decay = self.step_decay(second_moment)
        return update.mul_(decay) if out is not None else update * decay

    def step_decay(self, second_moment: Tensor) -> Tensor:
        """√(t₀/max(t, t₀)) (n,) of the advanced step counts t with ``step_decay_after`` t₀: exactly 1
        up to t₀, then Adam's α/√t decay (Kingma & Ba 2015, §4) relative to step t₀."""
        after = cast(float, self.config.step_decay_after)
        return torch.sqrt(after / torch.clamp_min(second_moment[-1], after))

    def _rms(self, second_moment: Tensor) -> Tensor:
        """√v̂ + ε (1, n): v̂ = v, or v/(1 − β₂ᵗ) with bias correction."""
        cfg = self.config
        v = second_moment[:1]
        if cfg.bias_correction:
            v = v / (1 - torch.pow(cast(float, cfg.momentum_rms_decay), second_moment[1:2]))
        return v.clamp_min(SQRT_FLOOR).sqrt() + RMS_EPSILON  # the floor: a finite derivative at v = 0

    def directions(self, momentum: Tensor, second_moment: Tensor) -> Tensor:
        """The normalized momentum directions d_j = m̂_j/(√v̂ + ε) (M, n), Adam's step direction:
        m̂_j = (1−β_j)·m_j, divided by 1 − β_jᵗ with bias correction (then v̂ likewise), clamped
        to [−c, c] with ``direction_clip`` c."""
        beta, one_minus = self._momentum_decays(momentum)
        averages = momentum * one_minus
        if self.config.bias_correction:
            averages = averages / (1 - torch.pow(beta, second_moment[1:2]))
        directions = averages / self._rms(second_moment)
        clip = self.config.direction_clip
        return directions if clip is None else directions.clamp_(-clip, clip)  # in place: a fresh tensor, and
        # division's backward reads its inputs, not this output

    def param_scale(self, params: Tensor, segments: Segments) -> Tensor:
        """RMS(θ) + ε_θ (N,) of the flat parameters (N,) over each coordinate's scope: the factor
        of ``relative_step`` (ε_θ), differentiable (see :mod:`.param_scale`)."""
        return flat_param_scale(params, segments, cast(float, self.config.relative_step))

    def tensor_param_scales(self, params: Sequence[Tensor]) -> list[Tensor] | list[float]:
        """RMS(θ_k) + ε_θ for each whole parameter tensor θ_k (over all of them with gac_scope
        "group"): :meth:`param_scale` without a flat copy of θ, for a caller that multiplies each
        tensor's step itself (LSTMOptimizer, on unsharded params). Python floats for CPU params,
        0-d float32 tensors otherwise; the same float32 numbers either way (see :mod:`.param_scale`)."""
        cfg = self.config
        if cfg.relative_step is None:
            raise ValueError("this rule's step is not relative to the parameters (relative_step is None)")
        scales, per_tensor = self._tensor_scales, cfg.gac_scope == "tensor"
        if scales is None or (scales.eps, scales.per_tensor) != (cfg.relative_step, per_tensor):
            scales = self._tensor_scales = TensorScales(cfg.relative_step, per_tensor)  # (made for this config)
        return scales(params)

    def floored_tensor_scales(self, scales: list[Tensor] | list[float], origins: Tensor) -> list[Tensor] | list[float]:
        """``relative_floor`` on :meth:`tensor_param_scales`' factors s_t, one per tensor, with the
        tensors' origin rows kept by the caller in ``origins`` (origin_rows, n) float32 (s_0, then m_t with
        ``shrink_discount``; 0 before a tensor's first step, set here): :meth:`kept_origin` and
        :meth:`floored_scale` over the tensors, in the same form."""
        cfg = self.config
        if not cfg.relative_floor:
            raise ValueError("this rule has no relative_floor")
        if origins.shape != (cfg.origin_rows, len(scales)) or origins.dtype != self.dtype:
            raise ValueError(f"origins must be a {self.dtype} tensor of shape ({cfg.origin_rows}, {len(scales)}), "
                             f"its rows per factor, got {origins.dtype} {tuple(origins.shape)}")
        if not scales:
            return scales
        floats = isinstance(scales[0], float)
        current = torch.tensor(scales, dtype=self.dtype) if floats else torch.stack(cast(list[Tensor], scales))
        kept = self.kept_origin(current, origins.to(current.device))
        origins.copy_(kept)
        floored = self.floored_scale(current, kept)
        return floored.tolist() if floats else list(floored.unbind())

    def _check_params(self, params: Tensor | None, grad: Tensor) -> None:
        """A rule with ``relative_step`` needs θ_t, of the gradients' shape; others ignore it."""
        if not self.needs_params:
            return
        if params is None:
            raise ValueError("this rule's step is relative to the parameters (relative_step): pass params=θ_t, "
                             "the flat parameters the gradients belong to")
        if params.shape != grad.shape:
            raise ValueError(f"params must have the gradients' shape {tuple(grad.shape)}, got {tuple(params.shape)}")

    def _check_extra(self, extra: Tensor | None) -> None:
        rows = 0 if extra is None else extra.shape[0]
        if rows != self.config.extra_inputs:
            raise ValueError(f"the rule expects {self.config.extra_inputs} extra input rows, got {rows}")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scratch"] = {}  # buffers, not state: a copy or pickle of the rule makes its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", {})  # a rule pickled before step_ existed
        self.__dict__.setdefault("_inverse_timescales", {})
        self.__dict__.setdefault("_tensor_scales", None)


def widened_inputs(weights: dict[str, Tensor], source: LSTMGACConfig, target: LSTMGACConfig) -> dict[str, Tensor]:
    """``weights`` of a rule with config ``source`` for one with config ``target`` that reads more
    LSTM inputs (time features, extra rows): the first layer's input rows matched by name, zero
    for the new inputs (and ``scale_growth``'s exponent head at zero: α = 1), so the widened rule
    steps exactly as the source did until they are trained.
    Every other field, and every other tensor, must agree (checked when the weights are loaded)."""
    have, want = source.input_names(), target.input_names()
    missing = [name for name in have if name not in want]
    if missing:
        raise ValueError(f"the target config does not read the inputs {missing} of the source weights")
    first = weights["core.weights.0"]
    rows = first.new_zeros(len(want) + target.hidden_size, first.shape[1])
    for index, name in enumerate(have):
        rows[want.index(name)] = first[index]
    rows[len(want):] = first[len(have):]  # the recurrent rows (h)
    widened = {**weights, "core.weights.0": rows}
    if target.scale_growth and not source.scale_growth:  # its exponent head at α = 1: the plain relative step
        widened["growth_weight"] = first.new_zeros(target.hidden_size, 1)
        widened["growth_bias"] = first.new_zeros(1)
    return widened
