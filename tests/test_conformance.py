"""The conformance suite: every registered optimizer must behave like a torch.optim optimizer.

Parameterized over ``learned_optim.available()``, so an optimizer that registers itself joins
automatically. Construction uses the registry's ``example_kwargs``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import learned_optim
from learned_optim.tasks import get_family

NAMES = learned_optim.available()
STEPS = 12  # past any warm-up of the example settings, so every test sees real updates


def make(name: str, params, **overrides) -> torch.optim.Optimizer:
    kwargs = dict(learned_optim.info(name).example_kwargs)
    kwargs.update(overrides)
    return learned_optim.create(name, params, **kwargs)


def small_model(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch(step: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g, dtype=dtype)
    teacher = torch.linspace(-1, 1, 12, dtype=dtype).reshape(4, 3)
    return x, torch.sin(x @ teacher) + 0.1 * torch.randn(16, 3, generator=g, dtype=dtype)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step, next(model.parameters()).dtype)
    return (model(x) - y).square().mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for t in steps:
        opt.zero_grad()
        loss = loss_of(model, t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


def state_snapshot(opt: torch.optim.Optimizer):
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a, b) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        sa, sb = a["state"][pid], b["state"][pid]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), (pid, k)
            else:
                assert sa[k] == sb[k], (pid, k)


@pytest.fixture(params=NAMES)
def name(request) -> str:
    return request.param


def test_registry_lists_the_package_optimizers():
    assert {"conjugate-momentum-sgd", "conjugate-adam", "adaptive-batch-sgd"} <= set(NAMES)
    for n in NAMES:
        assert issubclass(learned_optim.info(n).cls, torch.optim.Optimizer)
    with pytest.raises(KeyError, match="available: .*conjugate-adam"):
        learned_optim.create("no-such-optimizer", [torch.zeros(1, requires_grad=True)])


def test_state_dict_round_trip_continues_identically(name):
    reference = small_model()
    ref_opt = make(name, reference.parameters())
    train(reference, ref_opt, range(2 * STEPS))

    interrupted = small_model()
    opt = make(name, interrupted.parameters())
    train(interrupted, opt, range(STEPS))
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = small_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    new_opt = make(name, resumed.parameters(), lr=123.0)  # hyperparameters come from the file
    new_opt.load_state_dict(saved["optim"])
    train(resumed, new_opt, range(STEPS, 2 * STEPS))

    assert_params_equal(params_of(resumed), params_of(reference))
    assert_same_state(new_opt.state_dict(), ref_opt.state_dict())


def test_deepcopy_gives_an_independent_identical_optimizer(name):
    model = small_model()
    opt = make(name, model.parameters())
    train(model, opt, range(STEPS))
    model2, opt2 = copy.deepcopy((model, opt))
    assert all(p2 is q for p2, q in zip(opt2.param_groups[0]["params"], model2.parameters()))
    train(model, opt, range(STEPS, STEPS + 5))
    train(model2, opt2, range(STEPS, STEPS + 5))
    assert_params_equal(params_of(model), params_of(model2))


def test_step_with_closure_matches_manual_step_and_returns_loss(name):
    manual = small_model()
    opt_manual = make(name, manual.parameters())
    train(manual, opt_manual, range(STEPS))

    model = small_model()
    opt = make(name, model.parameters())
    made = []
    for t in range(STEPS):

        def closure(t=t):
            opt.zero_grad()
            loss = loss_of(model, t)  # the closure runs with grad enabled even under no_grad
            loss.backward()
            made.append(loss)
            return loss

        with torch.no_grad():
            returned = opt.step(closure)
        assert returned is made[-1]
    assert len(made) == STEPS
    assert_params_equal(params_of(model), params_of(manual))


def test_param_groups_keep_their_own_hyperparameters(name):
    lr = learned_optim.info(name).example_kwargs["lr"]
    model = small_model()
    first, second = model[0], model[2]
    opt = make(name, [{"params": first.parameters()}, {"params": second.parameters(), "lr": lr * 3}])
    assert opt.param_groups[1]["lr"] == lr * 3 and opt.param_groups[0]["lr"] == lr

    twin = small_model()
    opt_a = make(name, twin[0].parameters())
    opt_b = make(name, twin[2].parameters(), lr=lr * 3)
    for t in range(STEPS):
        for o in (opt, opt_a, opt_b):
            o.zero_grad()
        loss_of(model, t).backward()
        loss_of(twin, t).backward()
        opt.step()
        opt_a.step()
        opt_b.step()
    assert_params_equal(params_of(model), params_of(twin))


def test_add_param_group_fills_defaults_and_steps_it(name):
    model = small_model()
    opt = make(name, model[0].parameters())
    train(model, opt, range(3))
    before = params_of(model)[2:]
    opt.add_param_group({"params": list(model[2].parameters())})
    assert set(opt.param_groups[1]) >= set(opt.defaults)
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    twin_opt = make(name, twin[2].parameters())
    for t in range(3, 3 + STEPS):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            loss_of(m, t).backward()
            for p in m[0].parameters():  # train only the new group, so the twins see equal grads
                p.grad = None
            o.step()
    after = params_of(model)[2:]
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert_params_equal(after, params_of(twin)[2:])


def test_params_without_grad_are_left_alone(name):
    model = small_model()
    frozen = model[2].weight
    opt = make(name, model.parameters())
    before = frozen.detach().clone()
    for t in range(STEPS):
        opt.zero_grad()
        loss_of(model, t).backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before)
    assert frozen not in opt.state or not opt.state[frozen]


def test_zero_size_and_zero_dim_params(name):
    empty = nn.Parameter(torch.zeros(0, 3))
    scalar = nn.Parameter(torch.tensor(2.0))
    opt = make(name, [empty, scalar])
    for _ in range(STEPS):
        opt.zero_grad()
        (scalar.square() + empty.sum()).backward()
        opt.step()
    assert empty.shape == (0, 3) and scalar.shape == ()
    assert torch.isfinite(scalar) and scalar.item() < 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_are_kept_and_loss_falls(name, dtype):
    model = small_model(dtype)
    opt = make(name, model.parameters())
    losses = train(model, opt, range(STEPS + 20))
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(v.dtype in (dtype, torch.float32) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.ndim)
    final = loss_of(model, 0).item()
    assert final < losses[0], (losses[0], final)


def test_bfloat16_state_survives_a_round_trip_in_float32(name):
    model = small_model(torch.bfloat16)
    opt = make(name, model.parameters())
    train(model, opt, range(STEPS))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    new_opt = make(name, model.parameters())
    new_opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state(new_opt.state_dict(), opt.state_dict())


def test_non_contiguous_params_match_contiguous(name):
    torch.manual_seed(0)
    base = torch.randn(3, 5, dtype=torch.float64)
    strided = nn.Parameter(base.clone().t())  # 5×3, not contiguous
    dense = nn.Parameter(base.clone().t().contiguous())
    assert not strided.is_contiguous()
    opt_s, opt_d = make(name, [strided]), make(name, [dense])
    target = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(5, 3)
    for _ in range(STEPS):
        for p, o in ((strided, opt_s), (dense, opt_d)):
            o.zero_grad()
            (p - target).pow(4).sum().backward()
            o.step()
    assert torch.equal(strided.detach(), dense.detach())
    assert not torch.equal(strided.detach(), base.t())


def test_step_under_no_grad(name):
    a, b = small_model(), small_model()
    opt_a, opt_b = make(name, a.parameters()), make(name, b.parameters())
    for t in range(STEPS):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            loss_of(m, t).backward()
        opt_a.step()
        with torch.no_grad():
            opt_b.step()
    assert_params_equal(params_of(a), params_of(b))


def test_grad_scaler_skips_steps_with_inf_grads_and_takes_the_others(name):
    model = small_model(torch.float32)
    twin = small_model(torch.float32)
    opt, twin_opt = make(name, model.parameters()), make(name, twin.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(STEPS):  # finite steps through the scaler equal plain steps (power-of-2 scale)
        opt.zero_grad()
        scaler.scale(loss_of(model, t)).backward()
        scaler.step(opt)
        scaler.update()
    train(twin, twin_opt, range(STEPS))
    assert_params_equal(params_of(model), params_of(twin))

    before_params, before_state = params_of(model), state_snapshot(opt)
    scale = scaler.get_scale()
    opt.zero_grad()
    scaler.scale(loss_of(model, STEPS)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    assert_params_equal(params_of(model), before_params)
    assert_same_state(state_snapshot(opt), before_state)


def _bad_step(name, corrupt):
    model = small_model()
    opt = make(name, model.named_parameters())
    train(model, opt, range(STEPS))
    before_params, before_state = params_of(model), state_snapshot(opt)
    opt.zero_grad()
    loss_of(model, STEPS).backward()
    corrupt(model)
    return model, opt, before_params, before_state


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_grads_are_refused_naming_the_param_and_nothing_changes(name, bad):
    def corrupt(model):
        model[2].bias.grad[1] = bad  # the last parameter: earlier ones must not be touched either

    model, opt, before_params, before_state = _bad_step(name, corrupt)
    with pytest.raises(ValueError, match=r"'2\.bias'.*NaN or inf"):
        opt.step()
    assert_params_equal(params_of(model), before_params)
    assert_same_state(state_snapshot(opt), before_state)


def test_sparse_grads_are_refused_naming_the_param(name):
    def corrupt(model):
        model[2].weight.grad = model[2].weight.grad.to_sparse()

    model, opt, before_params, before_state = _bad_step(name, corrupt)
    with pytest.raises(ValueError, match=r"sparse.*'2\.weight'"):
        opt.step()
    assert_params_equal(params_of(model), before_params)
    assert_same_state(state_snapshot(opt), before_state)


def test_complex_params_are_refused_naming_the_param(name):
    real = nn.Parameter(torch.randn(3))
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = make(name, [("real", real), ("z", z)])
    before = real.detach().clone()
    (real.sum() + z.abs().sum()).backward()
    with pytest.raises(ValueError, match=r"complex.*'z'"):
        opt.step()
    assert torch.equal(real.detach(), before) and not opt.state


def test_bad_hyperparameters_are_refused_by_name(name):
    with pytest.raises(ValueError, match="lr"):
        make(name, [nn.Parameter(torch.zeros(2))], lr=-1.0)
    if learned_optim.info(name).uses_batch_size:
        with pytest.raises(ValueError, match="batch_size"):
            make(name, [nn.Parameter(torch.zeros(2))], batch_size=0)
        p = nn.Parameter(torch.ones(2))
        opt = make(name, [p])
        opt.param_groups[0]["batch_size"] = 2.5
        p.grad = torch.ones(2)
        with pytest.raises(ValueError, match="batch_size"):
            opt.step()
        assert torch.equal(p.detach(), torch.ones(2)) and not opt.state


LR_GRID = [10.0**k for k in range(-5, 2)] + [3 * 10.0**k for k in range(-5, 1)]


def _best_final_loss(name, family, steps, **kwargs):
    task = family.sample(0)
    initial = task.loss(task.initial_params, task.sample_batch(task.batch_generator(1))).item()
    best = math.inf
    for lr in LR_GRID:
        params = task.init_params()
        opt = make(name, params, lr=lr, **kwargs)
        gen = task.batch_generator()
        losses = []
        try:
            for _ in range(steps):
                opt.zero_grad()
                loss = task.loss(params, task.sample_batch(gen))
                loss.backward()
                opt.step()
                losses.append(loss.item())
        except ValueError as error:  # diverged: the optimizer refuses the non-finite gradient
            assert "NaN or inf" in str(error)
            continue
        final = sum(losses[-10:]) / 10
        if math.isfinite(final):
            best = min(best, final)
    return initial, best


def test_lowers_the_loss_on_rosenbrock(name):
    initial, best = _best_final_loss(name, get_family("rosenbrock"), 400)
    assert best < 0.1 * initial, (initial, best)


def test_lowers_the_loss_on_a_small_mlp(name):
    kwargs = {"batch_size": 32} if learned_optim.info(name).uses_batch_size else {}
    family = get_family("mlp", batch_size=32)
    initial, best = _best_final_loss(name, family, 150, **kwargs)
    assert best < 0.8 * initial, (initial, best)
