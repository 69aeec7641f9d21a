"""NTM-BFGS, the rule and the drop-in optimizer: with hand-set head outputs the rule is
textbook BFGS (dense memory) and L-BFGS (limited memory) to 1e-6; the learned heads start as
BFGS; memories are per group (param group, or task), and the optimizer keeps them in its state."""

from __future__ import annotations

import io

import pytest
import torch
from bfgs_reference import two_loop
from torch import nn

import learned_optim
from learned_optim import NTMBFGS, NTMBFGSConfig, NTMBFGSRule
from learned_optim.meta import MetaTrainConfig, MetaTrainer, TruncatedBPTT, Unroll
from learned_optim.rules import BFGSHeads, DenseMemory, LimitedMemory, LSTMGACConfig, MemoryGroups
from learned_optim.tasks import TaskStack, get_family
from learned_optim.tasks.base import Task

F64 = torch.float64
EXACT = dict(curvature_eps=0.0, backtrack=False)  # the textbook algorithms have neither safeguard


def _quadratic(n: int, seed: int, condition: float = 20.0):
    """f(θ) = ½θᵀAθ − bᵀθ, A SPD of the given condition number; returns A, b, θ₀."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    a = q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=F64)) @ q.T
    return a, torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def _textbook_bfgs(a, b, theta, steps: int, gamma: float) -> list[torch.Tensor]:
    """BFGS with unit steps and H₀ = γ·I, product form H⁺ = (I − ρsyᵀ)H(I − ρysᵀ) + ρssᵀ."""
    n = theta.numel()
    eye, h, out = torch.eye(n, dtype=F64), torch.eye(n, dtype=F64) * gamma, []
    grad = a @ theta - b
    for _ in range(steps):
        step = -h @ grad
        theta = theta + step
        new_grad = a @ theta - b
        y = new_grad - grad
        rho = 1 / (y @ step)
        h = (eye - rho * torch.outer(step, y)) @ h @ (eye - rho * torch.outer(y, step)) + rho * torch.outer(step, step)
        grad = new_grad
        out.append(theta)
    return out


def _run_rule(rule, a, b, theta, steps: int, sizes=None) -> list[torch.Tensor]:
    """Iterates θ_{t+1} = θ_t + g_t of the rule on the quadratic, coordinates split into ``sizes`` tensors."""
    layout = rule.segments(sizes or [theta.numel()])
    state = rule.init_state(theta.numel(), segments=layout)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            update, state = rule(a @ theta - b, state, layout)
            theta = theta + update
            out.append(theta)
    return out


def test_dense_rule_with_bfgs_heads_reproduces_textbook_bfgs():
    a, b, theta = _quadratic(8, seed=0)
    rule = NTMBFGSRule(NTMBFGSConfig(memory="dense", initial_scale=0.3, **EXACT), heads=BFGSHeads()).double()
    got = _run_rule(rule, a, b, theta, 20, sizes=[3, 5])
    want = _textbook_bfgs(a, b, theta, 20, 0.3)
    for t, (x, y) in enumerate(zip(got, want)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=f"step {t}")
    assert (a @ got[-1] - b).norm() < 1e-6 * (a @ theta - b).norm()  # and BFGS converged


class LBFGSHeads(BFGSHeads):
    """Head outputs of L-BFGS with m pairs: the heads keep the last m (s, y) and each step write
    BFGS's 3 pairs for each of them, rebuilt from γ·I, filling all K = 3m slots (zero pairs pad
    the first steps), so the memory holds exactly L-BFGS's H."""

    def __init__(self, history: int, gamma: float) -> None:
        super().__init__()
        self.history, self.gamma = history, gamma
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def writes(self, ctx, key, pre_read):
        if ctx.prev_step.abs().sum() > 0:
            self.pairs = (self.pairs + [(ctx.prev_step, key - ctx.prev_key)])[-self.history:]
        scratch_memory = LimitedMemory(3 * self.history, self.gamma)
        scratch = scratch_memory.init_state(key.numel(), key.dtype)
        for s, y in self.pairs:
            hy = scratch_memory.read(scratch, y.unsqueeze(0))[0]
            rho = 1 / (y @ s)
            c = rho + rho * rho * (y @ hy)
            scratch = scratch_memory.write(scratch, torch.stack((c * s, -rho * s, -rho * hy)), torch.stack((s, hy, s)))
        return scratch[0], scratch[1]


