"""benchmarks/relative_scale.py: the frozen-scale ablation and the spike count it reports."""

from __future__ import annotations

import torch
from benchmark_scripts import load_script

from learned_optim import LSTMOptimizer

relative_scale = load_script("relative_scale")


def test_spikes_count_losses_over_ten_times_the_lowest_before_them():
    losses = torch.tensor([10.0, 5.0, 60.0, 4.0, 41.0, 39.0])  # 60 > 10·5 and 41 > 10·4; 39 is not
    assert relative_scale.spikes(losses) == 2


def _step(theta: torch.Tensor, opt: LSTMOptimizer) -> torch.Tensor:
    before = theta.detach().clone()
    opt.zero_grad()
    theta.sum().backward()  # ∇ = 1 everywhere: the same gradient at every step
    opt.step()
    return theta.detach() - before


def test_frozen_scales_keep_theta_zeros_rms_while_the_shipped_step_follows_theta():
    steps, scaled = {}, {}
    for frozen in (False, True):
        theta = torch.nn.Parameter(torch.linspace(-1.0, 2.0, 12).reshape(4, 3))
        opt = LSTMOptimizer([theta])
        if frozen:
            relative_scale.freeze_scales(opt)
        _step(theta, opt)
        with torch.no_grad():
            theta.mul_(8.0)  # the same gradients follow, so the LSTM's output is the same in both runs
        scaled[frozen] = theta.detach().clone()
        steps[frozen] = _step(theta, opt)
    eps = opt.rule.config.relative_step

    def rms(t: torch.Tensor) -> float:
        return float(t.square().mean().sqrt())

    start = torch.linspace(-1.0, 2.0, 12).reshape(4, 3)
    torch.testing.assert_close(scaled[False], scaled[True])
    # shipped: × (RMS(θ) + ε) of the θ it steps from; frozen: × (RMS(θ₀) + ε) for good
    torch.testing.assert_close(steps[False], steps[True] * (rms(scaled[True]) + eps) / (rms(start) + eps),
                               rtol=1e-5, atol=1e-7)


def test_hand_step_is_adam_with_lr_c_times_the_tensors_rms():
    # At step 1 with bias correction m̂ = ∇ and v̂ = ∇², so d = ∇/(|∇| + ε) ≈ sign ∇: the hand step
    # is −C·(RMS(θ₀) + ε_θ)·sign ∇, whatever the LSTM outputs.
    start = torch.linspace(-1.0, 2.0, 12).reshape(4, 3)
    theta = torch.nn.Parameter(start.clone())
    opt = LSTMOptimizer([theta])
    relative_scale.hand_step(opt, 0.5)
    opt.zero_grad()
    (theta * torch.linspace(-3.0, 3.0, 12).reshape(4, 3)).sum().backward()
    sign = theta.grad.sign()
    opt.step()
    factor = float(start.square().mean().sqrt()) + opt.rule.config.relative_step
    torch.testing.assert_close(theta.detach() - start, -0.5 * factor * sign, rtol=1e-4, atol=1e-6)


def test_floored_scales_follow_theta_up_but_not_down():
    """After the first step θ is scaled by 8, then by 1/64 (to 1/8 of θ₀): the floored factor is the
    shipped one going up, and θ₀'s going down."""
    eps = LSTMOptimizer([torch.nn.Parameter(torch.ones(1))]).rule.config.relative_step
    start = torch.linspace(-1.0, 2.0, 12).reshape(4, 3)
    for factor in (8.0, 1 / 8):
        steps = {}
        for floored in (False, True):
            theta = torch.nn.Parameter(start.clone())
            opt = relative_scale.optimizer_for([theta], "suite-relative-offset", relative_scale.MODES[2 if floored else 0])
            _step(theta, opt)
            with torch.no_grad():
                theta.copy_(start * factor)
            steps[floored] = _step(theta, opt)
        rms_now = float((start * factor).square().mean().sqrt())
        rms_start = float(start.square().mean().sqrt())
        expected = steps[False] * (max(rms_now, rms_start) + eps) / (rms_now + eps)
        torch.testing.assert_close(steps[True], expected, rtol=1e-5, atol=1e-7)


def test_floored_modes_set_the_floor_and_the_discount_as_named():
    theta = torch.nn.Parameter(torch.ones(3))
    floored, discounted = (relative_scale.optimizer_for([theta], "suite-relative-offset", mode).rule.config
                           for mode in relative_scale.MODES[2:])
    assert floored.relative_floor and not floored.shrink_discount
    assert discounted.relative_floor and discounted.shrink_discount


def test_dead_zone_holds_the_factor_until_theta_passes_k_times_its_start():
    """k = 2, θ scaled by 1.5 (in the zone: the factor stays s_0), then by 2 more (past it: s_t − s_0),
    against the frozen factor s_0 on the same gradients (the LSTM's output does not read θ)."""
    start = torch.linspace(-1.0, 2.0, 12).reshape(4, 3)
    steps, before = {}, {}
    for mode in ("frozen", "dead zone"):
        theta = torch.nn.Parameter(start.clone())
        opt = LSTMOptimizer([theta])
        (relative_scale.freeze_scales if mode == "frozen" else lambda o: relative_scale.dead_zone_scales(o, 2.0))(opt)
        _step(theta, opt)
        for multiple in (1.5, 2.0):
            with torch.no_grad():
                theta.mul_(multiple)
            before[mode, multiple] = theta.detach().clone()
            steps[mode, multiple] = _step(theta, opt)
    eps = opt.rule.config.relative_step

    def s(t: torch.Tensor) -> float:
        return float(t.square().mean().sqrt()) + eps

    s_0 = s(start)
    assert s(before["dead zone", 1.5]) < 2 * s_0 < s(before["dead zone", 2.0])  # one step in the zone, one past it
    for multiple in (1.5, 2.0):
        factor = max(s_0, s(before["dead zone", multiple]) - s_0)
        torch.testing.assert_close(steps["dead zone", multiple], steps["frozen", multiple] * factor / s_0,
                                   rtol=1e-5, atol=1e-7)
