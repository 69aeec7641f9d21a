"""``shrink_discount``: the floored factor max(s_0, s_t·m_t/s_0), m_t the lowest factor so far, by hand;
the drop-in optimizer's per-tensor and flat steps against the differentiable step; its state's rows."""

from __future__ import annotations

import pytest
import torch

from learned_optim import LSTMOptimizer
from learned_optim.rules import LSTMGACConfig, LSTMGACRule, load_rule


def _with(rule: LSTMGACRule, **changes) -> LSTMGACRule:
    """The same φ under another config (the floor and the discount add no weights and no input)."""
    changed = LSTMGACRule(LSTMGACConfig(**{**rule.config.to_dict(), **changes}))
    changed.load_state_dict(rule.state_dict())
    return changed


def _rms(t: torch.Tensor) -> float:
    return float(t.square().mean().sqrt())


def test_growth_after_a_shrink_counts_at_the_shrinks_ratio_by_hand():
    plain, _ = load_rule("suite-relative-offset")
    discounted = _with(plain, relative_floor=True, shrink_discount=True)
    layout = plain.segments([30])
    start = torch.linspace(-1.0, 2.0, 30)
    grad = torch.linspace(0.5, -0.7, 30)
    eps = plain.config.relative_step
    s0 = _rms(start) + eps
    states = {"plain": plain.init_state(30), "discounted": discounted.init_state(30)}
    lowest = s0
    # θ shrinks to half, regrows 4×, 8×, shrinks to a quarter: s_t, the lowest m_t, the factor
    for multiple in (1.0, 0.5, 2.0, 4.0, 8.0, 0.25):
        params = start * multiple
        s_t = _rms(params) + eps
        lowest = min(lowest, s_t)
        updates = {}
        with torch.no_grad():
            for name, rule in (("plain", plain), ("discounted", discounted)):
                updates[name], states[name] = rule(grad, states[name], layout, params=params)
        factor = max(s0, s_t * lowest / s0)
        torch.testing.assert_close(updates["discounted"], updates["plain"] * factor / s_t, rtol=1e-5, atol=1e-8)
        kept = states["discounted"][-2:, 0]
        assert float(kept[0]) == pytest.approx(s0) and float(kept[1]) == pytest.approx(lowest)


def test_a_tensor_that_only_grows_steps_as_with_the_floor_alone():
    plain, _ = load_rule("suite-relative-offset")
    floored = _with(plain, relative_floor=True)
    discounted = _with(plain, relative_floor=True, shrink_discount=True)
    layout = plain.segments([30])
    start, grad = torch.linspace(-1.0, 2.0, 30), torch.linspace(0.5, -0.7, 30)
    a, b = floored.init_state(30), discounted.init_state(30)
    with torch.no_grad():
        for multiple in (1.0, 1.0, 1.5, 3.0, 10.0):
            ua, a = floored(grad, a, layout, params=start * multiple)
            ub, b = discounted(grad, b, layout, params=start * multiple)
            torch.testing.assert_close(ub, ua, rtol=0, atol=0)


def _model_run(opt: LSTMOptimizer, rule: LSTMGACRule, model: torch.nn.Module, steps: int) -> None:
    """``opt`` against ``rule``'s differentiable step on the same grads, the last layer shrunk then grown."""
    params = list(model.parameters())
    layout = rule.segments([p.numel() for p in params])
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    state = rule.init_state(flat.numel())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen), torch.randn(32, 1, generator=gen)
    last = model[2].weight.numel() + model[2].bias.numel()
    for step in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        with torch.no_grad():
            update, state = rule(grad, state, layout, params=flat)
        opt.step()
        flat = flat + update
        torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), flat, rtol=1e-5, atol=1e-6)
        multiple = 0.5 if step < 3 else 1.8  # the last layer shrinks, then grows past its start
        with torch.no_grad():
            model[2].weight.mul_(multiple)
            flat[-last:-1].mul_(multiple)
    discounted = state[-1] < state[-2] * (1 - 1e-6)  # m_t below s_0 somewhere: the discount is in play
    assert bool(discounted.any())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))


