"""``scale_growth``: the LSTM input g_t = log(s_t/s_0) and the learned exponent of the relative step's
factor, s_t·exp((α − 1)·g_t) = s_0·(s_t/s_0)^α, by hand; their invariance to θ → cθ; that widened weights
(zero input row, zero head) step exactly as before; the in-place step against the differentiable one."""

from __future__ import annotations

import math

import pytest
import torch

from learned_optim import LSTMOptimizer
from learned_optim.rules import LSTMGACConfig, LSTMGACRule, load_rule
from learned_optim.rules.lstm_gac import widened_inputs
from learned_optim.rules.lstm_gac_config import GROWTH_BOUND

RELATIVE = dict(momentum_decays=(0.5, 0.9, 0.99), momentum_rms_decay=0.999, input_features="normalized",
                bias_correction=True, absolute_step=False, step_timescales=(10.0, 100.0), relative_step=0.01)


def _growing(seed: int = 0, head: float = 0.3, eps: float = 0.01) -> LSTMGACRule:
    """A rule with scale_growth whose φ is random (the growth row and exponent head in use)."""
    rule = LSTMGACRule(LSTMGACConfig(scale_growth=True, **{**RELATIVE, "relative_step": eps}), seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 7)
        for p in rule.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * head)
    return rule


def test_growth_is_the_log_ratio_to_the_first_factor_kept_in_the_state_and_clamped():
    rule = _growing()
    # no s_0 kept yet (0): s_0 := s_t, g = 0; kept: log(s_t/s_0); beyond e^±5: clamped
    scale = torch.tensor([2.0, 0.5, 3.0, 1e4, 1e-4])
    origin = torch.tensor([[0.0, 1.0, 3.0, 1.0, 1.0]])
    kept = rule.kept_origin(scale, origin)
    growth = rule.scale_growth(scale, kept)
    torch.testing.assert_close(kept, torch.tensor([[2.0, 1.0, 3.0, 1.0, 1.0]]))
    torch.testing.assert_close(growth, torch.tensor([[0.0, math.log(0.5), 0.0, GROWTH_BOUND, -GROWTH_BOUND]]))
    assert rule.config.input_names()[-1] == "log(scale/scale0)"
    assert rule.config.state_rows == LSTMGACConfig(**RELATIVE).state_rows + 1


def test_the_exponent_head_multiplies_the_step_by_exp_of_tanh_b_times_g():
    """With w = 0 the exponent is α − 1 = tanh(b) everywhere, and the LSTM does not see b, so the
    update with b is the update with b = 0 times exp(tanh(b)·g_t): b → −∞ holds the factor at s_0."""
    rule = _growing(seed=1)
    sizes = [12, 5]
    layout = rule.segments(sizes)
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(17, generator=gen)
    state = rule.init_state(17)
    grad = torch.randn(17, generator=gen)
    _, state = rule(grad, state, layout, params=theta)  # s_0 kept: the factors at this θ
    grown = theta * torch.cat((torch.full((12,), 3.0), torch.full((5,), 0.5)))  # RMS ×3 and ×½
    with torch.no_grad():
        rule.growth_weight.zero_()
        rule.growth_bias.zero_()
        plain, _ = rule(grad, state, layout, params=grown)
        rule.growth_bias.fill_(-0.8)
        damped, _ = rule(grad, state, layout, params=grown)

    def factor(t: torch.Tensor) -> torch.Tensor:
        return t.square().mean().sqrt() + 0.01

    growth = torch.cat([torch.full((g.numel(),), float(torch.log(factor(g) / factor(t))))
                        for g, t in zip(grown.split(sizes), theta.split(sizes))])
    torch.testing.assert_close(damped, plain * torch.exp(math.tanh(-0.8) * growth), rtol=1e-5, atol=1e-7)


def test_steps_follow_theta_to_c_theta_and_the_growth_input_does_not_change():
    """θ → cθ, ∇ → ∇/c (one tensor): g_t and the LSTM's inputs are unchanged, the step is c times
    larger (exactly but for ε_θ, here 1e-9, and rounding)."""
    rule = _growing(seed=2, eps=1e-9)
    layout = rule.segments([40])
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(40, generator=gen) for _ in range(5)]
    c = 8.0
    runs = {}
    for scale in (1.0, c):
        theta = torch.randn(40, generator=torch.Generator().manual_seed(9)) * 4 * scale
        state, updates = rule.init_state(40), []
        for g in grads:
            with torch.no_grad():
                update, state = rule(g / scale, state, layout, params=theta)
            theta = theta + update
            updates.append(update)
        runs[scale] = (updates, state)
    for a, b in zip(runs[1.0][0], runs[c][0]):
        torch.testing.assert_close(b, c * a, rtol=1e-4, atol=1e-5)
    assert float(runs[1.0][1][-1][0]) > 0  # s_0 kept


def test_weights_widened_to_read_growth_step_exactly_as_before():
    shipped, _ = load_rule("suite-relative-offset")
    config = LSTMGACConfig(**{**shipped.config.to_dict(), "scale_growth": True})
    widened = LSTMGACRule(config)
    widened.load_state_dict(widened_inputs(shipped.state_dict(), shipped.config, config))
    layout = shipped.segments([30, 20])
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(50, generator=gen)
    theta_wide = theta.clone()
    state, state_wide = shipped.init_state(50), widened.init_state(50)
    with torch.no_grad():
        for _ in range(6):
            grad = torch.randn(50, generator=gen)
            update, state = shipped(grad, state, layout, params=theta)
            update_wide, state_wide = widened(grad, state_wide, layout, params=theta_wide)
            assert torch.equal(update, update_wide)
            theta, theta_wide = theta + 5 * update, theta_wide + 5 * update_wide  # growing: g ≠ 0
    assert torch.equal(state_wide[:-1], state)
    assert float(state_wide[-1].min()) > 0