def test_limited_rule_with_lbfgs_heads_reproduces_lbfgs_with_the_same_history():
    n, history, gamma = 12, 3, 0.4
    a, b, theta = _quadratic(n, seed=1, condition=10.0)
    config = NTMBFGSConfig(memory="limited", memory_capacity=3 * history, initial_scale=gamma, **EXACT)
    rule = NTMBFGSRule(config, heads=LBFGSHeads(history, gamma)).double()
    got = _run_rule(rule, a, b, theta, 40)
    x, pairs, grad = theta, [], a @ theta - b
    for t in range(40):  # L-BFGS, unit steps, two-loop recursion over the last m pairs
        step = -two_loop(grad, pairs, gamma)
        x = x + step
        new_grad = a @ x - b
        pairs = (pairs + [(step, new_grad - grad)])[-history:]
        grad = new_grad
        torch.testing.assert_close(got[t], x, rtol=1e-6, atol=1e-6, msg=f"step {t}")
    assert grad.norm() < 1e-6 * (a @ theta - b).norm()  # and L-BFGS converged


def test_learned_heads_start_as_bfgs():
    """With the controller's own step zeroed, the untrained learned rule is exactly BFGS."""
    a, b, theta = _quadratic(6, seed=2)
    rule = NTMBFGSRule(NTMBFGSConfig(memory="dense", initial_scale=0.5, **EXACT), seed=3).double()
    with torch.no_grad():
        rule.controller.output_weight.zero_()
        rule.controller.output_bias.zero_()
    got = _run_rule(rule, a, b, theta, 10)
    for x, y in zip(got, _textbook_bfgs(a, b, theta, 10, 0.5)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_bfgs_write_bases_use_bfgs_own_vectors_whatever_the_learned_ones_are():
    """With bfgs_write_bases the rule ignores P, Q, α: with perturbed learned bases and the
    controller's step zeroed it is still exactly textbook BFGS; without the option the same
    perturbation moves it off BFGS."""
    a, b, theta = _quadratic(6, seed=2)
    runs = {}
    for fixed in (True, False):
        rule = NTMBFGSRule(NTMBFGSConfig(memory="dense", initial_scale=0.5, bfgs_write_bases=fixed, **EXACT),
                           seed=3).double()
        with torch.no_grad():
            rule.controller.output_weight.zero_()
            rule.controller.output_bias.zero_()
            for name in ("left_basis", "right_basis", "write_coefficients"):
                getattr(rule.heads, name).add_(0.01 * torch.randn(3, 2, generator=torch.Generator().manual_seed(7),
                                                                 dtype=F64))
        runs[fixed] = _run_rule(rule, a, b, theta, 10)
    textbook = _textbook_bfgs(a, b, theta, 10, 0.5)
    for x, y in zip(runs[True], textbook):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(runs[False][-1]).all() and (runs[False][-1] - textbook[-1]).abs().max() > 1e-4


def test_bfgs_write_bases_receive_no_meta_gradient_and_the_modulations_do():
    rule = NTMBFGSRule(NTMBFGSConfig(bfgs_write_bases=True), seed=0)
    unroll = Unroll(rule, get_family("quadratic").stack(list(range(8))))
    result = TruncatedBPTT("log").estimate(rule, unroll, unroll.start(), 10)
    grads = dict(zip([n for n, _ in rule.named_parameters()], result.grads))
    for name in ("heads.left_basis", "heads.right_basis", "heads.write_coefficients"):
        assert grads[name] is None or not grads[name].any(), name
    assert grads["heads.readout.weight"] is not None and grads["heads.readout.weight"].abs().sum() > 0


def test_backtracking_steps_halfway_back_after_a_step_that_raised_the_loss():
    """f = ½‖θ‖² (∇ = θ) from θ₀ = 1 with γ = 3: the first step −3·∇ lands at −2, f rises from
    ½ to 2, so the next step is −s/2 = +1.5 (to −0.5), not BFGS's; without the safeguard it is BFGS's."""
    heads = BFGSHeads()
    for backtrack, want in ((True, -0.5), (False, 0.0)):
        rule = NTMBFGSRule(NTMBFGSConfig(memory="dense", initial_scale=3.0, curvature_eps=0.0, backtrack=backtrack),
                           heads=heads).double()
        eye = torch.eye(1, dtype=F64)
        got = _run_rule(rule, eye, torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64), 2)
        assert got[0].item() == pytest.approx(-2.0)
        assert got[1].item() == pytest.approx(want, abs=1e-12)  # BFGS: H = 1/A after one secant write


