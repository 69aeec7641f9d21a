"""The Triton step against the eager in-place step (issue 17).

These run where the kernels can: on CUDA, and on CPU tensors in Triton's interpreter, which
must be switched on before Python imports triton (``TRITON_INTERPRET=1``); without either
they skip here, and ``test_fused_interpreted.py`` runs this file again under the interpreter.

Tolerances. In the interpreter ``tl.dot`` is exact float32, so what differs from the eager
step is rounding: tanh as 2σ(2x) − 1 (≤ 2.4e-7 absolute), βᵗ as 2^(t·log₂β) and the order of
the sums (gates, GAC means): updates agree to 2e-6 absolute after several steps, states to
2e-5 (log|m|/p, the log/sign feature of a momentum sum that nearly cancels, m = ∇ + β·m, turns
the one-ulp difference of the two paths' multiply-add into 1e-6 of input and lets it grow).
On a GPU the dots run in ``tf32x3`` (float32-accurate) by default; one test pins plain TF32
(10-bit mantissa products), where the update agrees to 1% of its scale.
"""

from __future__ import annotations

import pytest
import torch

from learned_optim import NTMBFGS, LSTMOptimizer
from learned_optim.kernels import fused_unavailable
from learned_optim.rules import load_rule
from learned_optim.rules.lstm_gac import LSTMGACConfig, LSTMGACRule, widened_inputs

DEVICES = [d for d in ("cpu", "cuda") if (d == "cpu" or torch.cuda.is_available())
           and fused_unavailable(torch.device(d)) is None]