def test_in_place_step_matches_the_differentiable_step():
    rule = _growing(seed=3)
    sizes = [300, 7, 1, 60]
    layout = rule.segments(sizes)
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(368, generator=gen) * 0.1
    theta_in_place = theta.clone()
    state, state_in_place = rule.init_state(368), rule.init_state(368)
    out = torch.empty(368)
    for _ in range(4):
        grad = torch.randn(368, generator=gen)
        with torch.no_grad():
            update, state = rule(grad, state, layout, params=theta)
        rule.step_(grad, state_in_place, layout, out, chunk=64, params=theta_in_place)
        torch.testing.assert_close(out, update, rtol=1e-5, atol=1e-7)
        theta, theta_in_place = theta + 3 * update, theta_in_place + 3 * out
    torch.testing.assert_close(state_in_place, state, rtol=1e-5, atol=1e-6)


def test_growth_needs_the_relative_step_and_the_flat_params():
    with pytest.raises(ValueError, match="scale_growth needs relative_step"):
        LSTMGACConfig(scale_growth=True, **{**RELATIVE, "relative_step": None})
    rule = _growing()
    layout = rule.segments([10])
    state = rule.init_state(10)
    before = state.clone()
    with pytest.raises(ValueError, match="scale_growth needs the flat parameters"):
        rule.step_(torch.ones(10), state, layout, torch.empty(10), apply_param_scale=False)
    assert torch.equal(state, before)  # refused before anything moved


def test_growth_with_the_step_count_and_s0_held_apart_is_the_same_step():
    """count= (how a bfloat16 state holds t) and origin= (how LSTMOptimizer holds s_0): the in-state
    arithmetic exactly, with the s_0 row after the count's in the state."""
    rule = _growing(seed=2)
    rows, num = rule.config.state_rows, 12
    layout = rule.segments([8, 4])
    in_state, count = rule.init_state(num), torch.zeros(num)
    apart, both, count2, origin = torch.zeros(rows - 1, num), torch.zeros(rows - 2, num), torch.zeros(num), \
        torch.zeros(1, num)
    out_a, out_b, out_c = torch.empty(num), torch.empty(num), torch.empty(num)
    theta = torch.linspace(-1.0, 1.0, num)
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        grad = torch.randn(num, generator=gen) * 0.1
        params = theta * (1.5 ** step)  # growing, so g_t moves
        rule.step_(grad, in_state, layout, out_a, params=params)
        rule.step_(grad, apart, layout, out_b, params=params, count=count)
        rule.step_(grad, both, layout, out_c, params=params, count=count2, origin=origin)
        torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
        torch.testing.assert_close(out_c, out_a, rtol=0, atol=0)
    t_row = rows - 2
    torch.testing.assert_close(apart, torch.cat((in_state[:t_row], in_state[t_row + 1:])), rtol=0, atol=0)
    torch.testing.assert_close(both, in_state[:t_row], rtol=0, atol=0)
    torch.testing.assert_close(origin, in_state[-1:], rtol=0, atol=0)
    assert count.eq(5).all() and in_state[t_row].eq(5).all()
    with pytest.raises(ValueError, match=r"rule state without its step counts \(count=\) and s_0"):
        rule.step_(grad, apart, layout, out_c, params=params, count=count, origin=origin)


def test_optimizer_with_growth_steps_as_the_rule_and_its_state_dict_round_trips():
    rule = _growing(seed=4, head=0.2)
    gen = torch.Generator().manual_seed(6)
    w = torch.nn.Parameter(torch.randn(8, 5, generator=gen) * 0.3)
    b = torch.nn.Parameter(torch.zeros(5))
    opt = LSTMOptimizer([w, b], weights=rule)
    flat = torch.cat((w.detach().reshape(-1), b.detach())).clone()
    state = rule.init_state(45)
    layout = rule.segments([40, 5])
    x = torch.randn(16, 8, generator=gen)
    for _ in range(3):
        opt.zero_grad()
        (x @ w + b).tanh().square().mean().backward()
        grad = torch.cat((w.grad.reshape(-1), b.grad))
        with torch.no_grad():
            update, state = rule(grad, state, layout, params=flat)
        opt.step()
        flat = flat + update
        torch.testing.assert_close(torch.cat((w.detach().reshape(-1), b.detach())), flat, rtol=1e-5, atol=1e-6)
    saved = opt.state_dict()
    again = LSTMOptimizer([torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())],
                          weights=rule)
    again.load_state_dict(saved)
    for p, q in zip(opt.param_groups[0]["params"], again.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["rule_state"], again.state[q]["rule_state"])
    for p, q in zip(opt.param_groups[0]["params"], again.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["scale_origin"], again.state[q]["scale_origin"])
    assert float(opt.state[b]["scale_origin"]) == pytest.approx(0.01)  # zero biases: s_0 = ε_θ