@pytest.mark.parametrize("in_place", [False, True])
def test_reset_on_backtrack_starts_the_memory_again_where_the_backtrack_fires(in_place):
    """The backtracking case by hand (f = ½θ², θ₀ = 1, γ = 3): step 2 writes the pair s = y = −3, so
    BFGS's M is 1/A = 1, and steps back +1.5. With ``reset_on_backtrack`` the same step is taken, but
    M is M₀ = 3 again after it and the carried read i₂ is M₀'s, 3·∇₂ = −6 (without it, M·∇₂ = −2).
    Forward and the drop-in's step_ agree."""
    for reset, memory_after, read_after in ((False, 1.0, -2.0), (True, 3.0, -6.0)):
        rule = NTMBFGSRule(NTMBFGSConfig(memory="dense", initial_scale=3.0, curvature_eps=0.0,
                                         reset_on_backtrack=reset), heads=BFGSHeads()).double()
        layout = rule.segments([1])
        coords, memory = rule.init_state(1, segments=layout)
        theta, updates = torch.ones(1, dtype=F64), []
        for _ in range(2):
            with torch.no_grad():
                if in_place:
                    update = torch.empty(1, dtype=F64)
                    memory = rule.step_(theta.clone(), (coords, memory), layout, update)
                else:
                    update, (coords, memory) = rule(theta.clone(), (coords, memory), layout)
            theta = theta + update
            updates.append(update.item())
        assert updates == pytest.approx([-3.0, 1.5], abs=1e-12)
        torch.testing.assert_close(memory, torch.full((1, 1, 1), memory_after, dtype=F64))
        torch.testing.assert_close(coords[-1], torch.full((1,), read_after, dtype=F64))


def test_curvature_condition_skips_writes_that_would_break_positive_definiteness():
    """On f = −½θ² (yᵀs < 0) BFGS's write would flip M's sign; the rule writes nothing."""
    rule = NTMBFGSRule(NTMBFGSConfig(memory="dense", initial_scale=0.1, backtrack=False), heads=BFGSHeads()).double()
    layout = rule.segments([1])
    state = rule.init_state(1, segments=layout)
    theta = torch.ones(1, dtype=F64)
    for _ in range(3):
        update, state = rule(-theta, state, layout)
        theta = theta + update
    torch.testing.assert_close(state[1], torch.full((1, 1, 1), 0.1, dtype=F64))


def _limited_bfgs_run(reset_indefinite: bool) -> tuple[int, float, torch.Tensor]:
    """BFGS's writes in a limited memory of K = 3 pairs (one step's: each write drops the last)
    on a 2-D quadratic of condition 100, no backtracking: how many steps went uphill (∇ᵀg > 0;
    the step is −M·∇), and the gap f − f* at the start and after each of 30 steps."""
    a, b, theta = _quadratic(2, seed=2, condition=100.0)
    config = NTMBFGSConfig(memory="limited", memory_capacity=3, initial_scale=0.05, curvature_eps=0.0,
                           backtrack=False, reset_indefinite=reset_indefinite)
    rule = NTMBFGSRule(config, heads=BFGSHeads()).double()
    layout = rule.segments([2])
    state = rule.init_state(2, segments=layout)
    optimum = torch.linalg.solve(a, b)

    def gap(x):
        return float(0.5 * (x - optimum) @ a @ (x - optimum))

    uphill, start, gaps = 0, gap(theta), []
    with torch.no_grad():
        for _ in range(30):
            grad = a @ theta - b
            update, state = rule(grad, state, layout)
            uphill += int(grad @ update > 0)
            theta = theta + update
            gaps.append(gap(theta))
    return uphill, start, torch.tensor(gaps)


def test_a_limited_memory_made_indefinite_by_forgetting_is_reset_not_followed_uphill():
    """The limited form forgets its oldest write pairs, but BFGS's later pairs hold M·y of the
    earlier ones (H⁺ = H + c·s·sᵀ − ρ·s·(Hy)ᵀ − ρ·(Hy)·sᵀ), so what is left is no BFGS matrix and
    can be indefinite: without the reset, the memory's step −M·∇ goes uphill and the run ends
    far above where it started. With it (the default), M starts again from M₀ wherever
    yᵀMy < 0 or ∇ᵀM∇ < 0, and the run converges."""
    uphill, start, gaps = _limited_bfgs_run(reset_indefinite=False)
    assert uphill > 0 and gaps[-1] > start  # the failure (the behaviour before the reset)
    uphill, start, gaps = _limited_bfgs_run(reset_indefinite=True)
    assert uphill == 0 and torch.isfinite(gaps).all() and gaps[-1] < 0.01 * start


