"""The NTM-BFGS update rule of Andrychowicz et al. 2016 (appendix, "Information sharing
between coordinates"): an LSTM+GAC controller driving read and write heads on a memory M
shared by all coordinates of a group.

BFGS is a set of coordinatewise processes that talk only through the inverse-Hessian
estimate M and a few inner products; this rule keeps that structure and learns its form.
Each step t, with gradient ∇_t:

1. controller: the LSTM+GAC rule (:class:`~learned_optim.rules.LSTMGACRule`, reused, with
   the previous read i_{t−1} as two extra preprocessed inputs) gives its own first-order
   update u_t and its top-layer output h_t (per coordinate; the GAC units carry averages);
2. read key: r_t = ∇_t (one read head, BFGS's key; a key modulated per coordinate by the
   controller broke the secant relation y = r_t − r_{t−1} ≈ A·s and diverged within the first
   meta-steps, so the key is fixed);
3. pre-write read q = M_t·r_t; then the key change y = r_t − r_{t−1}, the last step
   s = s_{t−1} and My = q − i_{t−1} (because i_{t−1} = M_t·r_{t−1});
4. write heads w = 1…W: a_w = κ_w·(P_w·[s, My]), b_w = Q_w·[s, My], with the global BFGS
   scalars ρ = 1/(yᵀs) and ρ²·yᵀMy (inner products over the group: the rule's only
   communication besides the GACs) mixed by learned α_w and modulated by the controller:
   κ_w = (α_w,1·ρ + α_w,2·ρ²·yᵀMy)·2σ(δ_w), δ_w the group average of a read-out of h_t;
   M_{t+1} = M_t + Σ_w a_w·b_wᵀ;
5. read i_t = M_{t+1}·r_t; the step is g_t = u_t − 2σ(η(h_t)) ⊙ i_t (η per coordinate).

η and δ_w are a linear read-out of h_t, zero at initialization; P_w, Q_w and α_w start at
BFGS's: W = 3 heads (c·s, s), (−ρ·s, My),
(−ρ·My, s) with c = ρ + ρ²·yᵀMy, the inverse-Hessian update H⁺ = H + c·s·sᵀ − ρ·s·(Hy)ᵀ −
ρ·(Hy)·sᵀ. So the rule starts as BFGS (unit step, M₀ = γ·I) plus the controller's learned
first-order step, and meta-training learns the rest. Write modulations are global (per group),
not per coordinate: per-coordinate ones make M lose BFGS's symmetric form, and the first
meta-steps diverged. By default (``detach_memory``) the meta-gradient does not flow through
the memory carried from step to step (as the paper's first-order mode drops ∂∇/∂φ): through
it, the meta-gradient norm grew about 10³× per truncation of 20 steps. As in BFGS, no write is made unless
yᵀs > ε·‖y‖·‖s‖ (curvature condition; always at t = 0, when s = 0). With ``backtrack``
(default), a step that raised f, by the gradient estimate f(θ_t) − f(θ_{t−1}) ≈
½·(∇_t + ∇_{t−1})ᵀ·s_{t−1} (exact on quadratics), is followed by −s_{t−1}/2 instead: the line
search the rule cannot do with function values. Without it, BFGS's unit steps diverged on
some of the paper's quadratics in float32. With ``reset_on_backtrack`` (off unless set), M also
starts again from M₀ wherever the backtrack fires: the step just taken through M went uphill, so M is
no estimate to follow (on noisy minibatches late in training, where a faster v keeps the steps
long, full steps and half steps back alternate and M, written from those pairs, then gave single
steps 10–100× longer than the ones before, throwing a converged MNIST net back above its initial loss).
With ``reset_indefinite`` (default), M starts again
from M₀ wherever a quadratic form of it that the rule sees is negative: ∇_tᵀ·M_{t+1}·∇_t (the
memory's step −i_t would go uphill: this step reads M₀ instead, and the next write is made
onto M₀) or yᵀ·M_t·y (BFGS's write presumes it positive; the pair is written onto M₀). No
BFGS matrix fails either test, but the limited form's can: it forgets its oldest pairs while
the newer ones hold M·y of the forgotten (the −ρ·s·(My)ᵀ terms), so what is left is no BFGS
matrix and can be indefinite. The shipped limited-memory weights then followed uphill reads
on Rosenbrock to losses of 1e17–1e25 (issue 15). Where neither test fires, the rule computes
exactly what it computes without them.

With ``trust_ratio`` τ (a trust region; off unless set, 1000 in the shipped default), M also starts
again from M₀ wherever the memory's step m_t = g_t − u_t is longer than τ·‖u_t‖, the controller's
(norms over the group), and that step reads M₀. BFGS's M grows as ‖s‖/‖y‖: on a converged net the
curvature is tiny, the controller's normalized steps are not, and the first minibatch gradient of
ordinary size read through such an M gave steps over 1000 times the controller's (the shipped
weights blew up late on MNIST MLPs). Ordinary runs stay far below τ (``benchmarks/ntm_trust.py``).

With ``bfgs_write_bases`` the write heads' vectors and coefficients are BFGS's own (P, Q, α as
initialized; the learned ones are kept in the weights, unused) and only their modulations δ_w and
the read's multiplier η are learned. Meta-trained bases off BFGS's by up to 0.11 broke its secant
algebra: on the paper's quadratics the dense memory with them ends far above BFGS's (README).

With the controller's ``step_decay_after`` t₀ (an LSTM+GAC option) the whole step decays past
t₀: the controller scales its own u_t by √(t₀/t), and the memory's step −i_t is scaled alike (the
read i_t is carried unscaled; the step s_t written to memory is the one taken).

The memory is dense (n × n) or limited (the K most recent write pairs), chosen by size
(:mod:`~learned_optim.rules.ntm_memory`). Head outputs can be replaced by hand
(:class:`BFGSHeads` is textbook BFGS; the tests drive L-BFGS through the same rule), which
is how the memory algebra is proven against BFGS and L-BFGS.

The rule is functional: ``rule(grad, (coords, memory), layout) -> (update, new_state)``,
used under ``no_grad`` by :class:`~learned_optim.NTMBFGS` and with the graph by the
meta-trainer. Its config is in :mod:`~learned_optim.rules.ntm_bfgs_config`, the heads in
:mod:`~learned_optim.rules.ntm_heads`, the memory's forms in :mod:`~learned_optim.rules.ntm_memory`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from .lstm_gac import STEP_CHUNK, LSTMGACRule, widened_inputs
from .ntm_bfgs_config import CARRIED_ROWS, MEMORY_FORMS, NTMBFGSConfig
from .ntm_heads import BFGSHeads, HeadInputs, Heads, LearnedHeads, bfgs_scalars
from .ntm_memory import DenseMemory, LimitedMemory, MemoryGroups, choose_memory
from .preprocess import log_sign_preprocess
from .segments import Segments

# the config and heads live in their own modules; their names stay importable from here
__all__ = ["NTMBFGSConfig", "NTMBFGSRule", "NTMLayout", "HeadInputs", "BFGSHeads", "LearnedHeads",
           "bfgs_scalars", "MEMORY_FORMS"]


@dataclass
class NTMLayout:
    """Where a flat vector's coordinates go: GAC scopes, memory groups, and the memory form."""

    gac: Segments
    groups: MemoryGroups
    memory: DenseMemory | LimitedMemory


