"""Task families, the MNIST reader and the embedded data."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from learned_optim.tasks import (
    MLPFamily,
    Task,
    TaskFamily,
    families,
    get_family,
    load_mnist,
    synthetic_classification,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def mnist_root() -> Path | None:
    root = os.environ.get("LEARNED_OPTIM_DATA") or (SHARED_DATA if SHARED_DATA.is_dir() else None)
    if root and (Path(root) / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        return Path(root)
    return None


def test_families_are_registered_and_unknown_names_are_listed():
    assert {"quadratic", "rosenbrock", "noisy-quadratic", "noisy-least-squares", "mlp", "mnist-mlp"} <= set(families())
    with pytest.raises(KeyError, match="available: .*quadratic"):
        get_family("nope")


def test_quadratic_family_is_the_papers_and_reproducible():
    family = get_family("quadratic")
    a, b, c = family.sample(3), family.sample(3), family.sample(4)
    w, y = a.info["W"], a.info["y"]
    assert w.shape == (10, 10) and y.shape == (10,)
    assert torch.equal(a.initial_params[0], b.initial_params[0]) and not torch.equal(a.info["W"], c.info["W"])
    theta = torch.randn(10)
    assert torch.allclose(a.loss([theta]), ((w @ theta - y) ** 2).sum())
    # The minimiser of ‖Wθ − y‖² is W⁻¹y, where the loss is 0.
    assert a.loss([torch.linalg.solve(w.double(), y.double()).float()]).item() < 1e-6
    assert not a.stochastic and a.sample_batch(a.batch_generator()) is None


@pytest.mark.parametrize("name", ["quadratic", "ill-conditioned-quadratic"])
def test_quadratic_loss_offset_adds_a_constant_and_leaves_the_gradients(name):
    plain, offset = get_family(name, dim=4), get_family(name, dim=4, loss_offset=0.25)
    theta = torch.randn(4, requires_grad=True)
    losses = [family.sample(7).loss([theta]) for family in (plain, offset)]
    grads = [torch.autograd.grad(loss, theta)[0] for loss in losses]
    assert losses[1].item() == pytest.approx(losses[0].item() + 0.25)
    assert torch.equal(grads[0], grads[1])
    stacked = offset.stack([7, 8]).losses_fn([torch.stack([theta.detach()] * 2)])
    assert stacked[0].item() == pytest.approx(losses[1].item())
    for bad in (-0.1, float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="loss_offset must be a finite number ≥ 0"):
            get_family(name, loss_offset=bad)


def test_rosenbrock_minimum_is_at_one_one():
    task = get_family("rosenbrock").sample(0)
    assert task.loss([torch.tensor([1.0, 1.0])]).item() == 0.0
    assert task.loss([torch.tensor([0.0, 0.0])]).item() == 1.0


def test_noisy_quadratic_gradient_has_known_mean_and_spread():
    task = get_family("noisy-quadratic", dim=4, batch_size=1).sample(0)
    h, c, sigma = task.info["h"], task.info["c"], task.info["sigma"]
    theta = task.init_params()
    gen = task.batch_generator()
    grads = []
    for _ in range(4000):
        (g,) = torch.autograd.grad(task.loss(theta, task.sample_batch(gen)), theta)
        grads.append(g)
    grads = torch.stack(grads)
    mean = h * (theta[0].detach() - c)
    assert torch.allclose(grads.mean(0), mean, atol=4 * sigma.max().item() / 4000**0.5)
    assert torch.allclose(grads.std(0), sigma, rtol=0.06)


def test_noisy_least_squares_minimum_loss_is_half_the_noise_variance():
    family = get_family("noisy-least-squares", dim=8, noise_std=0.5)
    task = family.sample(1)
    gen = task.batch_generator()
    loss = task.loss([task.info["w_star"]], task.sample_batch(gen, 20000)).item()
    assert loss == pytest.approx(0.5 * 0.5**2, rel=0.05)


def test_minibatch_streams_are_reproducible_and_batch_size_can_change():
    task = get_family("mlp", batch_size=16).sample(0)
    x1, _ = task.sample_batch(task.batch_generator())
    x2, _ = task.sample_batch(task.batch_generator())
    assert torch.equal(x1, x2) and x1.shape == (16, 32)
    x3, y3 = task.sample_batch(task.batch_generator(), 40)
    assert x3.shape == (40, 32) and y3.shape == (40,)


def test_mlp_family_shapes_activation_and_depth():
    data = synthetic_classification(n=64, dim=5, num_classes=3)
    family = MLPFamily(data, hidden=(7, 6), activation="relu", batch_size=8)
    params = family.sample(0).init_params()
    assert [tuple(p.shape) for p in params] == [(7, 5), (7,), (6, 7), (6,), (3, 6), (3,)]
    with pytest.raises(ValueError, match="activation"):
        MLPFamily(data, activation="gelu")


def test_mlp_full_data_loss_at_zero_weights_is_log_classes():
    data = synthetic_classification(n=64, dim=5, num_classes=4)
    task = MLPFamily(data).sample(0)
    zeros = [torch.zeros_like(p) for p in task.initial_params]
    assert task.loss(zeros, None).item() == pytest.approx(float(np.log(4)), rel=1e-6)


def test_user_defined_family_in_a_few_lines():
    class LinearRegression(TaskFamily):
        name = "linreg"

        def sample(self, seed):
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(5, generator=g)

            def batch(gen, b):
                x = torch.randn(b, 5, generator=gen)
                return x, x @ w

            return Task([torch.zeros(5)], lambda p, xy: ((xy[0] @ p[0] - xy[1]) ** 2).mean(), batch, 16, seed)

    task = LinearRegression().sample(0)
    params = task.init_params()
    opt = torch.optim.SGD(params, lr=0.1)
    gen = task.batch_generator()
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = task.loss(params, task.sample_batch(gen))
        first = first or loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first


def test_synthetic_data_is_deterministic_and_learnable_sized():
    a, b = synthetic_classification(seed=0), synthetic_classification(seed=0)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    counts = torch.bincount(a.labels, minlength=10)
    assert (counts > 0).sum() >= 5  # the teacher uses many classes


def test_split_is_fixed_and_disjoint():
    data = synthetic_classification(n=100, dim=3)
    first, rest = data.split(80, seed=0)
    again, _ = data.split(80, seed=0)
    assert len(first) == 80 and len(rest) == 20 and torch.equal(first.inputs, again.inputs)
    rows = {tuple(r.tolist()) for r in first.inputs} & {tuple(r.tolist()) for r in rest.inputs}
    assert not rows
    with pytest.raises(ValueError, match="split size"):
        data.split(100)


def test_mnist_needs_a_directory(monkeypatch):
    monkeypatch.delenv("LEARNED_OPTIM_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="LEARNED_OPTIM_DATA"):
        load_mnist()


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_reader_on_a_hand_made_file(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, gz=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 2, 1]), gz=False)
    data = load_mnist(tmp_path)
    assert data.inputs.shape == (3, 784) and data.labels.tolist() == [7, 2, 1]
    assert data.inputs[0, 5].item() == pytest.approx(5 / 255)


def test_idx_reader_rejects_truncated_and_mismatched_files(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2), gz=False)
    with pytest.raises(ValueError, match="do not match"):
        load_mnist(tmp_path)
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="header says"):
        load_mnist(tmp_path)


@pytest.mark.skipif(mnist_root() is None, reason="MNIST t10k files not present (set LEARNED_OPTIM_DATA)")
def test_real_mnist_test_set():
    data = load_mnist(mnist_root())
    assert data.inputs.shape == (10000, 784) and data.labels.shape == (10000,)
    assert torch.bincount(data.labels).tolist()[:3] == [980, 1135, 1032]  # the known t10k class counts
    assert 0.0 <= data.inputs.min() and data.inputs.max() == 1.0
    family = get_family("mnist-mlp", root=mnist_root())
    task = family.sample(0)
    assert [tuple(p.shape) for p in task.initial_params] == [(20, 784), (20,), (10, 20), (10,)]



def test_mnist_parts_split_the_test_set_once_and_disjointly():
    parts = {part: get_family("mnist-mlp", root=mnist_root(), part=part).data for part in ("all", "meta-train", "held-out")}
    assert len(parts["meta-train"]) == 8000 and len(parts["held-out"]) == 2000
    again = get_family("mnist-mlp", root=mnist_root(), part="held-out").data
    assert torch.equal(again.inputs, parts["held-out"].inputs)  # one fixed split

    def fingerprints(d):  # one number per example: image and label together
        weights = torch.linspace(1, 2, 785, dtype=torch.float64)
        return sorted((torch.cat([d.inputs.double(), d.labels.double().unsqueeze(1)], 1) @ weights).tolist())

    # The two parts together are exactly the whole set, example for example.
    assert sorted(fingerprints(parts["meta-train"]) + fingerprints(parts["held-out"])) == fingerprints(parts["all"])
    with pytest.raises(ValueError, match="part must be one of"):
        get_family("mnist-mlp", root=mnist_root(), part="train")


@pytest.mark.parametrize("name, kwargs", [("mlp", {"hidden": (6, 5), "batch_size": 16}),
                                          ("mlp", {"hidden": (4,), "batch_size": 8, "n": 64, "examples_per_task": 20}),
                                          ("quadratic", {"dim": 4})])
def test_vectorized_stack_equals_separate_tasks(name, kwargs):
    """family.stack(seeds) is K tasks in one call: same θ₀, minibatches and losses as sample(seed)."""
    family = get_family(name, **kwargs)
    seeds = [4, 9, 2]
    stack = family.stack(seeds)
    assert stack.param_tasks == [None] * len(stack.initial_params)  # every tensor stacked
    tasks = [family.sample(seed) for seed in seeds]
    params = stack.init_params()
    for k, task in enumerate(tasks):
        for stacked, own in zip(params, task.initial_params):
            assert torch.equal(stacked[k], own)
    stream, own_streams = stack.new_stream(), [t.batch_generator() for t in tasks]
    for _ in range(3):
        losses = stack.losses(params, stack.sample_batch(stream))
        for k, task in enumerate(tasks):
            own = task.loss([p[k] for p in params], task.sample_batch(own_streams[k]))
            torch.testing.assert_close(losses[k], own, rtol=1e-5, atol=1e-6)
    full = stack.losses(params, None)  # no batch: the loss over all data
    for k, task in enumerate(tasks):
        torch.testing.assert_close(full[k], task.loss([p[k] for p in params], None), rtol=1e-5, atol=1e-6)


def test_examples_per_task_gives_each_task_its_own_subset_of_the_part():
    data = synthetic_classification(n=64, dim=5)
    family = MLPFamily(data, hidden=(3,), batch_size=50, examples_per_task=10)
    subsets = [family.examples(seed) for seed in range(3)]
    assert all(len(set(s.tolist())) == 10 and 0 <= int(s.min()) and int(s.max()) < 64 for s in subsets)
    assert not torch.equal(subsets[0], subsets[1])
    assert torch.equal(family.examples(1), subsets[1])  # fixed by the seed
    # Every minibatch of task 1 is drawn from its 10 examples only.
    task = family.sample(1)
    x, _ = task.sample_batch(task.batch_generator())
    rows = {tuple(r) for r in data.inputs[subsets[1]].tolist()}
    assert x.shape[0] == 50 and all(tuple(r) in rows for r in x.tolist())
    # The whole-data loss is over the subset.
    from learned_optim.tasks import mlp_forward
    expected = torch.nn.functional.cross_entropy(mlp_forward(task.initial_params, data.inputs[subsets[1]]), data.labels[subsets[1]])
    torch.testing.assert_close(task.loss(task.initial_params, None), expected)
    assert MLPFamily(data, hidden=(3,)).examples(1) is None
    with pytest.raises(ValueError, match=r"examples_per_task must be an integer in \[1, 64\]"):
        MLPFamily(data, examples_per_task=65)


def test_mixed_mlp_family_draws_architectures_per_task():
    data = synthetic_classification(n=64, dim=5)
    from learned_optim.tasks import MixedMLPFamily

    family = MixedMLPFamily(data, widths=(3, 7), depths=(1, 2), activations=("sigmoid", "relu"), batch_size=8)
    archs = {family.architecture(s) for s in range(40)}
    assert {len(h) for h, _ in archs} == {1, 2} and {a for _, a in archs} == {"sigmoid", "relu"}
    assert all(w in (3, 7) for h, _ in archs for w in h)
    seed = 5
    hidden, activation = family.architecture(seed)
    task = family.sample(seed)
    assert [tuple(p.shape) for p in task.initial_params][::2] == [
        (o, i) for i, o in zip((5, *hidden), (*hidden, 10))]
    same = MLPFamily(data, hidden, activation, batch_size=8).sample(seed)
    x = task.sample_batch(task.batch_generator())
    assert torch.equal(task.loss(task.initial_params, x), same.loss(same.initial_params, x))
    # A stack of equal architectures is vectorized; mixed ones fall back to the generic loop.
    twins = [s for s in range(40) if family.architecture(s) == family.architecture(seed)][:2]
    assert family.stack(twins).param_tasks == [None] * len(task.initial_params)
    others = [seed] + [s for s in range(40) if family.architecture(s) != family.architecture(seed)][:1]
    assert family.stack(others).param_tasks[0] == 0
    with pytest.raises(ValueError, match="activation must be one of"):
        MixedMLPFamily(data, activations=("gelu",))


def test_concatenated_stacks_give_each_stacks_losses_and_owners_in_order():
    from learned_optim.tasks import TaskStack

    quad = get_family("quadratic", dim=3)
    a, b = quad.stack([1, 2]), TaskStack.of([quad.sample(5)])
    both = TaskStack.concatenate([a, b])
    assert both.num_tasks == 3
    assert both.param_tasks == [(0, 1)] * len(a.initial_params) + [2] * len(b.initial_params)
    params = both.init_params()
    losses = both.losses(params, both.sample_batch(both.new_stream()))
    expected = torch.cat([a.losses(a.init_params()), b.losses(b.init_params(), None)])
    torch.testing.assert_close(losses, expected)


def test_a_mixture_draws_each_seeds_task_from_one_component_the_same_way_every_time():
    from learned_optim.tasks import MixtureFamily

    quad, rosen = get_family("quadratic", dim=3), get_family("rosenbrock")
    mix = MixtureFamily([quad, rosen])
    picks = [mix.choose(s) for s in range(200)]
    assert picks == [mix.choose(s) for s in range(200)] and 60 < sum(picks) < 140  # both drawn, about evenly
    seeds = list(range(6))
    stack = mix.stack(seeds)
    losses = stack.losses(stack.init_params(), stack.sample_batch(stack.new_stream()))
    for k, seed in enumerate(seeds):  # task k is seed k's task of its component
        task = (quad, rosen)[picks[seed]].sample(seed)
        torch.testing.assert_close(losses[k], task.loss(task.init_params()))
    with pytest.raises(ValueError, match="at least one component"):
        MixtureFamily([])


def test_suite_mix_names_a_missing_component(mnist_dir):
    with pytest.raises(ValueError, match="no component 'mnist-vit'"):
        get_family("suite-mix", root=mnist_dir, components=["mnist-vit"])
    mix = get_family("suite-mix", root=mnist_dir, components=["text-gru", "mnist-conv"])
    assert len(mix.components) == 3  # the GRU and both convnets (with and without batch norm)


def test_suite_mix_takes_extra_families(mnist_dir):
    mix = get_family("suite-mix", root=mnist_dir, components=["text-gru"], extra=["quadratic", ["quadratic", {"dim": 3}]])
    assert [c.name for c in mix.components][1:] == ["quadratic", "quadratic"]
    assert mix.components[2].dim == 3
    seed = next(s for s in range(100) if mix.choose(s) == 2)  # a seed that draws the 3-D quadratic
    task = mix.sample(seed)
    torch.testing.assert_close(task.init_params()[0], get_family("quadratic", dim=3).sample(seed).init_params()[0])
    with pytest.raises(ValueError, match=r"a family name or \[name, kwargs\]"):
        get_family("suite-mix", root=mnist_dir, extra=[["quadratic"]])


def test_a_reparametrized_task_is_the_same_problem_in_other_units():
    from learned_optim.tasks import random_scales, reparametrized

    stack = get_family("quadratic", dim=4).stack([0, 1, 2])
    scales = random_scales(stack, 10.0, torch.Generator().manual_seed(0))
    assert all(s.shape == (3,) + (1,) * (p.dim() - 1) for s, p in zip(scales, stack.initial_params))
    assert all(0.1 <= float(s.min()) and float(s.max()) <= 10 for s in scales)
    scaled = reparametrized(stack, scales)
    theta = [p + 0.3 for p in stack.init_params()]  # a point in the old units, and the same point in the new
    theta_new = [(p * c).detach().requires_grad_(True) for p, c in zip(theta, scales)]
    theta = [p.detach().requires_grad_(True) for p in theta]
    f, f_new = stack.losses(theta).sum(), scaled.losses(theta_new).sum()
    torch.testing.assert_close(f_new, f)
    grads, grads_new = torch.autograd.grad(f, theta), torch.autograd.grad(f_new, theta_new)
    for g, g_new, c in zip(grads, grads_new, scales):
        torch.testing.assert_close(g_new, g / c)  # ∇f̃ = ∇f / c
    with pytest.raises(ValueError, match="strength"):
        random_scales(stack, 0.5, torch.Generator())
    with pytest.raises(ValueError, match=f"{len(scales) + 1} scales for {len(scales)} parameter tensors"):
        reparametrized(stack, scales + scales[:1])