def test_optimizer_per_tensor_steps_match_the_differentiable_rule():
    rule = _with(load_rule("suite-relative-offset")[0], relative_floor=True, shrink_discount=True)
    model = _model()
    opt = LSTMOptimizer(model.parameters(), weights=rule)
    _model_run(opt, rule, model, 8)
    for p in model.parameters():  # s_0 and m_t per tensor, float32, beside a state without their rows
        assert opt.state[p]["scale_origin"].shape == (2,) and opt.state[p]["rule_state"].shape[0] == \
            rule.config.drop_in_rows
        s0, low = opt.state[p]["scale_origin"].tolist()
        assert 0 < low <= s0


def test_optimizer_flat_steps_with_both_rows_held_apart_match_the_differentiable_rule():
    """With scale_growth (exponent head at zero: α = 1) the optimizer takes the flat path, s_0 and m_t
    spread over the coordinates and gathered back per tensor."""
    source = load_rule("suite-relative-offset")[0]
    rule = LSTMGACRule(LSTMGACConfig(**{**source.config.to_dict(), "scale_growth": True, "relative_floor": True,
                                        "shrink_discount": True}), seed=3)
    with torch.no_grad():
        for p in rule.parameters():
            p.mul_(0.5)
        rule.growth_weight.zero_()
        rule.growth_bias.zero_()
    model = _model()
    opt = LSTMOptimizer(model.parameters(), weights=rule)
    _model_run(opt, rule, model, 8)


def test_state_dict_round_trips_and_a_floor_only_state_is_refused_by_name():
    shipped = load_rule("suite-relative-offset")[0]
    discounted = _with(shipped, relative_floor=True, shrink_discount=True)
    floored = _with(shipped, relative_floor=True)
    model = _model()
    params = list(model.parameters())
    opt = LSTMOptimizer(params, weights=discounted, state_dtype=torch.bfloat16)
    other = LSTMOptimizer(params, weights=floored)
    for p in params:
        p.grad = torch.ones_like(p) * 0.1
    opt.step()
    other.step()
    again = LSTMOptimizer(params, weights=discounted)
    again.load_state_dict(opt.state_dict())
    for p in params:
        assert torch.equal(again.state[p]["scale_origin"], opt.state[p]["scale_origin"])
    before = {p: {k: v.clone() for k, v in again.state[p].items()} for p in params}
    with pytest.raises(ValueError, match=r"holds 1 scale origin value\(s\) \(scale_origin\).*keeps 2"):
        again.load_state_dict(other.state_dict())
    for p in params:  # refused before anything changed
        for key, value in before[p].items():
            assert torch.equal(again.state[p][key], value)


def test_the_discount_needs_the_floor():
    with pytest.raises(ValueError, match="shrink_discount needs relative_floor"):
        LSTMGACConfig(momentum_decays=(0.9,), momentum_rms_decay=0.999, input_features="normalized",
                      absolute_step=False, relative_step=0.01, shrink_discount=True)
    with pytest.raises(ValueError, match="shrink_discount must be True or False"):
        LSTMGACConfig(shrink_discount=1)


def test_meta_gradients_flow_through_the_lowest_factor():
    """In the differentiable step m_t carries the graph: the step after a shrink depends on the θ of
    the shrink (through m_t), which the floor alone forgets once θ has regrown past s_0."""
    plain, _ = load_rule("suite-relative-offset")
    layout = plain.segments([30])
    start, grad = torch.linspace(-1.0, 2.0, 30), torch.linspace(0.5, -0.7, 30)
    sensitivity = {}
    for name, rule in (("floor", _with(plain, relative_floor=True)),
                       ("discount", _with(plain, relative_floor=True, shrink_discount=True))):
        shrunk = (start * 0.5).requires_grad_()
        state = rule.init_state(30)
        _, state = rule(grad, state, layout, params=start)
        _, state = rule(grad, state, layout, params=shrunk)
        update, _ = rule(grad, state, layout, params=start * 3.0)  # regrown past s_0
        (sensitivity[name],) = torch.autograd.grad(update.square().sum(), shrunk, allow_unused=True)
    assert sensitivity["floor"] is None or float(sensitivity["floor"].abs().max()) == 0.0
    assert torch.isfinite(sensitivity["discount"]).all() and float(sensitivity["discount"].abs().max()) > 0
