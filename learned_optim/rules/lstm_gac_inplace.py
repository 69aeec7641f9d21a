"""The LSTM+GAC rule's in-place step for the drop-in optimizers: the same math as the
differentiable :meth:`LSTMGACRule.step <learned_optim.rules.lstm_gac.LSTMGACRule.step>`
(:meth:`signals`, :meth:`LSTMGACCore.layer`, :meth:`output`), run under ``no_grad`` over
chunks of coordinates that stay in cache, layer by layer (the global averaging cells need
every chunk's layer output before the next layer runs), on preallocated buffers, optionally
through lower-precision state or the Triton kernels.

A mixin of :class:`~learned_optim.rules.lstm_gac.LSTMGACRule`: it holds no math of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from .lstm_cell import CellBuffers
from .lstm_gac_config import STEP_CHUNK
from .segments import Segments

if TYPE_CHECKING:
    from .lstm_cell import LSTMGACCore
    from .lstm_gac import LSTMGACRule
    from .lstm_gac_config import LSTMGACConfig

__all__ = ["InPlaceStep"]


class InPlaceStep:
    """``step_``: the rule's step in place, for :class:`~learned_optim.LSTMOptimizer` and
    NTM-BFGS's controller (the host class provides the config, core and the shared math)."""

    if TYPE_CHECKING:  # provided by LSTMGACRule
        config: LSTMGACConfig
        core: LSTMGACCore
        _scratch: dict[tuple[torch.dtype, torch.device], _Scratch]

        @property
        def dtype(self) -> torch.dtype: ...
        @property
        def needs_params(self) -> bool: ...
        def _check_extra(self, extra: Tensor | None) -> None: ...
        def _check_params(self, params: Tensor | None, grad: Tensor) -> None: ...
        def param_scale(self, params: Tensor, segments: Segments) -> Tensor: ...
        def scale_origin(self, state: Tensor) -> Tensor: ...
        def kept_origin(self, scale: Tensor, origin: Tensor) -> Tensor: ...
        def floored_scale(self, scale: Tensor, origin: Tensor) -> Tensor: ...
        def scale_growth(self, scale: Tensor, origin: Tensor) -> Tensor: ...
        def grown_scale(self, scale: Tensor, growth: Tensor, top: Tensor) -> Tensor: ...
        def signals(self, grad: Tensor, momentum: Tensor, second_moment: Tensor, extra: Tensor | None = None,
                    in_place: bool = False) -> tuple[Tensor, Tensor, Tensor]: ...
        def output(self, top: Tensor, momentum: Tensor, second_moment: Tensor,
                   out: Tensor | None = None) -> Tensor: ...

    @torch.no_grad()
    def step_(self, grad: Tensor, state: Tensor, segments: Segments, out: Tensor,
              extra: Tensor | None = None, chunk: int = STEP_CHUNK, sigmoid_tanh: bool = True,
              fused: bool = False, count: Tensor | None = None, params: Tensor | None = None,
              apply_param_scale: bool = True, origin: Tensor | None = None) -> Tensor:
        """:meth:`step` in place, for the drop-in optimizers (not differentiable): advances
        ``state`` (R, N), writes g_t into ``out`` (N,) and returns the top layer's output (H, N)
        (a view of the state).

        Coordinates go through in chunks of ``chunk`` whose working set (gates, layer inputs)
        stays in cache, with preallocated buffers: nothing of size N is allocated. Layer by
        layer, because the global averaging cells need every chunk's layer-l output before
        layer l + 1 runs. The math is :meth:`signals`, :meth:`LSTMGACCore.layer` and
        :meth:`output`, shared with the differentiable path; ``sigmoid_tanh`` (default here,
        not there) computes tanh from sigmoid, see :func:`lstm_cell`.

        ``state`` may be stored in a lower precision (bfloat16): each chunk is then staged
        through float32 buffers, all math runs in float32 and the results are rounded once
        when stored. ``count`` (N,) float32, with bias correction, holds the step counts t
        outside the state (which then lacks its t row): a bfloat16 row cannot count past
        256 (t + 1 rounds back to t there).

        ``fused`` runs the same step through the Triton kernels of
        :mod:`learned_optim.kernels.lstm_gac` instead (CUDA, or CPU tensors in Triton's
        interpreter; ``chunk`` and ``sigmoid_tanh`` then do not apply: the kernels' blocks are
        their own and their tanh is always 2σ(2x) − 1).

        ``params`` (N,): the flat θ_t, for a rule with ``relative_step`` (``out`` is then
        multiplied by :meth:`param_scale`). With ``apply_param_scale=False`` ``out`` is left
        unscaled and ``params`` is not needed: the caller multiplies each tensor's piece by
        :meth:`tensor_param_scales` itself (floored by :meth:`floored_tensor_scales` with
        ``relative_floor``, whose s_0 the caller then keeps: the state lacks its s_0 row), without
        a flat copy of θ. ``origin`` (origin_rows, N) float32 holds s_0 (``scale_growth``, ``relative_floor``)
        and m_t (``shrink_discount``) outside the state, which then lacks those rows; they are set where 0
        (the first step).
        """
        cfg = self.config
        self._check_extra(extra)
        if apply_param_scale:
            self._check_params(params, grad)
        elif cfg.scale_growth:
            raise ValueError("scale_growth needs the flat parameters (params=θ_t, apply_param_scale=True): "
                             "g_t is an input per coordinate")
        if origin is not None and not (cfg.origin_rows and apply_param_scale):
            raise ValueError("origin holds s_0 (and m_t) of scale_growth or relative_floor, applied with the step's factor "
                             "(apply_param_scale=True); this step keeps none")
        origin_in_state = bool(cfg.origin_rows) and apply_param_scale and origin is None
        lstm, momentum, second_moment, v_row, t_row = self._state_views(state, count, origin_in_state)
        num = state.shape[1]
        vectors = {"grad": (grad, (num,)), "out": (out, (num,)),
                   **({"params": (params, (num,))} if params is not None else {}),
                   **({"origin": (origin, (cfg.origin_rows, num))} if origin is not None else {})}
        for name, (t, shape) in vectors.items():
            if tuple(t.shape) != shape or t.dtype != self.dtype or t.device != state.device:
                raise ValueError(f"{name} must be a {self.dtype} tensor of shape {shape} on {state.device}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        if segments.size != num:
            raise ValueError(f"segments cover {segments.size} coordinates, the state {num}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        if num == 0:
            return lstm[-1, 0]
        scale = self.param_scale(params, segments) if apply_param_scale and params is not None and self.needs_params \
            else None
        growth = None
        if scale is not None and cfg.origin_rows:
            stored = self.scale_origin(state) if origin is None else origin
            scale, growth, extra = self._from_origin_(stored, scale, extra)
        if fused:
            from ..kernels.lstm_gac import fused_step_

            top = fused_step_(cast("LSTMGACRule", self), grad, lstm, momentum, v_row, t_row, segments, out, extra)
        else:
            top = self._eager_step_(grad, state, lstm, momentum, second_moment, v_row, t_row, segments, out,
                                    extra, chunk, sigmoid_tanh)
        if growth is not None:
            out.mul_(self.grown_scale(cast(Tensor, scale), growth, top))
        elif scale is not None:
            out.mul_(scale)
        return top

    def _from_origin_(self, stored: Tensor, scale: Tensor, extra: Tensor | None
                      ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``scale_growth``/``relative_floor``: keeps s_0 (and m_t) in ``stored`` (origin_rows, N), the state's
        last rows or the caller's, set at the first step in its dtype, and returns the factor s_t (N,) (floored with
        ``relative_floor``), g_t = log(s_t/s_0) (1, N) with ``scale_growth`` (else None) and the LSTM's
        extra rows, g_t first (the input just before them)."""
        stored.copy_(self.kept_origin(scale, stored.to(self.dtype)))
        origin = stored.to(self.dtype)  # s_0 as stored: rounded once in a lower-precision state, then kept
        scale = self.floored_scale(scale, origin)
        if not self.config.scale_growth:
            return scale, None, extra
        growth = self.scale_growth(scale, origin)
        return scale, growth, growth if extra is None else torch.cat((growth, extra))

    def _eager_step_(self, grad: Tensor, state: Tensor, lstm: Tensor, momentum: Tensor,
                     second_moment: Tensor | None, v_row: Tensor | None, t_row: Tensor | None,
                     segments: Segments, out: Tensor, extra: Tensor | None, chunk: int,
                     sigmoid_tanh: bool) -> Tensor:
        """:meth:`step_`'s eager path, chunk by chunk (its arguments already checked and split)."""
        cfg, core = self.config, self.core
        num = state.shape[1]
        k = cfg.gac_cells
        plan = segments.chunks(chunk)
        scratch = self._scratch_for(grad, min(chunk, num))  # float32, whatever the state's dtype
        staged = second_moment is None or state.dtype != self.dtype  # chunks copied through float32 buffers
        stage = _Stage(scratch, staged)
        for layer in range(cfg.num_layers):
            weights = core.gate_weights(layer, sigmoid_tanh)
            h_all, c_all = lstm[layer]
            sums = state.new_zeros(k, segments.count, dtype=self.dtype)
            for start, stop, scope in plan:
                width = stop - start
                if layer == 0:
                    m, sm = self._signal_rows(stage, momentum, second_moment, v_row, t_row, start, stop)
                    x, _, _ = self.signals(grad[start:stop], m, sm, None if extra is None else extra[:, start:stop],
                                           in_place=True)
                    stage.store(momentum[:, start:stop], m)
                    if staged and cfg.rms_rows:
                        for row, target in zip(sm, (v_row, t_row)):
                            cast(Tensor, target)[start:stop].copy_(row)
                else:
                    x = stage.load("x", lstm[layer - 1, 0, :, start:stop])
                h = stage.load("h", h_all[:, start:stop])
                c = stage.load("c", c_all[:, start:stop])
                buffers = CellBuffers(scratch.view("inputs", layer, width), scratch.view("gates", 0, width),
                                      scratch.view("tanh", 0, width), h, c)
                core.layer(weights, x, h, c, buffers, sigmoid_tanh)
                stage.store(h_all[:, start:stop], h)
                stage.store(c_all[:, start:stop], c)
                if k:
                    segments.add_sums(sums, h[:k], start, scope)
            if k:
                segments.fill_means(h_all[:k], sums, chunk)
        top = lstm[-1, 0]
        for start, stop, _ in plan:
            m, sm = self._signal_rows(stage, momentum, second_moment, v_row, t_row, start, stop)
            self.output(stage.load("h", top[:, start:stop]), m, sm, out=out[start:stop])
        return top

    def _state_views(self, state: Tensor, count: Tensor | None, origin_in_state: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """The in-place step's views of a state: LSTM h and c (L, 2, H, N), the momentum sums
        (M, N), the normalization rows (rms_rows, N) when they lie in the state (None when the
        step count is held apart in ``count``), and v and t as (N,) rows (None where absent).
        The state ends with the s_0 row only where ``origin_in_state``."""
        cfg = self.config
        if not state.is_floating_point():
            raise ValueError(f"rule state must be floating point, got {state.dtype}")
        if count is None and cfg.bias_correction and state.dtype != self.dtype:
            raise ValueError(f"a bias-corrected rule state in {state.dtype} needs its step counts apart, in "
                             f"count= ({self.dtype}): a {state.dtype} row cannot count steps exactly")
        if count is not None and not cfg.bias_correction:
            raise ValueError("count holds the step counts of bias correction, which this rule does not use")
        origin_rows = cfg.origin_rows if origin_in_state else 0
        norm_rows = cfg.rms_rows - int(count is not None)
        rows = cfg.lstm_rows + len(cfg.momentum_decays) + norm_rows + origin_rows
        if state.dim() != 2 or state.shape[0] != rows:
            apart = [what for what, away in (("its step counts (count=)", count is not None),
                                             ("s_0 (held by the caller)", cfg.origin_rows and not origin_in_state))
                     if away]
            raise ValueError(f"rule state{' without ' + ' and '.join(apart) if apart else ''} must have shape "
                             f"({rows}, N), got {tuple(state.shape)}")
        num = state.shape[1]
        if count is not None and (count.shape != (num,) or count.dtype != self.dtype or count.device != state.device):
            raise ValueError(f"count must be a {self.dtype} tensor of shape ({num},) on {state.device}, "
                             f"got {count.dtype} {tuple(count.shape)} on {count.device}")
        lstm, momentum, normalization, _ = state.split((cfg.lstm_rows, len(cfg.momentum_decays), norm_rows,
                                                        origin_rows))
        norm = normalization.unbind(0)
        v_row = norm[0] if norm else None
        t_row = count if count is not None else (norm[1] if len(norm) > 1 else None)
        second_moment = normalization if count is None else None
        return lstm.view(cfg.num_layers, 2, cfg.hidden_size, num), momentum, second_moment, v_row, t_row

    def _signal_rows(self, stage: _Stage, momentum: Tensor, second_moment: Tensor | None, v_row: Tensor | None,
                     t_row: Tensor | None, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """A chunk's momentum sums (M, n) and normalization rows (rms_rows, n) in float32: views
        of the state, or staged copies (lower-precision state, or t held apart)."""
        m = stage.load("m", momentum[:, start:stop])
        if not stage.staged:
            return m, cast(Tensor, second_moment)[:, start:stop]
        rows = [r[start:stop] for r in (v_row, t_row) if r is not None]
        sm = stage.scratch.rows_view("sm", len(rows), stop - start)
        for target, row in zip(sm, rows):
            target.copy_(row)
        return m, sm


    def _scratch_for(self, like: Tensor, width: int) -> _Scratch:
        """Buffers for chunks of up to ``width`` coordinates in ``like``'s dtype and device, kept
        between steps (allocating them anew costs page faults on every step)."""
        key = (like.dtype, like.device)
        scratch = self._scratch.get(key)
        if scratch is None or scratch.width < width:
            H = self.config.hidden_size
            rows = {"inputs": [w.shape[0] for w in self.core.weights], "gates": [4 * H], "tanh": [H]}
            scratch = _Scratch(width, {name: [like.new_empty(r * width) for r in rs] for name, rs in rows.items()}, rows)
            self._scratch[key] = scratch
        return scratch


@dataclass
class _Scratch:
    """Flat buffers of :meth:`LSTMGACRule.step_`, viewed as contiguous (rows, width) blocks for
    each chunk: the same layout whatever the capacity, so results do not depend on which
    step first sized the buffers."""

    width: int
    flat: dict[str, list[Tensor]]
    rows: dict[str, list[int]]

    def view(self, name: str, index: int, width: int) -> Tensor:
        rows = self.rows[name][index]
        return self.flat[name][index][: rows * width].view(rows, width)

    def rows_view(self, name: str, rows: int, width: int) -> Tensor:
        """A (rows, width) float32 staging buffer ``name`` (for lower-precision state), made on first use."""
        flat = self.flat.get(name)
        if flat is None or flat[0].numel() < rows * width:
            flat = [self.flat["tanh"][0].new_empty(max(rows, 1) * self.width)]
            self.flat[name] = flat
        return flat[0][: rows * width].view(rows, width)


@dataclass
class _Stage:
    """Where the in-place step reads and writes a chunk: the state's own float32 views, or (for
    lower-precision state) float32 copies that are stored back, rounded once."""

    scratch: _Scratch
    staged: bool

    def load(self, name: str, view: Tensor) -> Tensor:
        if not self.staged:
            return view
        return self.scratch.rows_view(name, view.shape[0], view.shape[1]).copy_(view)

    def store(self, view: Tensor, value: Tensor) -> None:
        if self.staged:
            view.copy_(value)