def test_default_weights_do_not_blow_up_rosenbrock():
    """Issue 15: with the shipped weights (limited memory), these Rosenbrock draws went to
    losses of 1e19–1e25 and a non-finite gradient within 60 steps (the limited memory turned
    indefinite, see above); now every loss is finite and the last below the first."""
    for seed in (3, 7, 9):
        task = get_family("rosenbrock").sample(seed)
        params = task.init_params()
        opt = NTMBFGS(params)
        losses = []
        for _ in range(60):
            opt.zero_grad()
            loss = task.loss(params)
            losses.append(loss.item())
            assert torch.isfinite(loss), (seed, losses[::10])
            loss.backward()
            opt.step()
        assert losses[-1] < losses[0], (seed, losses[::10])


def test_memory_groups_keep_tasks_apart_with_padding():
    """Tasks of different sizes in one generic stack (padded per-task memories) follow exactly
    the trajectories each has alone."""
    def task(n, seed):
        a, b, theta = _quadratic(n, seed)
        return Task([theta], lambda p, batch=None, a=a, b=b: 0.5 * p[0] @ a @ p[0] - b @ p[0])

    tasks = [task(3, 0), task(5, 1), task(4, 2)]
    rule = NTMBFGSRule(NTMBFGSConfig(memory="dense"), seed=1).double()
    together = Unroll(rule, TaskStack.of(tasks))
    assert together.segments.groups.count == 3 and together.segments.groups.width == 5
    losses, _ = together.run(together.start(), 8, track=False)
    for k, t in enumerate(tasks):
        alone = Unroll(rule, TaskStack.of([t]))
        single, _ = alone.run(alone.start(), 8, track=False)
        torch.testing.assert_close(losses[:, k], single[:, 0], rtol=1e-10, atol=1e-12)


def test_memory_groups_gather_scatter_round_trip_and_group_sums():
    ids = torch.tensor([1, 0, 1, 2, 1, 0])
    groups = MemoryGroups(ids, 3, 6)
    x = torch.arange(12.0).view(2, 6)
    laid_out = groups.gather(x)
    assert laid_out.shape == (3, 2, 3)
    torch.testing.assert_close(laid_out[0, 0], torch.tensor([1.0, 5.0, 0.0]))  # group 0, zero-padded
    torch.testing.assert_close(groups.scatter(laid_out), x)
    torch.testing.assert_close(groups.dot(x[0], x[0])[3], torch.tensor(9.0))  # group 2 holds only x[3] = 3
    torch.testing.assert_close(groups.mean(x)[0, 1], torch.tensor(3.0))  # (1 + 5) / 2
    assert groups.any(torch.tensor([False, False, False, True, False, False])).tolist() == [False, False, True]
    assert groups.expand(torch.tensor([10, 20, 30])).tolist() == [20, 10, 20, 30, 20, 10]


def test_memory_reset_restores_m0_in_the_flagged_groups_only():
    """reset(state, where), reset_ (in place) and write(..., reset=where): M₀ (then the new pairs)
    in the flagged groups, the other groups untouched."""
    where, pair = torch.tensor([True, False]), torch.ones(2, 1, 3, dtype=F64)  # 2 groups, one write pair each
    other = torch.arange(6, dtype=F64).view(2, 1, 3)
    keys = torch.randn(2, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    for memory in (DenseMemory(0.5), LimitedMemory(2, 0.5)):
        state = memory.write(memory.init_state(3, F64, groups=2), pair, pair)
        reset = memory.reset(state, where)
        fresh = memory.write(memory.init_state(3, F64, groups=2), other, other)
        written = memory.write(state, other, other, reset=where)
        torch.testing.assert_close(memory.read(reset, keys)[0], 0.5 * keys[0])  # M₀ = γ·I
        torch.testing.assert_close(memory.read(written, keys)[0], memory.read(fresh, keys)[0])
        torch.testing.assert_close(memory.read(reset, keys)[1], memory.read(state, keys)[1], rtol=0, atol=0)
        unflagged = memory.read(memory.write(state, other, other), keys)[1]
        torch.testing.assert_close(memory.read(written, keys)[1], unflagged, rtol=0, atol=0)
        in_place = state.clone()
        assert memory.reset_(in_place, where) is in_place and torch.equal(in_place, reset)  # reset_ is reset, in place


def test_memory_form_is_chosen_by_size_and_can_be_overridden():
    small, large = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(1100))
    for params, form, shape in (([small], None, (1, 10, 10)), ([large], None, (1, 2, 30, 1100)),
                                ([small], "limited", (1, 2, 30, 10))):
        opt = NTMBFGS(params, weights=None, memory=form)
        params[0].grad = torch.ones_like(params[0])
        opt.step()
        assert tuple(opt.state[params[0]]["memory"].shape) == shape
    with pytest.raises(ValueError, match="memory must be one of"):
        NTMBFGS([small], weights=None, memory="sparse")
    with pytest.raises(ValueError, match="memory_capacity"):
        NTMBFGS([small], weights=None, memory_capacity=0)


