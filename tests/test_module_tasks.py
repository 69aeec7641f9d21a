"""Task families from nn.Modules: the built-in models against hand-written forwards on fixed
weights, vmapped stacks against separate tasks (buffers included), the ``package.module:factory``
path with its errors, and meta-training a user's own model end to end."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learned_optim.cli import main
from learned_optim.meta import MetaTrainConfig, MetaTrainer
from learned_optim.meta.unroll import stack_segments
from learned_optim.tasks import ModuleFamily, get_family, load_family
from learned_optim.tasks.models import GRULM, MLP, ConvNet, TransformerLM, language_model_loss
from learned_optim.tasks.text import stdlib_files, stdlib_text, text_windows


def _data(n=64, side=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g), torch.randint(10, (n,), generator=g)


def _family(make, loss=None, inputs=None, labels=None, **kwargs):
    inputs, labels = (inputs, labels) if inputs is not None else _data()

    def batches(gen, b):
        idx = torch.randint(inputs.shape[0], (b,), generator=gen)
        return inputs[idx], labels[idx]

    loss = loss or (lambda model, xy: F.cross_entropy(model(xy[0]), xy[1]))
    return ModuleFamily(make, loss, batches, batch_size=8, **kwargs)


# ------------------------------------------------------------------ hand-written forwards

def test_mlp_with_layer_norm_and_gelu_matches_a_hand_written_forward():
    family = _family(lambda s: MLP([784, 12, 12, 10], "gelu", layer_norm=True), inputs=_data()[0].flatten(1),
                     labels=_data()[1])
    task = family.sample(3)
    params = [p + 0.01 * torch.randn_like(p) for p in task.init_params(requires_grad=False)]  # not the init
    x, y = task.sample_batch(task.batch_generator())
    w1, b1, g1, c1, w2, b2, g2, c2, w3, b3 = params
    h = F.gelu((lambda z: (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5))(
        x @ w1.T + b1) * g1 + c1)
    h = F.gelu((lambda z: (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5))(
        h @ w2.T + b2) * g2 + c2)
    logits = h @ w3.T + b3
    expected = (torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)).mean()
    assert torch.allclose(task.loss(params, (x, y)), expected, atol=1e-6)


def test_convnet_with_batch_norm_matches_a_hand_written_forward_and_updates_its_buffers():
    family = _family(lambda s: ConvNet((3, 5), batch_norm=True))
    task = family.sample(0)
    params = [p + 0.05 * torch.randn_like(p) for p in task.init_params(requires_grad=False)]
    x, y = task.sample_batch(task.batch_generator())
    k1, g1, c1, k2, g2, c2, w, b = params
    h, means = x, []
    for k, g, c in ((k1, g1, c1), (k2, g2, c2)):
        h = F.conv2d(h, k, stride=2, padding=1)
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        means.append((mean, h.var((0, 2, 3), unbiased=True)))
        h = torch.relu((h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
                       * g[None, :, None, None] + c[None, :, None, None])
    logits = h.mean((2, 3)) @ w.T + b
    expected = F.cross_entropy(logits, y)
    assert torch.allclose(task.loss(params, (x, y)), expected, atol=1e-6)
    buffers = task.info["buffers"]  # running stats moved 10% of the way to the batch's
    assert torch.allclose(buffers["net.1.running_mean"], 0.1 * means[0][0], atol=1e-6)
    assert torch.allclose(buffers["net.1.running_var"], 0.9 + 0.1 * means[0][1], atol=1e-6)
    assert buffers["net.1.num_batches_tracked"].item() == 1
    task.init_params()  # a new run starts from the module's buffers
    assert buffers["net.1.running_mean"].abs().max() == 0 and buffers["net.1.num_batches_tracked"].item() == 0


def test_transformer_lm_matches_a_hand_written_pre_ln_causal_forward():
    torch.manual_seed(0)
    width, heads, context = 16, 2, 10
    family = _family(lambda s: TransformerLM(width, 1, heads, context), language_model_loss,
                     torch.randint(256, (32, context)), torch.randint(256, (32, context)))
    task = family.sample(1)
    params = dict(zip(task.info["names"], [p + 0.02 * torch.randn_like(p) for p in task.init_params(False)]))
    x, y = task.sample_batch(task.batch_generator())
    P = lambda name: params[name]  # noqa: E731
    ln = lambda z, g, b: F.layer_norm(z, (width,), g, b)  # noqa: E731
    h = P("embed.weight")[x] + P("position.weight")[:context]
    a = ln(h, P("blocks.0.norm1.weight"), P("blocks.0.norm1.bias"))
    q, k, v = (a @ P("blocks.0.self_attn.in_proj_weight").T + P("blocks.0.self_attn.in_proj_bias")).chunk(3, -1)
    split = lambda z: z.view(*z.shape[:2], heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(torch.ones(context, context, dtype=torch.bool).triu(1), -math.inf)
    attended = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(*h.shape)
    h = h + attended @ P("blocks.0.self_attn.out_proj.weight").T + P("blocks.0.self_attn.out_proj.bias")
    f = ln(h, P("blocks.0.norm2.weight"), P("blocks.0.norm2.bias"))
    f = F.gelu(f @ P("blocks.0.linear1.weight").T + P("blocks.0.linear1.bias"))
    h = h + f @ P("blocks.0.linear2.weight").T + P("blocks.0.linear2.bias")
    logits = ln(h, P("norm.weight"), P("norm.bias")) @ P("head.weight").T + P("head.bias")
    expected = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert torch.allclose(task.loss(list(params.values()), (x, y)), expected, atol=1e-5)


def test_gru_lm_matches_a_hand_written_recurrence():
    width, context = 8, 6
    family = _family(lambda s: GRULM(width), language_model_loss, torch.randint(256, (16, context)),
                     torch.randint(256, (16, context)))
    task = family.sample(2)
    params = dict(zip(task.info["names"], task.init_params(False)))
    x, y = task.sample_batch(task.batch_generator())
    e = params["embed.weight"][x]
    w_ih, w_hh, b_ih, b_hh = (params[f"rnn.{n}_l0"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    h, outputs = torch.zeros(x.shape[0], width), []
    for t in range(context):
        gi, gh = e[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        r = torch.sigmoid(gi[:, :width] + gh[:, :width])
        z = torch.sigmoid(gi[:, width:2 * width] + gh[:, width:2 * width])
        n = torch.tanh(gi[:, 2 * width:] + r * gh[:, 2 * width:])
        h = (1 - z) * n + z * h
        outputs.append(h)
    logits = torch.stack(outputs, 1) @ params["head.weight"].T + params["head.bias"]
    expected = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert torch.allclose(task.loss(list(params.values()), (x, y)), expected, atol=1e-6)


# ------------------------------------------------------------------ stacks

def _separate_and_stacked(family, seeds, steps=3, lr=0.05):
    """Losses, grads and buffers of ``steps`` SGD steps on the stack and on each task alone."""
    stack = family.stack(seeds)
    params = stack.init_params()
    stream = stack.new_stream()
    stacked = []
    for _ in range(steps):
        losses = stack.losses(params, stack.sample_batch(stream))
        grads = torch.autograd.grad(losses.sum(), params)
        stacked.append(losses.detach())
        params = [(p - lr * g).detach().requires_grad_() for p, g in zip(params, grads)]
    separate = []
    for seed in seeds:
        task = family.sample(seed)
        ps, gen, row = task.init_params(), task.batch_generator(), []
        for _ in range(steps):
            loss = task.loss(ps, task.sample_batch(gen))
            grads = torch.autograd.grad(loss, ps)
            row.append(loss.detach())
            ps = [(p - lr * g).detach().requires_grad_() for p, g in zip(ps, grads)]
        separate.append(torch.stack(row))
    return torch.stack(stacked), torch.stack(separate, 1), stack


@pytest.mark.parametrize("name, kwargs", [("mnist-conv", {"batch_norm": True}), ("text-transformer", {}),
                                          ("mnist-mlp-nn", {"activation": "tanh", "layer_norm": True}),
                                          ("text-gru", {})])
def test_stacks_of_built_in_families_equal_separate_tasks(name, kwargs, mnist_dir):
    if name.startswith("mnist"):
        kwargs = {**kwargs, "root": mnist_dir}
    family = get_family(name, **kwargs)
    seeds = [0, 1, 2, 3, 4]
    stacked, separate, stack = _separate_and_stacked(family, seeds)
    assert torch.allclose(stacked, separate, atol=2e-5, rtol=1e-5)
    if name != "text-gru":  # architectures drawn per seed: stacked in groups of equal structure
        groups = set(stack.param_tasks)
        assert all(isinstance(o, tuple) for o in groups) or groups == {None}
        covered = sorted(k for o in groups for k in (o if isinstance(o, tuple) else range(len(seeds))))
        assert covered == list(range(len(seeds)))  # each task in exactly one group


def test_grouped_stack_segments_follow_each_tensors_tasks():
    widths = {0: 4, 1: 6, 2: 4}
    family = _family(lambda s: MLP([784, widths[s], 10]), inputs=_data()[0].flatten(1), labels=_data()[1])
    stack = family.stack([0, 1, 2])
    assert stack.param_tasks[:4] == [(0, 2)] * 4 and stack.param_tasks[4:] == [(1,)] * 4
    params = stack.initial_params
    groups = stack_segments("group", stack, params)
    tensors = stack_segments("tensor", stack, params)
    sizes = [sum(p.numel() for p in family.sample(s).initial_params) for s in (0, 1, 2)]
    assert torch.bincount(groups.ids).tolist() == sizes  # every task's coordinates in its own group
    assert tensors.count == 4 * 3  # one scope per (task, tensor)
    # task 1's first weight (stacked alone, after tasks 0 and 2's four tensors) is one scope
    offset = sum(p.numel() for p in params[:4])
    first = tensors.ids[offset:offset + params[4].numel()]
    assert first.unique().numel() == 1 and groups.ids[offset:offset + params[4].numel()].unique().tolist() == [1]


def test_auto_vectorize_falls_back_to_a_loop_for_modules_torch_cannot_vmap():
    family = _family(lambda s: GRULM(6), language_model_loss, torch.randint(256, (16, 5)),
                     torch.randint(256, (16, 5)))
    stacked, separate, stack = _separate_and_stacked(family, [0, 1])
    assert torch.allclose(stacked, separate, atol=1e-6)
    assert stack.param_tasks[0] == 0  # looped: tensors belong to one task each
    with pytest.raises(RuntimeError, match="atching rule"):
        ModuleFamily(lambda s: GRULM(6), language_model_loss, family.batches, 8, vectorize=True).stack(
            [0, 1]).losses(*_first_batch(family, [0, 1]))


def _first_batch(family, seeds):
    stack = ModuleFamily(family.model, family.loss_of, family.batches, 8, vectorize=True).stack(seeds)
    return stack.init_params(), stack.sample_batch(stack.new_stream())


def test_a_factory_that_ignores_its_seed_is_still_reproducible_and_leaves_the_global_rng():
    family = _family(lambda s: MLP([784, 5, 10]), inputs=_data()[0].flatten(1), labels=_data()[1])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = family.sample(7), family.sample(7), family.sample(8)
    assert torch.rand(1) == before
    assert torch.equal(a.initial_params[0], b.initial_params[0]) and not torch.equal(a.initial_params[0],
                                                                                      c.initial_params[0])


def test_bad_module_family_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match="loss must be callable"):
        ModuleFamily(lambda s: nn.Linear(2, 2), None, lambda g, b: None, 4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ModuleFamily(lambda s: nn.Linear(2, 2), lambda m, b: 0, lambda g, b: None, 0)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        ModuleFamily(lambda s: 3, lambda m, b: 0, lambda g, b: None, 4).sample(0)


def test_built_in_families_draw_architecture_and_init_scale_per_seed(mnist_dir):
    family = get_family("mnist-mlp-nn", root=mnist_dir, image_side=14)
    shapes = {tuple(tuple(p.shape) for p in family.sample(s).initial_params) for s in range(12)}
    assert len(shapes) >= 3  # widths and depths vary
    scales = {round(float(family.sample(s).initial_params[0].std()), 3) for s in range(12)}
    assert len(scales) >= 6


# ------------------------------------------------------------------ text

def test_stdlib_text_parts_are_disjoint_deterministic_and_windows_shift_by_one():
    held, train = stdlib_files("held-out"), stdlib_files("meta-train")
    assert held and train and not set(held) & set(train)
    assert 0.1 < len(held) / (len(held) + len(train)) < 0.3
    text = stdlib_text("held-out", 1 << 16)
    assert text.dtype == torch.uint8 and text.numel() == 1 << 16
    x, y = text_windows(text, torch.Generator().manual_seed(0), 4, 12)
    assert x.shape == y.shape == (4, 12) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="part must be one of"):
        stdlib_files("test")


# ------------------------------------------------------------------ paths and meta-training

FAMILY_MODULE = textwrap.dedent('''
    import torch, torch.nn.functional as F
    from torch import nn
    from learned_optim.tasks import ModuleFamily

    X = torch.randn(256, 6, generator=torch.Generator().manual_seed(0))
    Y = (X[:, 0] > 0).long()

    def batches(gen, b):
        idx = torch.randint(256, (b,), generator=gen)
        return X[idx], Y[idx]

    def family(width=5):
        return ModuleFamily(lambda seed: nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 2)),
                            lambda model, xy: F.cross_entropy(model(xy[0]), xy[1]), batches, batch_size=16,
                            name="tiny")

    INSTANCE = family()
    NOT_A_FAMILY = 3
    def returns_other():
        return 3
''')


@pytest.fixture
def family_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(FAMILY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_tasks"


def test_load_family_from_a_path_and_its_errors_by_name(family_module):
    assert load_family("my_tasks:family", width=3).sample(0).initial_params[0].shape == (3, 6)
    assert get_family("my_tasks:INSTANCE").name == "tiny"
    cases = [("my_tasks", "must be 'package.module:factory'"), ("my_tasks:", "must be 'package.module:factory'"),
             ("no_such_module_x:family", "cannot import module 'no_such_module_x'"),
             ("my_tasks:nothing", "has no attribute 'nothing'"),
             ("my_tasks:NOT_A_FAMILY", "'NOT_A_FAMILY' is a int, neither a TaskFamily"),
             ("my_tasks:returns_other", "returned a int, not a TaskFamily")]
    for path, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_family(path) if ":" not in path or path.endswith(":") or path == "my_tasks" else get_family(path)
    with pytest.raises(ValueError, match="calling 'family' with .* failed"):
        load_family("my_tasks:family", depth=2)
    with pytest.raises(ValueError, match="TaskFamily instance, which takes no arguments"):
        load_family("my_tasks:INSTANCE", width=2)


META = ["meta-train", "--rule-config", '{"hidden_size": 4}', "--episodes", "2", "--tasks-per-step", "4",
        "--horizon", "10", "--truncation", "5", "--validation-tasks", "4", "--validate-every", "1",
        "--eval-seeds", "2", "--device", "cpu", "--no-progress"]


def test_meta_train_cli_takes_a_family_path(family_module, tmp_path, capsys):
    out = tmp_path / "mine"
    assert main([*META, "--task", "my_tasks:family", "--task-kwargs", '{"width": 3}', "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["task"] == {"family": "my_tasks:family", "kwargs": {"width": 3}}
    assert math.isfinite(meta["evaluation"]["median_final_loss"])
    with pytest.raises(SystemExit) as exit_info:
        main([*META, "--task", "my_tasks:nothing", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "error: task path 'my_tasks:nothing': module 'my_tasks' has no attribute 'nothing'" in capsys.readouterr().err


def test_meta_trainer_takes_a_module_family_object(family_module, tmp_path):
    import my_tasks

    config = MetaTrainConfig(task="tiny", rule_config={"hidden_size": 4}, episodes=2, tasks_per_step=4, horizon=10,
                             truncation=5, validation_tasks=4, validate_every=1, device="cpu")
    trainer = MetaTrainer(config, tmp_path / "run", progress=False, log=None, family=my_tasks.family(4))
    summary = trainer.train()
    assert summary["episodes"] == 2 and math.isfinite(summary["best_validation"]["meta_loss"])
