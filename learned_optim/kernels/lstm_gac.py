"""The LSTM+GAC in-place step as Triton kernels (issue 17): one kernel per LSTM layer and one for
the output, over blocks of coordinates, in the rule's feature-major state layout (rows, N).

Per layer l, a program takes one block of ``BLOCK`` coordinates that lie in one averaging scope
(blocks are cut at tensor boundaries) and:

1. reads its input x: for layer 0 the gradient and the rule's signals (momentum sums m ← β·m + ∇,
   v ← β₂·v + (1−β₂)·∇², the step count t, written back in place, and the preprocessed
   features: log/sign or ∇/√v̂ and the directions d_j, and the time features tanh(t/τ_k) of the
   step count), for layer l > 0 the new h of layer l − 1,
   whose first ``gac_cells`` rows it replaces by their finished scope means (and stores them:
   that is the state the eager step leaves);
2. computes the four gates, Wₓx + Wₕh + b, with ``tl.dot`` on tiles padded to powers of two
   (layer 0's few inputs as rank-1 updates, in exact float32), the cell c ← σ(f)⊙c + σ(i)⊙tanh(g)
   and h = σ(o)⊙tanh(c) in registers, and writes h and c in place;
3. writes the block's partial sums of the averaged rows of h.

Between two launches, the partial sums are summed per scope (``torch.segment_reduce``: the
blocks of a scope are consecutive, so the sum is deterministic), all-reduced across ranks when
the coordinates are shards (FSDP) and divided by the scope sizes. The output kernel finishes
the top layer's averages and writes g_t = s·(wᵀh + b) + Σ_j (u_jᵀh + c_j)·d_j.

The math is the eager step's (``LSTMGACRule.step_``) up to float rounding: tanh is 2σ(2x) − 1,
βᵗ is 2^(t·log₂β), and the sums run in another order. State may be float32 or bfloat16
(``state_dtype``); every load is converted to float32 and every store back.

Design limit, per coordinate and step for the default weights (H = 20, 2 layers, 3 momenta,
v and t; float32 state): the kernels read and write the 85 state rows once (680 B), read h of
layer 0 again in layer 1 (80 B) and the top h, m, v, t in the output kernel (100 B), and read
∇ and write g_t (8 B): 868 B (``bytes_per_coordinate``), so at most about 5.5e9 coordinates/s at
an H200's 4.8 TB/s (3.9e9 on an H100's 3.35 TB/s); bfloat16 state halves the state's part
(about 440 B: 1.1e10/s on an H200). The optimizer around the kernels adds its own traffic
(gathering the gradients into one vector, adding lr·g_t to the parameters: about 20 B). The
gates take 2·4·32·(32 + 32) ≈ 16 kFLOP per coordinate per upper layer on the padded tiles
(layer 0: 8 kFLOP), 25.9 kFLOP in all (``flops_per_coordinate``): at 2e9 coordinates/s that is
52 TFLOP/s, near the float32 CUDA cores' 67 but within the tensor cores' TF32 rate (about
490 TFLOP/s dense on an H100/H200) even as ``tf32x3`` (three TF32 products, float32 accuracy:
about 155 TFLOP/s of tensor-core work), the default on the GPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..rules.lstm_gac import LSTMGACRule
    from ..rules.segments import Segments

import triton
import triton.language as tl

from ..rules.segments import all_reduced

__all__ = ["fused_step_", "DOT_PRECISION", "GPU_BLOCK", "INTERPRETER_BLOCK"]

#: tl.dot's precision on the GPU ("ieee", "tf32" or "tf32x3"); the interpreter's dot is exact float32.
DOT_PRECISION = "tf32x3"
GPU_BLOCK = 64  # coordinates per program on the GPU (not tuned: no GPU has been lent yet)
INTERPRETER_BLOCK = 256  # the interpreter runs a program as numpy: larger blocks, fewer programs
RMS_EPSILON = 1e-8  # must equal rules.lstm_gac.RMS_EPSILON (checked in the launcher)
AGREEMENT_BOUND = 10.0  # the literal in _layer_kernel; must equal rules.lstm_gac_config.AGREEMENT_BOUND (checked in the launcher)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _to_storage(x, ptr):
    """x (float32) in the dtype ``ptr`` points to, rounded to nearest even as torch rounds (the
    interpreter's own float32 → bfloat16 cast truncates, so bfloat16 is rounded here by hand)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _log_sign(s, p):
    """The paper's preprocessing of one signal: (log|s|/p, sign s) if |s| ≥ e^−p, else (−1, e^p·s)."""
    threshold = tl.exp(-p)
    magnitude = tl.abs(s)
    large = magnitude >= threshold
    log_feature = tl.where(large, tl.log(tl.maximum(magnitude, threshold)) / p, -1.0)
    sign = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    sign_feature = tl.where(large, sign, s * tl.exp(p))
    return log_feature, sign_feature


@triton.jit
def _rms(v, t, beta2, BIAS_CORRECTION: tl.constexpr):
    """√v̂ + ε: v̂ = v, or v/(1 − β₂ᵗ) with bias correction."""
    if BIAS_CORRECTION:
        v = v / (1.0 - tl.exp2(t * tl.log2(beta2)))
    return tl.sqrt(tl.maximum(v, 1e-30)) + 1e-8  # the rule's floor under v (SQRT_FLOOR) and ε


@triton.jit
def _direction(m, beta, t, rms, clip, BIAS_CORRECTION: tl.constexpr, CLIP: tl.constexpr):
    """d_j = (1 − β_j)·m_j / (1 − β_jᵗ) / (√v̂ + ε), Adam's direction for one momentum sum,
    clamped to [−clip, clip] with the rule's ``direction_clip``."""
    average = m * (1.0 - beta)
    if BIAS_CORRECTION:
        average = average / (1.0 - tl.exp2(t * tl.log2(beta)))
    d = average / rms
    if CLIP:
        d = tl.minimum(tl.maximum(d, -clip), clip)
    return d


@triton.jit
def _add_feature(gi, gf, gg, go, wx_ptr, j, feature, hr, H_PAD: tl.constexpr):
    """Gates += W_x[:, j]·x_j for one input feature x_j (BLOCK,) of layer 0 (rank-1, exact)."""
    base = wx_ptr + j * 4 * H_PAD + hr
    gi += tl.load(base)[:, None] * feature[None, :]
    gf += tl.load(base + H_PAD)[:, None] * feature[None, :]
    gg += tl.load(base + 2 * H_PAD)[:, None] * feature[None, :]
    go += tl.load(base + 3 * H_PAD)[:, None] * feature[None, :]
    return gi, gf, gg, go


@triton.jit
def _matmul_gate(w_ptr, q, tile, hr, H_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """W_q (H_PAD, H_PAD) @ tile (H_PAD, BLOCK) for gate q of a padded (4, H_PAD, H_PAD) weight."""
    w = tl.load(w_ptr + q * H_PAD * H_PAD + hr[:, None] * H_PAD + hr[None, :])
    return tl.dot(w, tile, input_precision=PRECISION)


@triton.jit
def _finished_rows(ptr, stride, rows, cols, valid, means_ptr, num_scopes, scope,
                   H: tl.constexpr, K: tl.constexpr):
    """A layer's new h (H_PAD, BLOCK) with its first K rows replaced by their scope means, which
    are also stored (the state keeps the averaged cells' outputs)."""
    row_ok = rows < H
    offsets = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    h = tl.load(ptr + offsets, mask=row_ok[:, None] & valid[None, :], other=0.0).to(tl.float32)
    if K > 0:
        averaged = rows < K
        means = tl.load(means_ptr + rows * num_scopes + scope, mask=averaged, other=0.0)
        stored = _to_storage(means, ptr).to(tl.float32)  # as the state holds them (rounded, in bfloat16)
        h = tl.where(averaged[:, None], stored[:, None], h)
        tl.store(ptr + offsets, _to_storage(h, ptr), mask=averaged[:, None] & valid[None, :])
    return h


@triton.jit
def _block(starts_ptr, stops_ptr, scopes_ptr, BLOCK: tl.constexpr):
    """This program's block: its index, scope, coordinates (int64) and which of them exist."""
    pid = tl.program_id(0)
    cols = tl.load(starts_ptr + pid) + tl.arange(0, BLOCK).to(tl.int64)
    return pid, tl.load(scopes_ptr + pid), cols, cols < tl.load(stops_ptr + pid)


@triton.jit
def _layer_kernel(
    starts_ptr, stops_ptr, scopes_ptr,
    h_ptr, c_ptr, stride_lstm,  # this layer's h and c rows
    x_ptr, x_means_ptr, num_scopes,  # layer > 0: the previous layer's h and its GAC means (K, count)
    grad_ptr, m_ptr, stride_m, v_ptr, t_ptr, betas_ptr, beta2, clip, p,  # layer 0: the signals
    inverse_timescales_ptr, extra_ptr, stride_extra,
    wx_ptr, wh_ptr, b_ptr, partial_ptr,
    FIRST: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
    RMS: tl.constexpr, BIAS_CORRECTION: tl.constexpr, CLIP: tl.constexpr, LOG_SIGN: tl.constexpr,
    T: tl.constexpr, AGREE: tl.constexpr, AGREE_ROW: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid, scope, cols, valid = _block(starts_ptr, stops_ptr, scopes_ptr, BLOCK)
    hr = tl.arange(0, H_PAD)
    row_ok = hr < H
    offsets = hr.to(tl.int64)[:, None] * stride_lstm + cols[None, :]
    tile_mask = row_ok[:, None] & valid[None, :]
    h = tl.load(h_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    b = b_ptr + hr
    gi = _matmul_gate(wh_ptr, 0, h, hr, H_PAD, PRECISION) + tl.load(b)[:, None]
    gf = _matmul_gate(wh_ptr, 1, h, hr, H_PAD, PRECISION) + tl.load(b + H_PAD)[:, None]
    gg = _matmul_gate(wh_ptr, 2, h, hr, H_PAD, PRECISION) + tl.load(b + 2 * H_PAD)[:, None]
    go = _matmul_gate(wh_ptr, 3, h, hr, H_PAD, PRECISION) + tl.load(b + 3 * H_PAD)[:, None]
    if FIRST:
        g = tl.load(grad_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        rms = g  # placeholder when the rule does not normalize
        t = g
        if RMS:
            v = tl.load(v_ptr + cols, mask=valid, other=0.0).to(tl.float32)
            v = v * beta2 + (1.0 - beta2) * g * g
            tl.store(v_ptr + cols, _to_storage(v, v_ptr), mask=valid)
            t = g * 0.0
            if BIAS_CORRECTION:
                t = tl.load(t_ptr + cols, mask=valid, other=0.0).to(tl.float32) + 1.0  # masked lanes: t = 1, no 0/0
                tl.store(t_ptr + cols, _to_storage(t, t_ptr), mask=valid)
            rms = _rms(v, t, beta2, BIAS_CORRECTION)
        if LOG_SIGN:
            log_f, sign_f = _log_sign(g, p)
            gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, 0, log_f, hr, H_PAD)
            gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, 1 + M, sign_f, hr, H_PAD)
        else:
            gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, 0, g / rms, hr, H_PAD)
        agreement = g * 0.0
        for j in tl.static_range(M):
            beta = tl.load(betas_ptr + j)
            m_offsets = j * stride_m + cols
            m_previous = tl.load(m_ptr + m_offsets, mask=valid, other=0.0).to(tl.float32)
            if AGREE and j == AGREE_ROW:  # a_t = ∇_t·m̂_{t−1}/v̂_t (the rule's agreement)
                previous = tl.maximum(t - 1.0, 1.0)
                average = g * m_previous * ((1.0 - beta) / (1.0 - tl.exp2(previous * tl.log2(beta))))
                agreement = tl.minimum(tl.maximum(average / (rms * rms), -10.0), 10.0)  # ±AGREEMENT_BOUND
            m = g + beta * m_previous
            tl.store(m_ptr + m_offsets, _to_storage(m, m_ptr), mask=valid)
            if LOG_SIGN:
                log_f, sign_f = _log_sign(m, p)
                gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, 1 + j, log_f, hr, H_PAD)
                gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, 2 + M + j, sign_f, hr, H_PAD)
            else:
                d = _direction(m, beta, t, rms, clip, BIAS_CORRECTION, CLIP)
                gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, 1 + j, d, hr, H_PAD)
        for k in tl.static_range(T):  # time features tanh(t/τ_k), after the signals' features
            time_k = _tanh(t * tl.load(inverse_timescales_ptr + k))
            index = (2 if LOG_SIGN else 1) * (1 + M) + k
            gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, index, time_k, hr, H_PAD)
        if AGREE:  # after the time features, as in the rule's input names
            gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, (1 + M) + T, agreement, hr, H_PAD)
        for e in tl.static_range(E):
            x_e = tl.load(extra_ptr + e * stride_extra + cols, mask=valid, other=0.0).to(tl.float32)
            index = (2 if LOG_SIGN else 1) * (1 + M) + T + (1 if AGREE else 0) + e
            gi, gf, gg, go = _add_feature(gi, gf, gg, go, wx_ptr, index, x_e, hr, H_PAD)
    else:
        x = _finished_rows(x_ptr, stride_lstm, hr, cols, valid, x_means_ptr, num_scopes, scope, H, K)
        gi += _matmul_gate(wx_ptr, 0, x, hr, H_PAD, PRECISION)
        gf += _matmul_gate(wx_ptr, 1, x, hr, H_PAD, PRECISION)
        gg += _matmul_gate(wx_ptr, 2, x, hr, H_PAD, PRECISION)
        go += _matmul_gate(wx_ptr, 3, x, hr, H_PAD, PRECISION)
    c = _sigmoid(gf) * c + _sigmoid(gi) * _tanh(gg)
    h = _sigmoid(go) * _tanh(c)
    tl.store(c_ptr + offsets, _to_storage(c, c_ptr), mask=tile_mask)
    tl.store(h_ptr + offsets, _to_storage(h, h_ptr), mask=tile_mask)
    if K > 0:
        sums = tl.sum(tl.where(valid[None, :], h, 0.0), axis=1)
        tl.store(partial_ptr + pid * K + hr, sums, mask=hr < K)