def test_dropin_optimizer_follows_the_rule_and_keeps_one_memory_per_group():
    a, b, theta = _quadratic(6, seed=4)
    a, b = a.float(), b.float()
    rule = NTMBFGSRule(NTMBFGSConfig(memory="dense", **EXACT), heads=BFGSHeads())
    first, second = nn.Parameter(theta[:2].float().clone()), nn.Parameter(theta[2:].float().clone())
    opt = NTMBFGS([first, second], weights=rule)
    for _ in range(8):
        opt.zero_grad()
        x = torch.cat((first, second))
        (0.5 * x @ a @ x - b @ x).backward()
        opt.step()
    want = _textbook_bfgs(a.double(), b.double(), theta, 8, rule.config.initial_scale)[-1]
    torch.testing.assert_close(torch.cat((first, second)).detach().double(), want, rtol=1e-4, atol=1e-5)
    assert set(opt.state[first]) == {"rule_state", "memory", "memory_params"}
    assert set(opt.state[second]) == {"rule_state"}
    assert opt.state[first]["memory_params"] == [0, 1]
    # Only the second param has a gradient now: the memory covers it alone, from M₀ again.
    opt.zero_grad()
    (second.square().sum()).backward()
    opt.step()
    assert "memory" not in opt.state[first] and opt.state[second]["memory_params"] == [1]
    assert opt.state[second]["memory"].shape == (1, 4, 4)


def test_state_dict_with_another_memory_form_is_refused_by_the_step():
    p = nn.Parameter(torch.ones(5))
    opt = NTMBFGS([p], weights=None, memory="dense")
    p.grad = torch.ones(5)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other = NTMBFGS([p], weights=None, memory="limited")
    other.load_state_dict(torch.load(buffer, weights_only=True))
    before = p.detach().clone()
    with pytest.raises(ValueError, match="limited memory state"):
        other.step()
    assert torch.equal(p.detach(), before)


def test_params_of_a_group_on_two_devices_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ValueError, match="one device"):
        NTMBFGS([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, device="cuda"))], weights=None)


@pytest.mark.parametrize("trust_ratio", [None, 0.5])
def test_meta_gradient_is_finite_and_reaches_the_heads_and_the_controller(trust_ratio):
    """Also with a trust region that fires at every step (τ = 0.5: the untrained memory's BFGS steps
    are longer than the controller's), whose reset must then stay differentiable (not in place): the
    writes then never reach a step, but the read multiplier (on M₀'s read) and the controller do."""
    rule = NTMBFGSRule(NTMBFGSConfig(trust_ratio=trust_ratio), seed=0)
    unroll = Unroll(rule, get_family("quadratic").stack(list(range(8))))
    result = TruncatedBPTT("log").estimate(rule, unroll, unroll.start(), 10)
    grads = dict(zip([n for n, _ in rule.named_parameters()], result.grads))
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    written = ("heads.write_coefficients",) if trust_ratio is None else ()
    for name in ("heads.readout.weight", *written, "controller.output_weight"):
        assert grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name


def test_a_short_meta_training_improves_the_validation_score(tmp_path):
    config = MetaTrainConfig(rule="ntm-bfgs", rule_config={"controller": {"hidden_size": 8}}, task="quadratic",
                             horizon=40, truncation=20, tasks_per_step=16, episodes=30, validate_every=10,
                             validation_tasks=16, meta_lr=1e-3, loss_transform="log", device="cpu",
                             select_by="median_final_loss")
    trainer = MetaTrainer(config, tmp_path, progress=False, log=None)
    summary = trainer.train()
    assert summary["skipped_truncations"] == 0
    first = summary["best_validation"]
    import json
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    initial = next(r for r in records if r["kind"] == "validation")
    assert first["median_final_loss"] < 0.5 * initial["median_final_loss"], (initial, first)


