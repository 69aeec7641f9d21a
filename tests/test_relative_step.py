"""The parameter-relative step (``relative_step``, Celo's): the whole step times RMS(θ) + ε_θ over
each coordinate's scope, by hand; its reparametrization equivariance; and that the drop-in step,
the in-place step and the meta-trainer's unroll all take it from the one rule."""

from __future__ import annotations

import math

import pytest
import torch

from learned_optim import LSTMOptimizer
from learned_optim.meta import TruncatedBPTT, Unroll
from learned_optim.rules import LSTMGACConfig, LSTMGACRule, Segments
from learned_optim.rules.ntm_bfgs_config import NTMBFGSConfig
from learned_optim.rules.param_scale import TensorScales
from learned_optim.tasks import get_family

RELATIVE = dict(momentum_decays=(0.5, 0.9, 0.99), momentum_rms_decay=0.999, input_features="normalized",
                bias_correction=True, absolute_step=False)


def _trained_looking(rule: LSTMGACRule, seed: int = 4) -> LSTMGACRule:
    """``rule`` with every tensor perturbed, so every term of the step (and the LSTM) is in use."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in rule.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return rule


def test_a_fresh_relative_rule_steps_a_tenth_of_each_tensors_rms_plus_epsilon_by_hand():
    """A fresh rule is Adam on d_0.9 with step size 0.1, times RMS(θ) + ε_θ: under a first
    gradient d_0.9 = sign ∇, so θ = (3, −4 | 0, 0, 0) with ε_θ = 0.01 moves by
    −0.1·sign ∇·(√((9 + 16)/2) + 0.01) on the first tensor and −0.1·sign ∇·0.01 on the zeros."""
    rule = LSTMGACRule(LSTMGACConfig(relative_step=0.01, **RELATIVE), seed=0)
    segments = Segments.from_sizes([2, 3])
    theta = torch.tensor([3.0, -4.0, 0.0, 0.0, 0.0])
    grad = torch.tensor([0.5, -2.0, 0.1, -7.0, 3.0])
    update, _ = rule(grad, rule.init_state(5), segments, params=theta)
    scale = torch.tensor([math.sqrt(12.5) + 0.01] * 2 + [0.01] * 3)
    torch.testing.assert_close(update.detach(), -0.1 * grad.sign() * scale, rtol=1e-5, atol=0)


def test_rescaling_a_tensor_and_its_gradients_rescales_its_steps_alone():
    """θ_k → c_k·θ_k with ∇_k → ∇_k/c_k (the same function, reparametrized per tensor): the
    normalized inputs do not change and the steps of tensor k are multiplied by c_k, at every
    step of a run (ε_θ small beside the tensors' RMS)."""
    rule = _trained_looking(LSTMGACRule(LSTMGACConfig(relative_step=1e-9, step_timescales=(3.0,), **RELATIVE),
                                        seed=1))
    sizes = [6, 4, 5]
    segments = Segments.from_sizes(sizes)
    factors = torch.cat([torch.full((n,), c) for n, c in zip(sizes, (0.01, 1.0, 30.0))])
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(15, generator=gen)
    state = scaled_state = rule.init_state(15)
    scaled_theta = theta * factors
    for _ in range(5):
        grad = torch.randn(15, generator=gen)
        update, state = rule(grad, state, segments, params=theta)
        scaled_update, scaled_state = rule(grad / factors, scaled_state, segments, params=scaled_theta)
        torch.testing.assert_close(scaled_update.detach(), update.detach() * factors, rtol=2e-5, atol=0)
        theta, scaled_theta = theta + update.detach(), scaled_theta + scaled_update.detach()
    assert update.abs().min() > 0  # a real step on every coordinate


@pytest.mark.parametrize("chunk", [4, 16384])
def test_the_in_place_step_scales_as_the_differentiable_one(chunk):
    rule = _trained_looking(LSTMGACRule(LSTMGACConfig(relative_step=0.01, **RELATIVE), seed=3))
    sizes = [7, 1, 12]
    segments = rule.segments(sizes)
    gen = torch.Generator().manual_seed(0)
    state, flat, out = rule.init_state(20), rule.init_state(20), torch.empty(20)
    theta = torch.randn(20, generator=gen)
    for _ in range(3):
        grad = torch.randn(20, generator=gen)
        expected, state = rule(grad, state, segments, params=theta)
        rule.step_(grad.clone(), flat, segments, out, chunk=chunk, sigmoid_tanh=False, params=theta)
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-7)
        theta = theta + out
    torch.testing.assert_close(flat, state.detach(), rtol=1e-5, atol=1e-6)