def _reads_of_m0(memory: DenseMemory | LimitedMemory, groups: MemoryGroups, where: Tensor,
                 *reads: tuple[Tensor, Tensor]) -> list[Tensor]:
    """Each (key, read) pair's read, replaced by M₀·key = γ·key in the groups flagged in
    ``where`` (G,): the reads of a memory reset there."""
    coordinates = groups.expand(where)  # (N,)
    return [torch.where(coordinates, memory.initial_scale * key, read) for key, read in reads]


class NTMBFGSRule(nn.Module):
    """The learned NTM-BFGS rule: LSTM+GAC controller → heads → memory (see the module doc)."""

    name = "ntm-bfgs"

    def __init__(self, config: NTMBFGSConfig | None = None, seed: int = 0, heads: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config or NTMBFGSConfig()
        cfg = self.config
        self.controller = LSTMGACRule(cfg.controller, seed=seed)
        self.heads = heads if heads is not None else LearnedHeads(cfg.controller.hidden_size, cfg.write_heads,
                                                                  cfg.bfgs_write_bases)

    @property
    def dtype(self) -> torch.dtype:
        return self.controller.dtype

    @property
    def device(self) -> torch.device:
        return self.controller.device

    def with_memory(self, form: str | None = None, capacity: int | None = None,
                    curvature_eps: float | None = None) -> NTMBFGSRule:
        """A copy of this rule (same φ) with another memory form, capacity K or ε of the
        curvature condition (None keeps each)."""
        changes: dict[str, Any] = {k: v for k, v in (("memory", form), ("memory_capacity", capacity),
                                                     ("curvature_eps", curvature_eps)) if v is not None}
        fresh = copy.deepcopy(self)
        fresh.config = replace(self.config, **changes)
        return fresh

    def load_controller(self, lstm: LSTMGACRule) -> None:
        """Start the controller from trained LSTM+GAC weights (a warm start for meta-training).

        The LSTM's config must equal the controller's but for the 2 extra inputs; their input
        weights start at zero, so the controller then steps exactly as the LSTM rule does.
        """
        mine, theirs = self.config.controller, lstm.config
        if replace(theirs, extra_inputs=mine.extra_inputs) != mine or theirs.extra_inputs != 0:
            raise ValueError(f"LSTM+GAC config {theirs.to_dict()} does not fit this controller {mine.to_dict()} "
                             "(all fields but extra_inputs must match)")
        state = {k: v.detach().clone() for k, v in lstm.state_dict().items()}
        self.controller.load_state_dict(widened_inputs(state, theirs, mine))

    # ------------------------------------------------------------------ layout and state

    def segments(self, sizes: Sequence[int], device: torch.device | str | None = None,
                 process_group: Any = None) -> NTMLayout:
        """The layout of one param group whose tensors have ``sizes`` coordinates (one memory);
        with a ``process_group``, this rank's shards of tensors sharded across it."""
        total = int(sum(sizes))
        return self.segments_from(Segments.from_sizes(sizes, device, process_group) if sizes
                                  else Segments.single(0, process_group),
                                  Segments.single(total, process_group))

    def segments_from(self, tensor_scopes: Segments, group_scopes: Segments) -> NTMLayout:
        """The layout given the per-tensor and per-group partitions: one memory per group."""
        groups = MemoryGroups.from_segments(group_scopes)
        cfg = self.config
        memory = choose_memory(groups.width, cfg.memory, cfg.memory_capacity, cfg.initial_scale,
                               group_scopes.process_group)
        return NTMLayout(self.controller.segments_from(tensor_scopes, group_scopes), groups, memory)

    def init_state(self, num_coordinates: int, device: torch.device | str | None = None,
                   segments: NTMLayout | None = None) -> tuple[Tensor, Tensor]:
        """Zero per-coordinate state (R, N) and the empty memory M₀ = γ·I of every group."""
        layout = segments if segments is not None else self.segments([num_coordinates], device)
        if layout.groups.size != num_coordinates:
            raise ValueError(f"layout covers {layout.groups.size} coordinates, not {num_coordinates}")
        device = device if device is not None else self.device
        coords = torch.zeros(self.config.state_rows, num_coordinates, dtype=self.dtype, device=device)
        memory = layout.memory.init_state(layout.groups.width, self.dtype, device, groups=layout.groups.count)
        return coords, memory

    # ------------------------------------------------------------------ the step

    def forward(self, grad: Tensor, state: tuple[Tensor, Tensor], segments: NTMLayout) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """g_t and the new state ((R, N) per coordinate, memory) from flat gradients (N,)."""
        coords, memory_state = self._checked(grad, state, segments)
        controller_state, carried = coords.split((self.config.controller.state_rows, CARRIED_ROWS))
        if self.config.detach_memory:  # cut the memory path (M and the carried ∇, r, s, i) between steps
            memory_state, carried = memory_state.detach(), carried.detach()
        extra = self._controller_extra(carried)
        controller_update, new_controller, top = self.controller.step(grad, controller_state, segments.gac, extra)
        update, new_carried, memory_state = self._heads(grad, top, controller_update, carried, memory_state, segments,
                                                        self._step_decay(new_controller[-1:]))
        return update, (torch.cat((new_controller, new_carried)), memory_state)

    @torch.no_grad()
    def step_(self, grad: Tensor, state: tuple[Tensor, Tensor], segments: NTMLayout, out: Tensor,
              chunk: int = STEP_CHUNK, fused: bool = False, carried: Tensor | None = None,
              count: Tensor | None = None) -> Tensor:
        """:meth:`forward` in place, for the drop-in optimizer (not differentiable): writes g_t
        into ``out`` (N,), advances the per-coordinate state (R, N) in place and returns the new
        memory. The controller runs chunk by chunk in place (:meth:`LSTMGACRule.step_`, with
        torch's tanh: the memory's inner products amplify rounding, see ``lstm_cell``); the
        heads and memory are :meth:`forward`'s own code. ``fused`` steps the controller through
        the Triton kernels (:meth:`LSTMGACRule.step_`).

        ``carried`` (4, N) float32 holds the rows after the controller's (∇, r, s, i of the last
        step) apart from the state, which then holds the controller's rows only, possibly in
        bfloat16 (the drop-in optimizer's ``state_dtype``): the memory's inner products need
        the carried rows in float32. ``count`` (N,) float32 then holds a bias-corrected
        controller's step counts t apart from its rows (see :meth:`LSTMGACRule.step_`), which
        then lack their last row: a bfloat16 row cannot count steps."""
        if count is not None and carried is None:
            raise ValueError("count (the controller's step counts held apart) goes with carried rows held apart")
        if carried is None:
            coords, memory_state = self._checked(grad, state, segments)
            controller_state, carried = coords.split((self.config.controller.state_rows, CARRIED_ROWS))
        else:
            controller_state, memory_state = state
            rows = self.config.controller.state_rows - int(count is not None)
            if controller_state.dim() != 2 or controller_state.shape != (rows, grad.shape[0]):
                raise ValueError(f"controller state must have shape ({rows}, {grad.shape[0]}), "
                                 f"got {tuple(controller_state.shape)}")
            if carried.shape != (CARRIED_ROWS, grad.shape[0]) or carried.dtype != self.dtype:
                raise ValueError(f"carried rows must be {self.dtype} of shape ({CARRIED_ROWS}, {grad.shape[0]}), "
                                 f"got {carried.dtype} {tuple(carried.shape)}")
            segments.memory.check_state(memory_state, segments.groups.width, segments.groups.count)
        extra = self._controller_extra(carried)
        top = self.controller.step_(grad, controller_state, segments.gac, out, extra, chunk=chunk, sigmoid_tanh=False,
                                    fused=fused, count=count)
        top = top.to(self.dtype)  # the heads read h in float32 (a copy where the state is bfloat16)
        decay = self._step_decay(controller_state[-1:] if count is None else count.unsqueeze(0))
        update, new_carried, memory_state = self._heads(grad, top, out.clone(), carried, memory_state, segments, decay)
        carried.copy_(new_carried)
        out.copy_(update)
        return memory_state

    def _checked(self, grad: Tensor, state: tuple[Tensor, Tensor], layout: NTMLayout) -> tuple[Tensor, Tensor]:
        cfg = self.config
        coords, memory_state = state
        if coords.dim() != 2 or coords.shape != (cfg.state_rows, grad.shape[0]):
            raise ValueError(f"per-coordinate state must have shape ({cfg.state_rows}, {grad.shape[0]}), "
                             f"got {tuple(coords.shape)}")
        layout.memory.check_state(memory_state, layout.groups.width, layout.groups.count)
        return coords, memory_state

    def _step_decay(self, count: Tensor) -> Tensor | None:
        """The controller's ``step_decay_after`` factor √(t₀/max(t, t₀)) (N,) from its advanced step
        counts ``count`` (1, N), or None without it: it scales the memory's step as the
        controller's own (which the controller has already scaled), so the whole step decays."""
        if self.config.controller.step_decay_after is None:
            return None
        return self.controller.step_decay(count.to(self.dtype))

    def _controller_extra(self, carried: Tensor) -> Tensor:
        """The controller's extra inputs: the preprocessed last read i_{t−1} (2, N)."""
        return log_sign_preprocess(carried.unbind(0)[-1], self.config.controller.preprocess_p)

    def _heads(self, grad: Tensor, top: Tensor, controller_update: Tensor, carried: Tensor, memory_state: Tensor,
               layout: NTMLayout, decay: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Read and write heads on the memory, from the controller's top output and update:
        g_t, the new carried rows (∇_t, r_t, s_t, i_t) (4, N) and the new memory. ``decay`` (N,)
        scales the memory's step −i_t (the controller's ``step_decay_after``; i_t is carried unscaled)."""
        cfg, groups, memory = self.config, layout.groups, layout.memory
        heads = cast(Heads, self.heads)  # an nn.Module attribute, typed Tensor | Module by torch
        prev_grad, prev_key, prev_step, prev_read = carried.unbind(0)
        ctx = HeadInputs(grad, top, prev_key, prev_step, prev_read, controller_update, groups, cfg.curvature_eps)
        key = heads.key(ctx)
        keys = groups.gather(key.unsqueeze(0))  # (G, 1, n)
        pre_read = groups.scatter(memory.read(memory_state, keys)).squeeze(0)  # M_t·r_t
        reset = None
        if cfg.reset_indefinite:
            # M_t is no BFGS estimate to build on (none is indefinite) where r_{t−1}ᵀ·M_t·r_{t−1} < 0
            # (the last step's read i_{t−1} went uphill) or yᵀ·M_t·y < 0 (BFGS's write presumes it
            # positive: c = ρ + ρ²·yᵀMy): there this pair is written onto M₀, and the reads are M₀'s.
            reset = groups.any((groups.dot(prev_key, prev_read) < 0)
                               | (groups.dot(key - prev_key, pre_read - prev_read) < 0))
            pre_read, ctx.prev_read = _reads_of_m0(memory, groups, reset, (key, pre_read), (prev_key, prev_read))
        left, right = heads.writes(ctx, key, pre_read)
        memory_state = memory.write(memory_state, groups.gather(left), groups.gather(right), reset=reset)
        read = groups.scatter(memory.read(memory_state, keys)).squeeze(0)  # i_t = M_{t+1}·r_t, carried
        step_read = read
        if cfg.reset_indefinite:
            # r_tᵀ·i_t < 0: the memory's step −i_t would go uphill; this step reads M₀ instead, and
            # the next step, seeing the same r_tᵀ·i_t in the carried rows, writes onto M₀
            (step_read,) = _reads_of_m0(memory, groups, groups.any(groups.dot(key, read) < 0), (key, read))
        update = heads.output(ctx, step_read if decay is None else step_read * decay)
        if cfg.trust_ratio is not None:
            update, read, memory_state = self._within_trust(ctx, heads, key, update, read, memory_state, layout, decay)
        if cfg.backtrack:
            # f(θ_t) − f(θ_{t−1}) ≈ ½·(∇_t + ∇_{t−1})ᵀ·s_{t−1} (exact on quadratics): if the last
            # step raised f, go halfway back instead; a line search with no function values.
            rise = groups.dot(grad + prev_grad, prev_step) > 0
            update = torch.where(rise, -0.5 * prev_step, update)
            if cfg.reset_on_backtrack:  # the step through M went uphill: M starts again from M₀
                read, memory_state = self._reset_where(groups.any(rise), key, read, memory_state, layout)
        return update, torch.stack((grad, key, update, read)), memory_state

    def _reset_where(self, where: Tensor, key: Tensor, read: Tensor, memory_state: Tensor,
                     layout: NTMLayout) -> tuple[Tensor, Tensor]:
        """The memory back at M₀ in the groups flagged in ``where`` (G,), and the carried read i_t
        there M₀'s (the next step's My = M·r_t − i_t then holds for the reset M)."""
        groups, memory = layout.groups, layout.memory
        if where.device.type == "cpu" and not bool(where.any()):
            return read, memory_state  # nothing to reset (asking is free on the CPU)
        (m0_read,) = _reads_of_m0(memory, groups, where, (key, read))
        # the written memory is a fresh tensor: without autograd it is reset in place (a functional
        # reset would allocate the whole memory again every step: 240 bytes per parameter at K = 30)
        if torch.is_grad_enabled() and memory_state.requires_grad:
            return m0_read, memory.reset(memory_state, where)
        return m0_read, memory.reset_(memory_state, where)

    def _within_trust(self, ctx: HeadInputs, heads: Heads, key: Tensor, update: Tensor, read: Tensor,
                      memory_state: Tensor, layout: NTMLayout, decay: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The trust region of ``trust_ratio`` τ: in groups where the memory's step (the update
        less the controller's u_t) is longer than τ·‖u_t‖, M is no estimate to follow: it starts
        again from M₀ now, this step reads M₀ and the carried read i_t is M₀'s. Such memories come
        from pairs whose gradient change y is tiny beside the step s (minibatch noise on a
        converged net: ‖M‖ ~ ‖s‖/‖y‖), read with a larger gradient. Elsewhere nothing changes."""
        groups = layout.groups
        controller = ctx.controller_update
        own = update - controller  # the memory's step
        ratio = cast(float, self.config.trust_ratio)
        # ‖m‖ > τ·‖u‖, or not finite (a non-finite read overflows the products: also no estimate)
        squared = groups.dot(own, own)
        outside = groups.any((squared > ratio * ratio * groups.dot(controller, controller)) | ~torch.isfinite(squared))
        if outside.device.type == "cpu" and not bool(outside.any()):
            return update, read, memory_state  # asking is free on the CPU (a GPU would wait for the device)
        m0_read, memory_state = self._reset_where(outside, key, read, memory_state, layout)
        fallback = heads.output(ctx, m0_read if decay is None else m0_read * decay)
        return torch.where(groups.expand(outside), fallback, update), m0_read, memory_state
