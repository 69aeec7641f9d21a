"""``relative_floor``: the relative step's factor max(s_t, s_0) against the plain relative step, by
hand; the drop-in optimizer's in-place step against the differentiable step while the floor binds."""

from __future__ import annotations

import pytest
import torch

from learned_optim import LSTMOptimizer
from learned_optim.rules import LSTMGACConfig, LSTMGACRule, load_rule


def _floored(rule: LSTMGACRule) -> LSTMGACRule:
    floored = LSTMGACRule(LSTMGACConfig(**{**rule.config.to_dict(), "relative_floor": True}))
    floored.load_state_dict(rule.state_dict())  # the same φ: the floor adds no weights and no input
    return floored


def test_the_floor_keeps_theta_zeros_factor_when_theta_shrinks_and_not_when_it_grows():
    shipped, _ = load_rule("suite-relative-offset")
    floored = _floored(shipped)
    layout = shipped.segments([30])
    start = torch.linspace(-1.0, 2.0, 30)
    grad = torch.linspace(0.5, -0.7, 30)
    eps = shipped.config.relative_step

    def rms(t: torch.Tensor) -> float:
        return float(t.square().mean().sqrt())

    for factor in (8.0, 1 / 8):
        updates = {}
        for name, rule in (("plain", shipped), ("floored", floored)):
            state = rule.init_state(30)
            with torch.no_grad():
                _, state = rule(grad, state, layout, params=start)
                updates[name], state = rule(grad, state, layout, params=start * factor)
        expected = updates["plain"] * (max(rms(start * factor), rms(start)) + eps) / (rms(start * factor) + eps)
        torch.testing.assert_close(updates["floored"], expected, rtol=1e-5, atol=1e-8)
        assert float(state[-1, 0]) == pytest.approx(rms(start) + eps)  # s_0 kept from the first step


def test_optimizer_steps_match_the_differentiable_rule_while_the_floor_binds():
    floored = _floored(load_rule("suite-relative-offset")[0])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    opt = LSTMOptimizer(params, weights=floored)
    layout = floored.segments(sizes)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    state = floored.init_state(flat.numel())
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    bound = False
    for _ in range(8):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        with torch.no_grad():
            update, state = floored(grad, state, layout, params=flat)
        opt.step()
        flat = flat + update
        torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), flat, rtol=1e-5, atol=1e-6)
        scale = floored.param_scale(flat, layout)
        bound = bound or bool((state[-1] > scale).any())  # the floor binds somewhere
        with torch.no_grad():  # shrink the last layer (in both): its floor binds from here on
            model[2].weight.mul_(0.7)
            flat[-13:-1].mul_(0.7)
    assert bound


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(5)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * scale)
            for shape, scale in (((20, 6), 0.3), ((6,), 0.0), ((6, 3), 2.0))]


def _run(opt: LSTMOptimizer, steps: int) -> None:
    params = opt.param_groups[0]["params"]
    for step in range(steps):
        gen = torch.Generator().manual_seed(50 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
        opt.step()


def test_optimizer_keeps_s0_per_tensor_and_its_state_converts_to_bfloat16_and_back():
    """s_0 = RMS(θ₀) + ε_θ as one float32 scalar per tensor (no state row: the state's bytes per
    parameter are the plain rule's), in either state_dtype, through state_dict conversions."""
    floored = _floored(load_rule("suite-relative-offset")[0])
    params = _params()
    eps = floored.config.relative_step
    origins = [float(p.detach().square().mean().sqrt()) + eps for p in params]
    half = LSTMOptimizer(params, weights=floored, state_dtype=torch.bfloat16)
    _run(half, 3)
    rows = floored.config.drop_in_rows  # without the s_0 row
    for p, s0 in zip(params, origins):
        state = half.state[p]
        assert state["rule_state"].dtype == torch.bfloat16 and state["rule_state"].shape == (rows - 1, p.numel())
        assert state["scale_origin"].dtype == torch.float32 and float(state["scale_origin"]) == pytest.approx(s0)
        assert float(state["step"]) == 3.0
    full = LSTMOptimizer(params, weights=floored)
    full.load_state_dict(half.state_dict())
    for p in params:
        rule_state = full.state[p]["rule_state"]
        assert rule_state.dtype == torch.float32 and rule_state.shape[0] == rows and rule_state[-1].eq(3).all()
        torch.testing.assert_close(rule_state[:-1], half.state[p]["rule_state"].float(), rtol=0, atol=0)
        assert torch.equal(full.state[p]["scale_origin"], half.state[p]["scale_origin"])
    back = LSTMOptimizer(params, weights=floored, state_dtype=torch.bfloat16)
    back.load_state_dict(full.state_dict())
    _run(half, 2)
    _run(back, 2)
    for p in params:
        assert torch.equal(back.state[p]["rule_state"], half.state[p]["rule_state"])
        assert float(back.state[p]["step"]) == 5.0


def test_bfloat16_state_with_the_floor_steps_as_float32_state_does():
    """Same grads, 20 steps: the bfloat16 state's parameters stay within 2% of the float32 state's
    movement (the step's inputs are rounded, its math is float32 and s_0 is rounded once)."""
    floored = _floored(load_rule("suite-relative-offset")[0])
    start = [p.detach().clone() for p in _params()]
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = _params()
        _run(LSTMOptimizer(params, weights=floored, state_dtype=dtype), 20)
        moved[dtype] = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(params, start)])
    difference = (moved[torch.bfloat16] - moved[torch.float32]).norm() / moved[torch.float32].norm()
    assert 0 < float(difference) < 0.02


def test_the_floor_needs_the_relative_step():
    with pytest.raises(ValueError, match="relative_floor needs relative_step"):
        LSTMGACConfig(relative_floor=True)