def test_a_relative_rule_refuses_a_step_without_the_parameters_and_changes_nothing():
    rule = LSTMGACRule(LSTMGACConfig(relative_step=0.01, **RELATIVE), seed=0)
    segments = Segments.single(4)
    state, out = rule.init_state(4), torch.zeros(4)
    with pytest.raises(ValueError, match="relative_step.*params"):
        rule(torch.ones(4), state, segments)
    with pytest.raises(ValueError, match="relative_step.*params"):
        rule.step_(torch.ones(4), state, segments, out)
    with pytest.raises(ValueError, match=r"params must have the gradients' shape \(4,\)"):
        rule.step_(torch.ones(4), state, segments, out, params=torch.ones(3))
    assert not state.any() and not out.any()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"relative_step": 0.0}, "relative_step must be a finite positive number"),
    ({"relative_step": float("inf")}, "relative_step must be a finite positive number"),
    ({"relative_step": True}, "relative_step must be a finite positive number"),
    ({"relative_step": 0.01, "absolute_step": True}, "relative_step needs absolute_step=False"),
])
def test_bad_relative_steps_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LSTMGACConfig(**{**RELATIVE, **kwargs})


def test_ntm_bfgs_refuses_a_relative_controller_by_name():
    controller = LSTMGACConfig(relative_step=0.01, extra_inputs=2, **RELATIVE)
    with pytest.raises(ValueError, match="controller cannot take relative_step"):
        NTMBFGSConfig(controller=controller)


def test_the_config_round_trips_with_its_epsilon():
    cfg = LSTMGACConfig(relative_step=0.01, **RELATIVE)
    assert LSTMGACConfig.from_dict(cfg.to_dict()) == cfg
    assert LSTMGACConfig(**RELATIVE).relative_step is None  # off unless named: older weights step as before


