"""LSTMOptimizer's in-place step: the states of a param group live in one buffer the rule
updates in place, the step matches the rule's differentiable step run by hand, and loaded or
copied states never alias the optimizer they came from."""

from __future__ import annotations

import copy

import pytest
import torch

from learned_optim import LSTMOptimizer


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((40, 30), (30,), (7, 3, 5), ())]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) * 0.1 for p in params]


def _step(opt: LSTMOptimizer, step: int) -> None:
    """Set the grads of ``opt``'s params to those of ``step`` and take the step."""
    params = opt.param_groups[0]["params"]
    for p, g in zip(params, _grads(step, params)):
        p.grad = g
    opt.step()


def test_the_step_is_the_rules_differentiable_step_by_hand_even_when_some_grads_are_missing():
    """Five steps, the second without a grad for the matrix: the optimizer (chunked, in place,
    packed states, tanh from sigmoid) against rule.step on concatenated states."""
    params = _params()
    opt = LSTMOptimizer(params, lr=0.5)
    rule = opt.rule
    reference = [p.detach().clone() for p in params]
    states = [rule.init_state(p.numel()) for p in params]
    for step in range(5):
        grads = _grads(step, params)
        present = [i for i in range(len(params)) if not (step == 1 and i == 0)]
        for i, p in enumerate(params):
            p.grad = grads[i] if i in present else None
        opt.step()
        sizes = [params[i].numel() for i in present]
        theta = torch.cat([reference[i].reshape(-1) for i in present])  # θ_t, which a relative step reads
        with torch.no_grad():
            update, new_state = rule(torch.cat([grads[i].reshape(-1) for i in present]),
                                     torch.cat([states[i] for i in present], dim=1), rule.segments(sizes),
                                     params=theta if rule.needs_params else None)
        for i, u, s in zip(present, update.split(sizes), new_state.split(sizes, dim=1)):
            reference[i] += 0.5 * u.view(params[i].shape)
            states[i] = s
    # the default's relative_floor and shrink_discount keep s_0 and m_t (the rule's last rows) per tensor
    rows, kept = rule.config.drop_in_rows, rule.config.origin_rows
    for p, r, s in zip(params, reference, states):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["rule_state"], s[:rows], rtol=1e-5, atol=1e-5)
        if kept:
            torch.testing.assert_close(opt.state[p]["scale_origin"], s[-kept:, 0], rtol=1e-6, atol=0)  # per tensor vs flat RMS


def test_group_states_are_views_of_one_buffer_kept_across_steps():
    params = _params()
    opt = LSTMOptimizer(params)
    for step in range(3):
        _step(opt, step)
        storages = {opt.state[p]["rule_state"].untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1
        if step == 0:
            first = storages
    assert storages == first  # packed once, then stepped in place
    assert [tuple(opt.state[p]["rule_state"].shape) for p in params] == \
        [(opt.rule.config.drop_in_rows, p.numel()) for p in params]


def test_a_loaded_state_is_stepped_without_touching_the_optimizer_it_came_from():
    params = _params()
    source = LSTMOptimizer(params)
    for step in range(2):
        _step(source, step)
    saved_state = {i: s["rule_state"].clone() for i, s in enumerate(source.state.values())}
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = LSTMOptimizer(twin_params)
    twin.load_state_dict(source.state_dict())  # torch hands over the very tensors (no copy)
    _step(twin, 2)
    for i, s in enumerate(source.state.values()):
        assert torch.equal(s["rule_state"], saved_state[i])  # the source's state is untouched
    clone = copy.deepcopy(twin)  # its params are copies, without grads
    for opt in (twin, clone):
        _step(opt, 3)
    for a, b in zip(twin.state.values(), clone.state.values()):
        assert torch.equal(a["rule_state"], b["rule_state"])
        assert a["rule_state"].untyped_storage().data_ptr() != b["rule_state"].untyped_storage().data_ptr()


def test_chunk_size_is_a_speed_knob_not_a_change_of_the_update():
    runs = []
    for chunk_size in (None, 1, 37):
        params = _params()
        opt = LSTMOptimizer(params, chunk_size=chunk_size)
        for step in range(3):
            _step(opt, step)
        runs.append([p.detach().clone() for p in params])
    for other in runs[1:]:  # equal up to float32 rounding of the averaging cells' sums, which chunks reorder
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_chunk_sizes_are_refused_by_name():
    for bad in (0, -3, 2.5, True, "16"):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
            LSTMOptimizer(_params(), chunk_size=bad)


@pytest.mark.parametrize("name", ["lstm", "ntm"])
def test_weight_decay_is_decoupled_as_in_adamw_and_scales_with_lr(name):
    from learned_optim import NTMBFGS

    make = (lambda ps, **kw: LSTMOptimizer(ps, **kw)) if name == "lstm" else (lambda ps, **kw: NTMBFGS(ps, **kw))
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(4)]
    grads = [torch.randn(5, 3), torch.randn(4)]
    runs = {}
    for decay in (0.0, 0.2):
        params = [p.clone().requires_grad_(True) for p in start]
        opt = make(params, lr=0.5, weight_decay=decay)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        runs[decay] = [p.detach() for p in params]
    for before, plain, decayed in zip(start, runs[0.0], runs[0.2]):
        # θ₁ = θ₀·(1 − lr·λ) + lr·g: g is computed at θ₀ in both runs (a relative step reads θ₀ before the decay)
        torch.testing.assert_close(decayed, plain - 0.5 * 0.2 * before)
    params = [p.clone().requires_grad_(True) for p in start]
    with pytest.raises(ValueError, match="weight_decay"):
        make(params, weight_decay=-0.1)
    opt = make(params, weight_decay=0.01)
    saved = opt.state_dict()
    del saved["param_groups"][0]["weight_decay"]  # a state_dict from before the option
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_a_warmup_cosine_schedule_scales_the_learned_step_through_lr():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6))
    opt = LSTMOptimizer([param])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / 4 if step < 4 else 0.5)
    reference = LSTMOptimizer([torch.nn.Parameter(param.detach().clone())])
    ref_param = reference.param_groups[0]["params"][0]
    for step in range(6):
        grad = torch.randn(6)
        before = param.detach().clone()
        param.grad = grad
        opt.step()
        with torch.no_grad():  # the same θ_t for both (a relative step reads it); the states see the same grads
            ref_param.copy_(before)
        ref_before = ref_param.detach().clone()
        ref_param.grad = grad.clone()
        reference.step()
        factor = (step + 1) / 4 if step < 4 else 0.5
        torch.testing.assert_close(param.detach() - before, factor * (ref_param.detach() - ref_before))
        schedule.step()