@triton.jit
def _output_kernel(
    starts_ptr, stops_ptr, scopes_ptr,
    top_ptr, stride_lstm, means_ptr, num_scopes,
    m_ptr, stride_m, v_ptr, t_ptr, betas_ptr, beta2, clip, decay_after,
    w_ptr, output_bias, output_scale, u_ptr, u_bias_ptr, out_ptr,
    H: tl.constexpr, H_PAD: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
    RMS: tl.constexpr, BIAS_CORRECTION: tl.constexpr, CLIP: tl.constexpr, DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, scope, cols, valid = _block(starts_ptr, stops_ptr, scopes_ptr, BLOCK)
    hr = tl.arange(0, H_PAD)
    top = _finished_rows(top_ptr, stride_lstm, hr, cols, valid, means_ptr, num_scopes, scope, H, K)
    update = (tl.sum(tl.load(w_ptr + hr)[:, None] * top, axis=0) + output_bias) * output_scale
    if M > 0:
        t = update * 0.0
        rms = update
        if RMS:
            v = tl.load(v_ptr + cols, mask=valid, other=0.0).to(tl.float32)
            if BIAS_CORRECTION:
                t = tl.load(t_ptr + cols, mask=valid, other=1.0).to(tl.float32)
            rms = _rms(v, t, beta2, BIAS_CORRECTION)
        for j in tl.static_range(M):
            m = tl.load(m_ptr + j * stride_m + cols, mask=valid, other=0.0).to(tl.float32)
            if RMS:
                m = _direction(m, tl.load(betas_ptr + j), t, rms, clip, BIAS_CORRECTION, CLIP)
            step = tl.sum(tl.load(u_ptr + j * H_PAD + hr)[:, None] * top, axis=0) + tl.load(u_bias_ptr + j)
            update += step * m
        if DECAY:  # √(t₀/max(t, t₀)), the rule's step_decay (needs bias correction's t)
            update = update * tl.sqrt(decay_after / tl.maximum(t, decay_after))
    tl.store(out_ptr + cols, _to_storage(update, out_ptr), mask=valid)


@dataclass
class _Weights:
    """φ laid out for the kernels: zero-padded to H_PAD rows and columns, float32 on one device."""

    versions: tuple[int, ...]
    wx: list[Tensor]  # layer 0: (inputs, 4, H_PAD); layer l > 0: (4, H_PAD, H_PAD)
    wh: list[Tensor]  # (4, H_PAD, H_PAD)
    b: list[Tensor]  # (4, H_PAD)
    w_out: Tensor  # (H_PAD,)
    b_out: float
    u: Tensor  # (M, H_PAD)
    u_bias: Tensor  # (M,)
    betas: Tensor  # (M,)
    inverse_timescales: Tensor  # (T,): 1/τ_k of the time features tanh(t/τ_k) (one placeholder if none)


@dataclass
class _Blocks:
    """Blocks of at most BLOCK consecutive coordinates, each inside one scope (cut at the
    scopes' boundaries), and how many blocks each scope has (for the per-scope sums)."""

    starts: Tensor
    stops: Tensor
    scopes: Tensor
    per_scope: Tensor

    @property
    def count(self) -> int:
        return self.starts.shape[0]


_WEIGHTS: weakref.WeakKeyDictionary[Any, dict[Any, _Weights]] = weakref.WeakKeyDictionary()
_BLOCKS: weakref.WeakKeyDictionary[Any, dict[Any, _Blocks]] = weakref.WeakKeyDictionary()


def padded_size(hidden: int) -> int:
    """H_PAD: the hidden size rounded up to a power of two of at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (hidden - 1).bit_length())


def _weights(rule: LSTMGACRule, device: torch.device) -> _Weights:
    """The kernels' copy of φ on ``device``, remade when a parameter of the rule changed."""
    params = list(rule.parameters())
    versions = tuple(p._version for p in params)
    cached = _WEIGHTS.setdefault(rule, {}).get(device)
    if cached is not None and cached.versions == versions:
        return cached
    cfg = rule.config
    H, P, M = cfg.hidden_size, padded_size(cfg.hidden_size), len(cfg.momentum_decays)
    with torch.no_grad():
        wx, wh, b = [], [], []
        for layer in range(cfg.num_layers):
            w_t = rule.core.weights[layer].detach().float().t()  # (4H, in + H), gates i, f, g, o
            inputs = w_t.shape[1] - H
            gates = w_t.reshape(4, H, inputs + H)
            x_part = torch.zeros(4, P, inputs if layer == 0 else P)
            x_part[:, :H, :inputs] = gates[:, :, :inputs].cpu()
            h_part = torch.zeros(4, P, P)
            h_part[:, :H, :H] = gates[:, :, inputs:].cpu()
            bias = torch.zeros(4, P)
            bias[:, :H] = rule.core.biases[layer].detach().float().reshape(4, H).cpu()
            if layer == 0:
                x_part = x_part.permute(2, 0, 1)  # (inputs, 4, H_PAD): one column per feature
            wx.append(x_part.contiguous().to(device))
            wh.append(h_part.to(device))
            b.append(bias.to(device))
        w_out = torch.zeros(P)
        if cfg.absolute_step:  # else the LSTM's own term is off: w = 0, b = 0 gives exactly that
            w_out[:H] = rule.output_weight.detach().float()[:, 0].cpu()
        u, u_bias = torch.zeros(max(M, 1), P), torch.zeros(max(M, 1))
        if M:
            u[:, :H] = rule.momentum_weight.detach().float().t().cpu()
            u_bias[:M] = rule.momentum_bias.detach().float().cpu()
        betas = torch.tensor(cfg.momentum_decays or (0.0,), dtype=torch.float32)
        inverse_timescales = 1 / torch.tensor(cfg.step_timescales or (1.0,), dtype=torch.float32)  # as the rule's
    output_bias = float(rule.output_bias.detach()[0]) if cfg.absolute_step else 0.0
    prepared = _Weights(versions, wx, wh, b, w_out.to(device), output_bias,
                        u.to(device), u_bias.to(device), betas.to(device), inverse_timescales.to(device))
    _WEIGHTS[rule][device] = prepared
    return prepared


def _blocks(segments: Segments, block: int, device: torch.device) -> _Blocks | None:
    """The block table of ``segments`` (None if its scopes are not consecutive runs)."""
    key = (block, device)
    cached = _BLOCKS.setdefault(segments, {}).get(key)
    if cached is not None:
        return cached
    if segments.ids is None:
        lengths = torch.tensor([segments.size], dtype=torch.long)
    elif segments.lengths is not None:
        lengths = torch.tensor(segments.lengths, dtype=torch.long)
    else:
        return None
    per_scope = (lengths + block - 1) // block
    offsets = torch.cumsum(lengths, 0) - lengths
    scopes = torch.repeat_interleave(torch.arange(lengths.numel()), per_scope)
    first = torch.cumsum(per_scope, 0) - per_scope  # index of each scope's first block
    within = torch.arange(int(per_scope.sum())) - first[scopes]
    starts = offsets[scopes] + within * block
    stops = torch.minimum(starts + block, (offsets + lengths)[scopes])
    table = _Blocks(starts.to(device), stops.to(device), scopes.to(torch.int32).to(device), per_scope.to(device))
    _BLOCKS[segments][key] = table
    return table


def supports(rule: LSTMGACRule, segments: Segments) -> bool:
    """Whether the kernels can step this rule over these scopes (consecutive runs, as the
    drop-in optimizers make; the meta-trainer's interleaved ids are the eager step's)."""
    return segments.ids is None or segments.lengths is not None


def fused_step_(rule: LSTMGACRule, grad: Tensor, lstm: Tensor, momentum: Tensor, v: Tensor | None,
                t: Tensor | None, segments: Segments, out: Tensor, extra: Tensor | None = None,
                block: int | None = None, precision: str | None = None) -> Tensor:
    """The rule's in-place step through the Triton kernels: advances ``lstm`` (L, 2, H, N),
    ``momentum`` (M, N), ``v`` and ``t`` (N,) rows in place (any of float32/bfloat16), writes
    g_t into ``out`` (N,) and returns the top layer's h (H, N), a view of ``lstm``."""
    cfg = rule.config
    from ..rules.lstm_gac import RMS_EPSILON as rule_eps
    from ..rules.lstm_gac_config import AGREEMENT_BOUND as rule_bound

    assert rule_eps == RMS_EPSILON and rule_bound == AGREEMENT_BOUND, "the kernels' constants must be the rule's"
    device = grad.device
    interpreted = device.type == "cpu"
    block = block or (INTERPRETER_BLOCK if interpreted else GPU_BLOCK)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of at least 16, got {block}")
    precision = "ieee" if interpreted else (precision or DOT_PRECISION)
    table = _blocks(segments, block, device)
    if table is None:
        raise ValueError("the fused step needs scopes that are consecutive runs of coordinates")
    num = grad.shape[0]
    top = lstm[-1, 0]
    if num == 0:
        return top
    phi = _weights(rule, device)
    H, P, K, M = cfg.hidden_size, padded_size(cfg.hidden_size), cfg.gac_cells, len(cfg.momentum_decays)
    E = 0 if extra is None else extra.shape[0]
    stride = lstm.stride(2)
    if lstm.stride(3) != 1 or (M and momentum.stride(1) != 1) or grad.stride(0) != 1 or out.stride(0) != 1:
        raise ValueError("the fused step needs rows of contiguous coordinates")
    rms, bias_correction = cfg.momentum_rms_decay is not None, cfg.bias_correction
    beta2 = float(cfg.momentum_rms_decay) if cfg.momentum_rms_decay is not None else 0.5
    clip = float(cfg.direction_clip) if cfg.direction_clip is not None else 1.0  # (a placeholder unless CLIP)
    decay_after = float(cfg.step_decay_after) if cfg.step_decay_after is not None else 1.0  # (unless DECAY)
    placeholder = grad  # pointers the kernel's constexpr flags leave unused
    v_row = v if v is not None else placeholder
    t_row = t if t is not None else placeholder
    m_rows = momentum if M else placeholder.unsqueeze(0)
    extra_rows = extra if extra is not None else placeholder.unsqueeze(0)
    partial = torch.empty(table.count, max(K, 1), dtype=torch.float32, device=device)
    means = torch.zeros(max(K, 1), segments.count, dtype=torch.float32, device=device)
    grid = (table.count,)
    for layer in range(cfg.num_layers):
        h, c = lstm[layer]
        x = lstm[layer - 1, 0] if layer else h
        _layer_kernel[grid](
            table.starts, table.stops, table.scopes,
            h, c, stride,
            x, means, segments.count,
            grad, m_rows, m_rows.stride(0), v_row, t_row, phi.betas, beta2, clip, float(cfg.preprocess_p),
            phi.inverse_timescales, extra_rows, extra_rows.stride(0),
            phi.wx[layer], phi.wh[layer], phi.b[layer], partial,
            FIRST=layer == 0, H=H, H_PAD=P, K=K, M=M, RMS=rms, BIAS_CORRECTION=bias_correction,
            CLIP=cfg.direction_clip is not None, LOG_SIGN=cfg.input_features == "log-sign",
            T=len(cfg.step_timescales), AGREE=cfg.momentum_agreement,
            AGREE_ROW=cfg.main_momentum_row if cfg.momentum_agreement else 0, E=E, BLOCK=block, PRECISION=precision,
        )
        if K:
            sums = torch.segment_reduce(partial, "sum", lengths=table.per_scope, axis=0, unsafe=True).t()
            means = (all_reduced(sums, segments.process_group) / segments.counts(sums)).contiguous()
    _output_kernel[grid](
        table.starts, table.stops, table.scopes,
        top, stride, means, segments.count,
        m_rows, m_rows.stride(0), v_row, t_row, phi.betas, beta2, clip, decay_after,
        phi.w_out, phi.b_out, float(cfg.output_scale), phi.u, phi.u_bias, out,
        H=H, H_PAD=P, K=K, M=M, RMS=rms, BIAS_CORRECTION=bias_correction,
        CLIP=cfg.direction_clip is not None, DECAY=cfg.step_decay_after is not None, BLOCK=block,
    )
    return top


def bytes_per_coordinate(rule: LSTMGACRule, state_bytes: int = 4) -> int:
    """The design's memory traffic per coordinate per step (see the module doc): every state row
    read and written, the lower layer's h and the output's inputs read again, ∇ read, g_t written."""
    cfg = rule.config
    rows = cfg.state_rows
    reread = cfg.hidden_size * (cfg.num_layers - 1) + cfg.hidden_size + len(cfg.momentum_decays) + cfg.rms_rows
    return 2 * rows * state_bytes + reread * state_bytes + 8


def flops_per_coordinate(rule: LSTMGACRule) -> int:
    """Multiply-adds ×2 of the gates on the padded tiles, per coordinate per step."""
    cfg = rule.config
    P = padded_size(cfg.hidden_size)
    first = 2 * 4 * P * (cfg.input_size + P)
    return first + (cfg.num_layers - 1) * 2 * 4 * P * 2 * P + 2 * P * (1 + len(cfg.momentum_decays))