def test_config_round_trips_and_bad_configs_are_refused_by_name():
    config = NTMBFGSConfig(memory="limited", memory_capacity=12, write_heads=4, reset_indefinite=False,
                           trust_ratio=100, bfgs_write_bases=True)
    assert NTMBFGSConfig.from_dict(config.to_dict()) == config and config.trust_ratio == 100.0
    old = {k: v for k, v in NTMBFGSConfig().to_dict().items() if k != "reset_indefinite"}  # saved before the key
    assert NTMBFGSConfig.from_dict(old).reset_indefinite and NTMBFGSConfig.from_dict(old).trust_ratio is None
    for bad, match in (({"write_heads": 0}, "write_heads"), ({"memory": "huge"}, "memory must be"),
                       ({"initial_scale": -1.0}, "initial_scale"), ({"memory_capacity": 2}, "memory_capacity"),
                       ({"controller": {"extra_inputs": 0}}, "extra_inputs"), ({"heads": 3}, "unknown"),
                       ({"trust_ratio": 0}, "trust_ratio"), ({"trust_ratio": float("inf")}, "trust_ratio"),
                       ({"trust_ratio": True}, "trust_ratio"), ({"bfgs_write_bases": "yes"}, "bfgs_write_bases"),
                       ({"backtrack": 1}, "backtrack must be True or False"),
                       ({"reset_on_backtrack": "yes"}, "reset_on_backtrack must be True or False")):
        with pytest.raises(ValueError, match=match):
            NTMBFGSConfig.from_dict(bad)


def test_registered_and_exported():
    assert learned_optim.info("ntm-bfgs").cls is NTMBFGS
    with pytest.raises(TypeError, match="needs an NTMBFGSRule"):
        NTMBFGS([nn.Parameter(torch.ones(2))], weights=learned_optim.LSTMGACRule())