pytestmark = pytest.mark.skipif(not DEVICES, reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 (and triton)")

ATOL = 2e-6  # updates
STATE_ATOL = 2e-5


def _rules() -> dict[str, LSTMGACRule]:
    rules = {name: load_rule(name)[0] for name in ("suite-time", "suite", "mnist", "mnist-paper")}
    rules["group-scope-no-gac"] = LSTMGACRule(LSTMGACConfig(gac_scope="group", gac_cells=0), seed=3)
    rules["extra-inputs"] = LSTMGACRule(LSTMGACConfig(momentum_decays=(0.5, 0.9), momentum_rms_decay=0.999,
                                                      extra_inputs=2), seed=1)
    no_absolute = LSTMGACRule(LSTMGACConfig(momentum_decays=(0.5, 0.9, 0.99), momentum_rms_decay=0.999,
                                            input_features="normalized", bias_correction=True,
                                            absolute_step=False, step_timescales=(2.0, 30.0)), seed=2)
    with torch.no_grad():  # every term of the output in use (and the time features' input rows)
        gen = torch.Generator().manual_seed(5)
        for p in no_absolute.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    rules["no-absolute-step-time-features"] = no_absolute
    clipped = LSTMGACRule(LSTMGACConfig(**{**no_absolute.config.to_dict(), "direction_clip": 0.3}))
    clipped.load_state_dict(no_absolute.state_dict())  # clamps that bite: the random gradients make |d_j| > 0.3
    rules["direction-clip"] = clipped
    decayed = LSTMGACRule(LSTMGACConfig(**{**no_absolute.config.to_dict(), "step_decay_after": 1.0}))
    decayed.load_state_dict(no_absolute.state_dict())  # √(1/t) from the second step on
    rules["step-decay"] = decayed
    agreeing_config = LSTMGACConfig(**{**no_absolute.config.to_dict(), "momentum_agreement": True})
    agreeing = LSTMGACRule(agreeing_config)
    agreeing.load_state_dict(widened_inputs(no_absolute.state_dict(), no_absolute.config, agreeing_config))
    with torch.no_grad():  # the new input row in use
        row = agreeing_config.input_names().index("agreement[0.9]")
        agreeing.core.weights[0][row] = torch.randn(agreeing.core.weights[0].shape[1], generator=gen) * 0.5
    rules["momentum-agreement"] = agreeing
    return rules


RULES = _rules()


def _step_both(rule: LSTMGACRule, sizes: list[int], device: str, steps: int, chunk: int,
               block: int | None = None, state_dtype: torch.dtype = torch.float32, precision: str | None = None):
    """Run the eager and the fused in-place step side by side from the same state and gradients."""
    from learned_optim.kernels.lstm_gac import fused_step_

    rule = rule.to(device)
    gen = torch.Generator().manual_seed(0)
    num = sum(sizes)
    layout = rule.segments(sizes, device)
    apart = state_dtype != torch.float32 and rule.config.bias_correction
    rows = rule.config.state_rows - int(apart)
    eager = torch.zeros(rows, num, dtype=state_dtype, device=device)
    fused = eager.clone()
    counts = [torch.zeros(num, device=device) if apart else None for _ in range(2)]
    out_eager, out_fused = torch.empty(num, device=device), torch.empty(num, device=device)
    for _ in range(steps):
        scales = torch.rand(num, generator=gen) * 0.1
        grad = (torch.randn(num, generator=gen) * scales).to(device)
        extra = torch.randn(rule.config.extra_inputs, num, generator=gen).to(device) if rule.config.extra_inputs \
            else None
        rule.step_(grad, eager, layout, out_eager, extra, chunk=chunk, count=counts[0])
        lstm, momentum, _, v, t = rule._state_views(fused, counts[1])
        fused_step_(rule, grad, lstm, momentum, v, t, layout, out_fused, extra, block=block, precision=precision)
    return eager, fused, out_eager, out_fused


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize(("sizes", "chunk", "block"), [
    ([300, 7, 1, 500], 37, None),  # tensors smaller and larger than a block; an eager chunk across them
    ([5, 0, 40], 16384, 16),  # an empty tensor between two; the smallest block
    ([1000], 256, 64),
])
def test_fused_step_matches_eager(device, name, sizes, chunk, block):
    eager, fused, out_eager, out_fused = _step_both(RULES[name], sizes, device, steps=3, chunk=chunk, block=block)
    torch.testing.assert_close(fused, eager, atol=STATE_ATOL, rtol=1e-5)
    torch.testing.assert_close(out_fused, out_eager, atol=ATOL, rtol=1e-5)
    assert out_eager.abs().max() > 1e-4  # a real step, not two zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["suite", "no-absolute-step-time-features"])
def test_fused_step_in_bfloat16_state(device, name):
    """bfloat16 state: the same step; both paths read what the state holds (rounded), so they
    differ where a float32 result one ulp apart rounds to neighbouring bfloat16 values."""
    eager, fused, out_eager, out_fused = _step_both(RULES[name], [300, 7, 500], device, steps=1, chunk=64,
                                                    state_dtype=torch.bfloat16)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), eager.float(), atol=2 ** -7, rtol=2 ** -7)  # at most a rounding flip
    torch.testing.assert_close(out_fused, out_eager, atol=1e-3 * out_eager.abs().max().item(), rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a GPU precision")
def test_fused_step_in_tf32_on_gpu():
    _, _, out_eager, out_fused = _step_both(RULES["suite"], [4096, 1000], "cuda", steps=3, chunk=1024,
                                            precision="tf32")
    torch.testing.assert_close(out_fused, out_eager, atol=1e-2 * out_eager.abs().max().item(), rtol=0)


def _train(optimizer_class, device: str, steps: int = 6, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).to(device)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    x, y = torch.randn(32, 6, device=device), torch.randn(32, 1, device=device)
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("device", DEVICES)
def test_a_parameter_relative_rule_steps_alike_fused_and_eager(device):
    """relative_step: the kernels' output times RMS(θ) + ε_θ per tensor, as the eager step's."""
    relative = LSTMGACRule(LSTMGACConfig(**{**RULES["no-absolute-step-time-features"].config.to_dict(),
                                            "relative_step": 0.01}))
    relative.load_state_dict(RULES["no-absolute-step-time-features"].state_dict())
    fused, _ = _train(LSTMOptimizer, device, fused=True, weights=relative)
    eager, _ = _train(LSTMOptimizer, device, fused=False, weights=relative)
    for a, b in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_rule_reading_its_scale_growth_steps_alike_fused_and_eager(device):
    """scale_growth: g_t enters the kernels as the input row before the extra rows, and the factor
    s_t·exp((α − 1)·g_t) multiplies their output, as in the eager step (row and head in use)."""
    base = RULES["no-absolute-step-time-features"]
    config = LSTMGACConfig(**{**base.config.to_dict(), "relative_step": 0.01, "scale_growth": True})
    growing = LSTMGACRule(config)
    growing.load_state_dict(widened_inputs(base.state_dict(), base.config, config))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(8)
        growing.core.weights[0][config.input_names().index("log(scale/scale0)")] = \
            torch.randn(growing.core.weights[0].shape[1], generator=gen)
        growing.growth_weight.copy_(torch.randn(config.hidden_size, 1, generator=gen) * 0.5)
        growing.growth_bias.fill_(-0.5)
    fused, _ = _train(LSTMOptimizer, device, fused=True, weights=growing)
    eager, _ = _train(LSTMOptimizer, device, fused=False, weights=growing)
    for a, b in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("optimizer_class", "kwargs"), [
    (LSTMOptimizer, {}),
    (LSTMOptimizer, {"state_dtype": torch.bfloat16}),
    (NTMBFGS, {}),
    (NTMBFGS, {"state_dtype": torch.bfloat16}),
])
def test_optimizers_fused_against_eager(device, optimizer_class, kwargs):
    fused, fused_opt = _train(optimizer_class, device, fused=True, **kwargs)
    eager, _ = _train(optimizer_class, device, fused=False, **kwargs)
    bf16 = kwargs.get("state_dtype") == torch.bfloat16
    for a, b in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, atol=5e-4 if bf16 else 1e-5, rtol=0)
    assert fused_opt.param_groups[0]["fused"] is True
    if bf16:
        state = fused_opt.state[next(fused.parameters())]
        assert state["rule_state"].dtype == torch.bfloat16
        if optimizer_class is LSTMOptimizer:  # the suite weights' bias correction: t per parameter
            assert float(state["step"]) == 6