def test_lr_multiplies_the_relative_step():
    """The drop-in optimizer's lr scales the relative step as it scales any learned step (its
    trajectory against the meta-trainer's unroll: tests/test_meta.py)."""
    rule = _trained_looking(LSTMGACRule(LSTMGACConfig(relative_step=0.01, **RELATIVE), seed=5), seed=6)
    task = get_family("quadratic").sample(7)
    start_theta = task.init_params()[0].detach().clone()
    moves = []
    for lr in (1.0, 0.5):
        theta = [start_theta.clone().requires_grad_(True)]
        step = LSTMOptimizer(theta, weights=rule, lr=lr)
        task.loss(theta).backward()
        step.step()
        moves.append(theta[0].detach() - start_theta)
    assert moves[0].abs().min() > 0
    torch.testing.assert_close(moves[1], 0.5 * moves[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_the_drop_in_steps_scale_per_tensor_as_the_rules_flat_step(scope):
    """LSTMOptimizer multiplies each tensor's step by the rule's per-tensor scales (no flat copy
    of θ); over three steps, with one tensor all zeros (RMS 0: only ε_θ moves it), that is the
    differentiable rule's step on the flat θ_t, per tensor or over the group."""
    rule = _trained_looking(LSTMGACRule(LSTMGACConfig(relative_step=0.01, gac_scope=scope, **RELATIVE), seed=8))
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(4, 3, generator=gen) * 5, torch.zeros(3), torch.randn(6, generator=gen) * 0.1]
    opt = LSTMOptimizer(params, weights=rule)
    sizes = [p.numel() for p in params]
    theta, state = torch.cat([p.reshape(-1) for p in params]), rule.init_state(sum(sizes))
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        with torch.no_grad():
            update, state = rule(torch.cat([g.reshape(-1) for g in grads]), state, rule.segments(sizes),
                                 params=theta)
        theta = theta + update
        torch.testing.assert_close(torch.cat([p.reshape(-1) for p in params]), theta, rtol=1e-5, atol=1e-7)
    assert params[1].abs().min() > 0  # the zero tensor moved, by ε_θ's share


def test_the_meta_gradient_reaches_the_step_sizes_through_the_relative_scale():
    """Truncated BPTT through a relative rule: the unroll hands the rule θ_t, and the
    meta-gradient of the step sizes is finite and non-zero."""
    rule = LSTMGACRule(LSTMGACConfig(hidden_size=8, relative_step=0.01, **RELATIVE), seed=0)
    stack = get_family("quadratic").stack([1, 2])
    unroll = Unroll(rule, stack, "first-order")
    estimate = TruncatedBPTT().estimate(rule, unroll, unroll.start(), 8)
    grads = dict(zip([name for name, _ in rule.named_parameters()], estimate.grads))
    bias_grad = grads["momentum_bias"]
    assert torch.isfinite(bias_grad).all() and bias_grad.abs().sum() > 0


def test_per_tensor_scales_on_the_cpu_are_the_float32_values_as_floats():
    """On the CPU the per-tensor factors come back as Python floats equal to the float32 vector's
    values (so the drop-in step is unchanged bit for bit): RMS((3, −4)) + 0.01 by hand, then zeros,
    odd sizes, float64, bfloat16, and a norm whose square overflows float32 (inf)."""
    scales = TensorScales(0.01)
    gen = torch.Generator().manual_seed(0)
    params = [torch.tensor([3.0, -4.0]), torch.zeros(3), torch.randn(7, 13, generator=gen) * 0.037,
              torch.randn(1001, generator=gen).double() * 3.1, torch.randn(5, 3, generator=gen).bfloat16(),
              torch.full((4,), 3e19)]
    floats = scales(params)
    assert all(type(f) is float for f in floats)
    assert floats == scales.vector(params).tolist()
    assert floats[0] == pytest.approx(math.sqrt(12.5) + 0.01, rel=1e-7)
    assert floats[1] == pytest.approx(0.01, rel=1e-7)
    assert floats[3] == pytest.approx(float(params[3].square().mean().sqrt()) + 0.01, rel=1e-6)
    assert math.isinf(floats[5])
    assert scales([]) == []
    group = TensorScales(0.01, per_tensor=False)([torch.tensor([3.0, -4.0]), torch.zeros(3)])
    assert len(group) == 2 and float(group[0]) == pytest.approx(math.sqrt(25 / 5) + 0.01, rel=1e-7)


def test_the_drop_in_relative_step_multiplies_each_tensor_by_its_own_scale():
    """LSTMOptimizer's step on two tensors equals the rule's flat step with per-tensor scopes (the
    flat, differentiable factor of the meta-trainer), within float32 rounding."""
    rule = _trained_looking(LSTMGACRule(LSTMGACConfig(relative_step=0.01, **RELATIVE), seed=2), seed=3)
    gen = torch.Generator().manual_seed(1)
    theta = [torch.nn.Parameter(torch.randn(4, 3, generator=gen) * 0.2), torch.nn.Parameter(torch.randn(5, generator=gen))]
    grads = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    flat = torch.cat([p.detach().reshape(-1) for p in theta])
    expected, _ = rule(torch.cat([g.reshape(-1) for g in grads]), rule.init_state(17),
                       Segments.from_sizes([12, 5]), params=flat)
    opt = LSTMOptimizer(theta, weights=rule)
    for p, g in zip(theta, grads):
        p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in theta]) - flat, expected.detach(),
                               rtol=1e-5, atol=1e-8)