@pytest.mark.parametrize("memory", ["dense", "limited"])
def test_indefinite_memories_are_reset_per_group_and_in_place_as_in_forward(memory):
    """Learned heads whose first write is negated (−3·c·s·sᵀ instead of c·s·sᵀ) make M indefinite
    on a convex group (its reads point uphill), while a concave group never writes (yᵀs < 0):
    only the convex group's memory is reset (its updates change), the concave group's updates
    are exactly those without the reset, and step_ agrees with forward throughout."""
    from learned_optim.rules.segments import Segments

    rule = NTMBFGSRule(NTMBFGSConfig(memory=memory, memory_capacity=6), seed=3).double()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64))
        rule.heads.write_coefficients[0].mul_(-3.0)
    without = rule.with_memory()
    without.config = NTMBFGSConfig.from_dict({**rule.config.to_dict(), "reset_indefinite": False})
    sizes = [50, 7, 130]  # two memory groups: the first two tensors (concave), the third (convex)
    layout = rule.segments_from(Segments.from_sizes(sizes), Segments.from_sizes([57, 130]))
    curvature = torch.cat((torch.full((57,), -1.0, dtype=F64), torch.linspace(0.5, 2.0, 130, dtype=F64)))
    start = torch.randn(187, generator=gen, dtype=F64)
    runs = {}
    for name, r in (("reset", rule), ("without", without)):
        state, theta, updates, uphill = r.init_state(187, segments=layout), start.clone(), [], 0
        in_place = tuple(x.clone() for x in state)
        for _ in range(8):
            grad = curvature * theta
            with torch.no_grad():
                update, state = r(grad, state, layout)
            if r is rule:
                out = torch.full_like(grad, float("nan"))
                memory_in_place = r.step_(grad, in_place, layout, out, chunk=64)
                in_place = (in_place[0], memory_in_place)
                torch.testing.assert_close(out, update, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(in_place[1], state[1], rtol=1e-10, atol=1e-12)
            uphill += int(grad[57:] @ state[0][-1, 57:] < 0)  # the convex group's read i_t = M_{t+1}·∇_t
            assert grad[:57] @ state[0][-1, :57] >= 0  # the concave group's: M stays M₀
            theta = theta + update
            updates.append(update)
        runs[name] = (torch.stack(updates), uphill)
    (reset, _), (plain, plain_uphill) = runs["reset"], runs["without"]
    assert plain_uphill > 0
    torch.testing.assert_close(reset[:, :57], plain[:, :57], rtol=0, atol=0)
    assert not torch.allclose(reset[:, 57:], plain[:, 57:])


@pytest.mark.parametrize("memory", ["dense", "limited"])
@pytest.mark.parametrize("chunk", [3, 64, 4096])
def test_in_place_step_is_the_differentiable_step(memory, chunk):
    """step_ (controller in place, chunk by chunk) against forward, float64, learned heads
    with perturbed weights, over three tensors: same update, state and memory for 4 steps."""
    rule = NTMBFGSRule(NTMBFGSConfig(memory=memory), seed=3).double()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64))
    sizes = [50, 7, 130]
    layout = rule.segments(sizes)
    coords, memory_state = rule.init_state(sum(sizes), segments=layout)
    in_place = coords.clone()
    memory_in_place = memory_state.clone()
    for _ in range(4):
        grad = torch.randn(sum(sizes), generator=gen, dtype=F64)
        with torch.no_grad():
            update, (coords, memory_state) = rule(grad, (coords, memory_state), layout)
        out = torch.full_like(grad, float("nan"))
        memory_in_place = rule.step_(grad, (in_place, memory_in_place), layout, out, chunk=chunk)
        torch.testing.assert_close(out, update, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(in_place, coords, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(memory_in_place, memory_state, rtol=1e-10, atol=1e-12)


def test_curvature_eps_overrides_the_weights_skip_rule_in_the_optimizer():
    from learned_optim import NTMBFGS

    base = NTMBFGS([torch.nn.Parameter(torch.zeros(2))])
    strict = NTMBFGS([torch.nn.Parameter(torch.zeros(2))], curvature_eps=0.5)
    assert strict.rule.config.curvature_eps == 0.5 and base.rule.config.curvature_eps != 0.5  # the weights' own
    assert not hasattr(strict.rule.heads, "curvature_eps")  # one copy: the heads read ε from the config each step
    a = torch.tensor([[3.0, 1.0], [1.0, 0.5]])  # a 2-D quadratic: cos(y, s) = sᵀAs/(‖As‖‖s‖) varies, < 1
    runs = []
    for eps in (0.0, 0.999):
        x = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = NTMBFGS([x], weights=None, curvature_eps=eps, seed=0)
        for _ in range(4):
            x.grad = (a @ x).detach()
            opt.step()
        runs.append(x.detach().clone())
    assert not torch.allclose(runs[0], runs[1])  # eps 0.999 skips the pairs that eps 0 writes
    with pytest.raises(ValueError, match="curvature_eps"):
        NTMBFGS([torch.nn.Parameter(torch.zeros(2))], curvature_eps=-1.0)


def test_controller_step_decay_scales_the_whole_ntm_step():
    """A controller with step_decay_after t₀ = 2 (and no backtracking, whose half step back is
    the last step's): the first two steps are exactly the undecayed rule's; the third, from the
    same state, is √(2/3) times its whole step (the controller's and the memory's), in forward
    and in step_ with the step counts in the state and held apart."""
    controller = dict(momentum_decays=(0.5, 0.9), momentum_rms_decay=0.999, input_features="normalized",
                      bias_correction=True, extra_inputs=2)
    plain = NTMBFGSRule(NTMBFGSConfig(controller=LSTMGACConfig(**controller), memory="dense", backtrack=False),
                        seed=3).double()
    decayed = NTMBFGSRule(NTMBFGSConfig(controller=LSTMGACConfig(step_decay_after=2, **controller), memory="dense",
                                        backtrack=False), seed=3).double()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64))
    decayed.load_state_dict(plain.state_dict())
    layout = plain.segments([20, 9])
    state = plain.init_state(29, segments=layout)
    in_place = tuple(s.clone() for s in state)
    rows = decayed.config.controller.state_rows
    apart = (in_place[0][:rows - 1].clone(), in_place[1].clone())
    carried, count = in_place[0][rows:].clone(), in_place[0][rows - 1].clone()
    for t in range(1, 4):
        grad = torch.randn(29, generator=gen, dtype=F64)
        with torch.no_grad():
            expected, next_state = plain(grad, state, layout)
            update, _ = decayed(grad, state, layout)
        factor = min(1.0, (2 / t) ** 0.5)
        torch.testing.assert_close(update, expected * factor, rtol=1e-12, atol=1e-15)
        assert factor == 1.0 or not torch.allclose(update, expected)
        out, out_apart = torch.empty_like(grad), torch.empty_like(grad)
        memory = decayed.step_(grad, in_place, layout, out)
        in_place = (in_place[0], memory)
        memory_apart = decayed.step_(grad, apart, layout, out_apart, carried=carried, count=count)
        apart = (apart[0], memory_apart)
        torch.testing.assert_close(out, update, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out_apart, update, rtol=1e-10, atol=1e-12)
        state = next_state  # both rules from the plain trajectory: the decay is the only difference
        if t < 3:
            in_place = tuple(s.clone() for s in state)
            apart = (state[0][:rows - 1].clone(), state[1].clone())
            carried, count = state[0][rows:].clone(), state[0][rows - 1].clone()


