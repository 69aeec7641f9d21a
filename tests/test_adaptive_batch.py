"""AdaptiveBatchSGD: hand-worked checks of the functional core, units, the batch-size
conversion, B* on a noisy quadratic with known g and σ, and the AdaptiveBatchSampler."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learned_optim import AdaptiveBatchSampler, AdaptiveBatchSGD
from learned_optim.optim import adaptive_batch_sgd
from learned_optim.optim.adaptive_batch import coordinate_batch_size
from learned_optim.tasks import get_family

F64 = torch.float64


def core(params, grads, g_avg, s_avg, step, **overrides):
    kwargs = dict(lr=0.5, batch_size=2, lambda_b=16.0, eps=1e-300, warmup_steps=3,
                  min_horizon=2.0, max_horizon=40.0, horizon_factor=1.0, step_gain=1.0)
    kwargs.update(overrides)
    adaptive_batch_sgd(params, grads, g_avg, s_avg, step, **kwargs)


# --------------------------------------------------------------------------- functional core


def test_warmup_moves_nothing_and_averages_are_exact_means():
    p = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    g_avg, s_avg = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    grads = [torch.tensor(v, dtype=F64) for v in ([1.0, 2.0, -3.0], [3.0, 0.0, 1.0], [2.0, 4.0, 5.0])]
    for t, g in enumerate(grads, start=1):
        core([p], [g], [g_avg], [s_avg], t)
    assert torch.equal(p, torch.tensor([1.0, -2.0, 3.0], dtype=F64))
    stacked = torch.stack(grads)
    torch.testing.assert_close(g_avg, stacked.mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(s_avg, stacked.square().mean(0), rtol=0, atol=1e-15)


# Averages chosen so that, at B = 2, λ_B = 16:
#   coord 0: g̃ = 1,   s̃ = 1.5 → B·(s̃ − g̃²) = 1, B* = 16
#   coord 1: g̃ = 2,   s̃ = 4   → no variance,     B* = 0
#   coord 2: g̃ = 0.5, s̃ = 0.5 → 2·0.25 = 0.5,   B* = 32
#   coord 3: g̃ = −1,  s̃ = 5   → 2·4 = 8,        B* = 128
G_AVG = [1.0, 2.0, 0.5, -1.0]
S_AVG = [1.5, 4.0, 0.5, 5.0]
B_STAR = [16.0, 0.0, 32.0, 128.0]
G0, S0 = torch.tensor(G_AVG, dtype=F64), torch.tensor(S_AVG, dtype=F64)


def test_coordinate_batch_size_is_per_example():
    g_avg, s_avg = torch.tensor(G_AVG, dtype=F64), torch.tensor(S_AVG, dtype=F64)
    b_star = coordinate_batch_size(g_avg, s_avg, 2, 16.0, 1e-300)
    torch.testing.assert_close(b_star, torch.tensor(B_STAR, dtype=F64))


@pytest.mark.parametrize(
    "step_gain, eta_over_lr",
    [
        (1.0, [2 / 16, 1.0, 2 / 32, 2 / 128]),  # the notes: η*·min(1, B/B*)
        (32.0, [1.0, 1.0, 1.0, 64 / 128]),  # the default κ = 2λ_B: η*·min(1, 32B/B*)
    ],
)
def test_step_uses_previous_averages_and_never_exceeds_lr(step_gain, eta_over_lr):
    lr, step = 0.5, 100
    p0 = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)
    g = torch.tensor([3.0, -1.0, 2.0, 4.0], dtype=F64)
    p, g_avg, s_avg = p0.clone(), torch.tensor(G_AVG, dtype=F64), torch.tensor(S_AVG, dtype=F64)
    core([p], [g], [g_avg], [s_avg], step, lr=lr, step_gain=step_gain)
    eta = lr * torch.tensor(eta_over_lr, dtype=F64)
    torch.testing.assert_close(p, p0 - eta * g, rtol=0, atol=1e-15)
    # Horizons B*/B = 8, 0, 16, 64 clamped to [2, 40] → 8, 2, 16, 40.
    w = torch.tensor([1 / 8, 1 / 2, 1 / 16, 1 / 40], dtype=F64)
    torch.testing.assert_close(g_avg, G0 * (1 - w) + w * g, rtol=0, atol=1e-15)
    torch.testing.assert_close(s_avg, S0 * (1 - w) + w * g * g, rtol=0, atol=1e-15)


def test_horizon_factor_and_early_steps_clamp_the_horizon():
    g = torch.tensor([3.0, -1.0, 2.0, 4.0], dtype=F64)
    # horizon_factor 4: 4·B*/B = 32, 0, 64, 256 → [2, 40] → 32, 2, 40, 40; at step 20 the
    # notes' 1/min(t, N) bias correction caps it at 20.
    for step, horizons in ((100, [32, 2, 40, 40]), (20, [20, 2, 20, 20])):
        p = torch.zeros(4, dtype=F64)
        g_avg, s_avg = torch.tensor(G_AVG, dtype=F64), torch.tensor(S_AVG, dtype=F64)
        core([p], [g], [g_avg], [s_avg], step, horizon_factor=4.0)
        w = 1 / torch.tensor(horizons, dtype=F64)
        torch.testing.assert_close(g_avg, G0 * (1 - w) + w * g, rtol=0, atol=1e-15)


def test_class_matches_the_core_with_default_step_gain():
    """Two warm-up steps, then the step from their exact means with κ = 2λ_B = 32."""
    p = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = AdaptiveBatchSGD([p], lr=0.1, batch_size=4, warmup_steps=2)
    g1 = torch.tensor([1.0, 1.0, 4.0], dtype=F64)
    g2 = torch.tensor([1.0, -1.0, 0.0], dtype=F64)
    g3 = torch.tensor([2.0, 5.0, 1.0], dtype=F64)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, dtype=F64))
    # means: g̃ = [1, 0, 2], s̃ = [1, 1, 8] → σ̃² = 4·[0, 1, 4] → B* = 16·σ̃²/g̃² = [0, ∞, 64]
    torch.testing.assert_close(opt.coordinate_batch_sizes()[p][[0, 2]], torch.tensor([0.0, 64.0], dtype=F64))
    p.grad = g3.clone()
    opt.step()
    eta = 0.1 * torch.tensor([1.0, 0.0, 1.0], dtype=F64)  # min(1, 32·4/B*) = 1, ≈0 (g̃ = 0), 1
    torch.testing.assert_close(p.detach(), -eta * g3, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- units and B changes


def _noisy_quadratic_run(seed, batch_size, steps, lr=0.0, noise_seed=7, **kwargs):
    """Train on a noisy quadratic (gradient written directly); per step of the second half the
    ratios B*_estimate/16σ²/g² and suggested/(16Σσ²/Σg²) at the current θ."""
    task = get_family("noisy-quadratic", batch_size=batch_size).sample(seed)
    h, c, sigma = task.info["h"], task.info["c"], task.info["sigma"]
    theta = task.init_params()[0]
    opt = AdaptiveBatchSGD([theta], lr=lr, batch_size=batch_size, **kwargs)
    gen = torch.Generator().manual_seed(noise_seed)
    coord, overall = [], []
    for t in range(steps):
        with torch.no_grad():
            xi = torch.randn(batch_size, theta.numel(), generator=gen)
            theta.grad = h * (theta - c) + sigma * xi.mean(0)
        opt.step()
        if t >= steps // 2:
            g2 = (h * (theta.detach() - c)).square()
            coord.append(opt.coordinate_batch_sizes()[theta] / (16 * sigma.square() / g2))
            overall.append(opt.suggested_batch_size() / float(16 * sigma.square().sum() / g2.sum()))
    return torch.stack(coord).median(0).values, torch.tensor(overall).median()


def test_b_star_does_not_depend_on_the_batch_size_it_was_measured_at():
    # Same per-example noise measured with batches of 4 and of 32 (θ fixed: lr = 0): the
    # settled per-coordinate B* agree. Dropping the factor B in σ̃² = B·(s̃ − g̃²) would make
    # them differ by 8×.
    at_4, _ = _noisy_quadratic_run(seed=5, batch_size=4, steps=3000)
    at_32, _ = _noisy_quadratic_run(seed=5, batch_size=32, steps=3000)
    ratio = at_32 / at_4
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio


def test_b_star_settles_within_25_percent_of_16_sigma2_over_g2():
    """B* "settles": the median, over the second half of a 4000-step run, of B*_estimate[i]
    divided by the true 16σ²[i]/g[i]² at the current θ is within 25% of 1 for every
    coordinate. η* = 1e-3, so θ (and the true B*, here 1 to 700) drifts during the run;
    single-step estimates scatter about ±50% around the truth."""
    settled, overall = _noisy_quadratic_run(seed=5, batch_size=8, steps=4000, lr=1e-3)
    assert ((settled > 0.75) & (settled < 1.25)).all(), settled
    # suggested_batch_size() against λ_B·Σσ²/Σg², same run, median over the second half: 15%.
    assert 0.85 < overall < 1.15, overall


def test_set_batch_size_converts_the_averages_so_sigma2_is_kept():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(5, dtype=F64))
    opt = AdaptiveBatchSGD([p], lr=0.0, batch_size=4, warmup_steps=3)
    for _ in range(6):
        p.grad = 1.0 + torch.randn(5, dtype=F64)
        opt.step()
    state = opt.state[p]
    g_avg, s_avg = state["grad_average"].clone(), state["square_average"].clone()
    before = opt.coordinate_batch_sizes()[p].clone()
    snapshot = copy.deepcopy(opt.state_dict())
    opt.set_batch_size(16)
    assert opt.batch_size == 16 and state["batch_size"] == 16
    torch.testing.assert_close(state["grad_average"], g_avg)
    torch.testing.assert_close(16 * (state["square_average"] - g_avg**2), 4 * (s_avg - g_avg**2))
    torch.testing.assert_close(opt.coordinate_batch_sizes()[p], before)
    # A batch size written into param_groups directly is converted the same way at the next step.
    twin_p = nn.Parameter(torch.zeros(5, dtype=F64))
    twin = AdaptiveBatchSGD([twin_p], lr=0.0, batch_size=4, warmup_steps=3)
    twin.load_state_dict(snapshot)  # still at B = 4
    assert twin.state[twin_p]["batch_size"] == 4
    twin.param_groups[0]["batch_size"] = 16
    g = torch.ones(5, dtype=F64)
    p.grad, twin_p.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    torch.testing.assert_close(twin.state[twin_p]["square_average"], opt.state[p]["square_average"])
    assert twin.state[twin_p]["batch_size"] == 16


def test_suggested_batch_size_is_none_until_the_warmup_is_done():
    p = nn.Parameter(torch.zeros(2))
    opt = AdaptiveBatchSGD([p], batch_size=2, warmup_steps=3)
    assert opt.suggested_batch_size() is None
    for k in range(3):
        p.grad = torch.tensor([1.0, float(k)])
        opt.step()
    assert opt.suggested_batch_size() is not None


# --------------------------------------------------------------------------- sampler


class StubOptimizer:
    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.suggestion: float | None = None
        self.calls: list[int] = []

    def suggested_batch_size(self):
        return self.suggestion

    def set_batch_size(self, b: int) -> None:
        self.calls.append(b)
        self.batch_size = b


def _next_sizes(sampler, n):
    it = iter(sampler)
    return [len(next(it)) for _ in range(n)]


def test_sampler_clamps_to_bounds_and_moves_only_outside_the_band():
    opt = StubOptimizer(16)
    sampler = AdaptiveBatchSampler(range(10_000), opt, min_batch_size=8, max_batch_size=64, hysteresis=0.5)
    opt.suggestion = 20.0  # inside [16/1.5, 16·1.5]: no change
    assert _next_sizes(sampler, 2) == [16, 16] and opt.calls == []
    opt.suggestion = 30.0  # outside: follow it
    assert _next_sizes(sampler, 2) == [30, 30] and opt.calls == [30]
    opt.suggestion = 1e9  # clamped to max_batch_size
    assert _next_sizes(sampler, 1) == [64] and opt.calls[-1] == 64
    opt.suggestion = 0.5  # clamped to min_batch_size
    assert _next_sizes(sampler, 1) == [8] and opt.calls[-1] == 8
    opt.suggestion = 11.0  # inside [8/1.5, 8·1.5]: no change
    calls = len(opt.calls)
    assert _next_sizes(sampler, 3) == [8, 8, 8] and len(opt.calls) == calls
    opt.suggestion = float("nan")  # no estimate: keep B
    assert _next_sizes(sampler, 1) == [8]


def test_sampler_starts_inside_its_bounds():
    opt = StubOptimizer(2)
    sampler = AdaptiveBatchSampler(range(100), opt, min_batch_size=4, max_batch_size=8)
    assert sampler.batch_size == 4 and opt.calls == [4]


def test_sampler_drives_a_dataloader_and_the_optimizer_follows():
    torch.manual_seed(0)
    n = 203
    x = torch.randn(n, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 3.0 * torch.randn(n)
    data = TensorDataset(torch.arange(n), x, y)
    model = nn.Linear(3, 1)
    opt = AdaptiveBatchSGD(model.parameters(), lr=0.05, batch_size=4, warmup_steps=5)
    sampler = AdaptiveBatchSampler(data, opt, min_batch_size=4, max_batch_size=40,
                                   generator=torch.Generator().manual_seed(0))
    loader = DataLoader(data, batch_sampler=sampler)
    for _epoch in range(3):
        seen = []
        for idx, xb, yb in loader:
            assert len(idx) == opt.batch_size  # the optimizer knows the B of every batch
            seen.append(idx)
            opt.zero_grad()
            (model(xb).squeeze(1) - yb).square().mean().backward()
            opt.step()
        ids = torch.cat(seen)
        assert torch.equal(ids.sort().values, torch.arange(n))  # each example once per epoch
        sizes = sampler.history[-len(seen):]
        assert sizes[-1] == n - sum(sizes[:-1]) and sum(sizes) == n  # the last, short batch
    assert max(sampler.history) > 4  # the noisy regression made it grow
    assert max(sampler.history) <= 40


def test_sampler_drop_last_drops_the_short_batch():
    opt = StubOptimizer(8)
    gen = torch.Generator().manual_seed(1)
    sampler = AdaptiveBatchSampler(range(20), opt, drop_last=True, generator=gen)
    batches = list(sampler)
    assert [len(b) for b in batches] == [8, 8] and opt.calls == []


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lambda_b": 0.0}, "lambda_b"),
        ({"eps": -1e-8}, "eps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"min_horizon": 0.0}, "min_horizon"),
        ({"max_horizon": float("inf")}, "max_horizon"),
        ({"min_horizon": 50.0, "max_horizon": 20.0}, "min_horizon"),
        ({"horizon_factor": 0.0}, "horizon_factor"),
        ({"step_gain": 0.0}, "step_gain"),
        ({"step_gain": -2.0}, "step_gain"),
    ],
)
def test_bad_optimizer_arguments_raise_naming_them(kwargs, name):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        AdaptiveBatchSGD([nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_set_batch_size_raises():
    opt = AdaptiveBatchSGD([nn.Parameter(torch.zeros(2))], batch_size=4)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            opt.set_batch_size(bad)
    assert opt.batch_size == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"min_batch_size": 0}, "min_batch_size"),
        ({"min_batch_size": 10, "max_batch_size": 5}, "min_batch_size"),
        ({"hysteresis": -0.1}, "hysteresis"),
    ],
)
def test_bad_sampler_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveBatchSampler(range(10), StubOptimizer(4), **kwargs)


def test_sampler_refuses_an_optimizer_without_a_suggestion():
    with pytest.raises(TypeError, match="suggested_batch_size"):
        AdaptiveBatchSampler(range(10), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