def _memory_holding(rule: NTMBFGSRule, grad: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """A limited memory whose newest pair (a, b) = (read, ∇/‖∇‖²) reads M·∇ = ``read`` (γ = 0)."""
    memory = rule.init_state(grad.numel())[1]
    memory[0, 0, -1], memory[0, 1, -1] = read, grad / (grad @ grad)  # group 0: (2, K, n)
    return memory


@pytest.mark.parametrize("in_place", [False, True])
def test_trust_ratio_resets_a_memory_whose_step_outgrows_the_controllers(in_place):
    """Hand-set memory with one pair reading M·∇ = v, at the first step (s = 0: nothing is written;
    vᵀ∇ > 0: no indefinite reset) with the heads at their start (memory step −v): the update is
    u − v, u the controller's step. With τ·‖u‖ < ‖v‖ the memory is reset to M₀ = 0: the update is
    exactly u, the memory empty, the carried read 0. With τ·‖u‖ > ‖v‖ everything is exactly as
    without the option. Forward and the drop-in's step_ agree."""
    gen = torch.Generator().manual_seed(4)
    base = dict(memory="limited", memory_capacity=6, initial_scale=0.0, backtrack=False)
    grad = torch.randn(10, generator=gen, dtype=F64)
    rules = {tau: NTMBFGSRule(NTMBFGSConfig(**base, trust_ratio=tau), seed=2).double() for tau in (None, 1.0, 1e6)}
    layout = rules[None].segments([10])

    def step(rule, memory):
        coords = rule.init_state(10, segments=layout)[0]
        if not in_place:
            with torch.no_grad():
                update, (coords, memory) = rule(grad, (coords, memory), layout)
            return update, coords, memory
        out = torch.empty_like(grad)
        memory = rule.step_(grad, (coords, memory.clone()), layout, out)
        return out, coords, memory

    u = step(rules[None], rules[None].init_state(10, segments=layout)[1])[0]  # M = M₀ = 0: the controller's step alone
    v = 50 * u.norm() * (grad + 0.1 * torch.randn(10, generator=gen, dtype=F64)) / grad.norm()
    assert v @ grad > 0 and v.norm() > 40 * u.norm()
    plain = step(rules[None], _memory_holding(rules[None], grad, v))
    torch.testing.assert_close(plain[0], u - v, rtol=1e-12, atol=1e-12)  # the hand-worked update
    torch.testing.assert_close(plain[1][-1], v, rtol=1e-12, atol=1e-12)  # carried read i_t = M·∇
    update, coords, memory = step(rules[1.0], _memory_holding(rules[1.0], grad, v))  # ‖v‖ > 1·‖u‖
    assert torch.equal(update, u) and not memory.any() and not coords[-1].any()
    wide = step(rules[1e6], _memory_holding(rules[1e6], grad, v))  # ‖v‖ < 10⁶·‖u‖: no change at all
    for mine, theirs in zip(wide, plain):
        assert torch.equal(mine, theirs)


def test_trust_ratio_stops_a_gradient_spike_after_tiny_curvature_from_blowing_up_the_step():
    """How the shipped lstm-controller weights blew up late on converged MNIST MLPs: curvature
    10⁶ times smaller than usual (a flat quadratic here) makes BFGS's M ~ 10⁶·I; the first
    gradient of ordinary size is then multiplied by it. Without the trust region the step
    that follows is over 10⁴ long; with the default weights (τ = 1000) it stays below 10."""
    from dataclasses import replace

    from learned_optim.rules import load_rule

    without = load_rule("ntm-bfgs-lstm-controller")[0]  # the same tensors, no trust region
    without.config = replace(without.config, trust_ratio=None)
    steps = {}
    for name, rule in (("without", without), ("default", None)):
        x = torch.nn.Parameter(torch.randn(200, generator=torch.Generator().manual_seed(0)))
        opt = NTMBFGS([x]) if rule is None else NTMBFGS([x], weights=rule)
        curvature = torch.linspace(1e-6, 3e-6, 200)
        for t in range(51):
            before = x.detach().clone()
            x.grad = curvature * x.detach() if t < 50 else torch.randn(200, generator=torch.Generator().manual_seed(1))
            opt.step()
        steps[name] = float((x.detach() - before).norm())
    assert NTMBFGS([torch.nn.Parameter(torch.zeros(1))]).rule.config.trust_ratio == 1000.0
    assert steps["without"] > 1e4 and steps["default"] < 10, steps
