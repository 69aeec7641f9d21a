"""The MLP classification family (the paper's MNIST optimizee, configurable)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Task, TaskFamily, TaskStack, register_family
from .data import ClassificationData, load_mnist, synthetic_classification

__all__ = ["MLPFamily", "MixedMLPFamily", "mlp_forward", "ACTIVATIONS"]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}


def mlp_forward(params: Sequence[Tensor], x: Tensor, activation: str = "sigmoid") -> Tensor:
    """Logits of an MLP whose params are [W1, b1, W2, b2, ...] with W of shape (out, in).

    Stacked params of K nets, W (K, out, in) and b (K, out), give (K, B, classes) logits for
    x of shape (K, B, in), or for shared inputs (N, in).
    """
    act = ACTIVATIONS[activation]
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        w, b = params[2 * i], params[2 * i + 1]
        h = F.linear(h, w, b) if w.dim() == 2 else torch.matmul(h, w.transpose(1, 2)) + b.unsqueeze(1)
        if i < n_layers - 1:
            h = act(h)
    return h


class MLPFamily(TaskFamily):
    """Cross-entropy MLP on a classification set; tasks differ in θ₀ and minibatch stream.

    Weights are IID Gaussian with std ``init_scale``/√fan_in, biases zero; minibatches are
    drawn uniformly with replacement. The paper's setting is ``hidden=(20,)``,
    ``activation="sigmoid"``, ``batch_size=128`` on MNIST.

    ``examples_per_task``: each task trains on its own random subset of that many examples
    (drawn from the task seed) instead of the whole set. Meta-training on 2,000-image subsets
    of the 8,000 meta-training images matches the size of the 2,000 held-out images the
    benchmarks train on (100 steps × 128 is 6.4 passes over 2,000 images, 1.6 over 8,000).
    """

    def __init__(
        self,
        data: ClassificationData,
        hidden: Sequence[int] = (20,),
        activation: str = "sigmoid",
        batch_size: int = 128,
        init_scale: float = 1.0,
        name: str = "mlp",
        examples_per_task: int | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        _check_examples_per_task(examples_per_task, len(data))
        self.data, self.hidden, self.activation = data, tuple(hidden), activation
        self.batch_size, self.init_scale, self.name = batch_size, init_scale, name
        self.examples_per_task = examples_per_task

    def examples(self, seed: int) -> Tensor | None:
        """Indices of task ``seed``'s examples (None: the whole set)."""
        if self.examples_per_task is None:
            return None
        g = torch.Generator().manual_seed(seed + _SUBSET_SEED_OFFSET)
        return torch.randperm(len(self.data), generator=g)[: self.examples_per_task]

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        sizes = [self.data.inputs.shape[1], *self.hidden, self.data.num_classes]
        params: list[Tensor] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            params.append(torch.randn(fan_out, fan_in, generator=g) * (self.init_scale / fan_in**0.5))
            params.append(torch.zeros(fan_out))
        inputs, labels, activation = self.data.inputs, self.data.labels, self.activation
        subset = self.examples(seed)
        if subset is not None:
            inputs, labels = inputs[subset], labels[subset]

        def batch(gen: torch.Generator, b: int) -> tuple[Tensor, Tensor]:
            idx = torch.randint(inputs.shape[0], (b,), generator=gen)
            return inputs[idx], labels[idx]

        def loss(ps, xy):
            x, y = xy if xy is not None else (inputs, labels)
            return F.cross_entropy(mlp_forward(ps, x, activation), y)

        return Task(params, loss, batch, self.batch_size, seed)

    def stack(self, seeds: Sequence[int], device: torch.device | str | None = None) -> TaskStack:
        """K MLPs as batched matrix products; task k equals ``sample(seeds[k])``, minibatches included.

        Each task keeps its own minibatch stream (the generator ``sample(seed)`` would use), so a
        stacked run and K separate runs see the same data. With no batch the loss is over all data.
        """
        tasks = [self.sample(s) for s in seeds]
        stacked = [torch.stack([t.initial_params[j] for t in tasks]).to(device) for j in range(len(tasks[0].initial_params))]
        inputs, labels = self.data.inputs.to(device), self.data.labels.to(device)
        activation, b = self.activation, self.batch_size
        if self.examples_per_task is None:
            n, subsets = inputs.shape[0], None
        else:  # (K, n): task k's example indices
            picks = [self.examples(s) for s in seeds]
            n, subsets = self.examples_per_task, torch.stack([p for p in picks if p is not None]).to(inputs.device)

        def new_stream():
            return [t.batch_generator() for t in tasks]

        def batch(gens):
            idx = torch.stack([torch.randint(n, (b,), generator=g) for g in gens]).to(inputs.device)
            if subsets is not None:
                idx = subsets.gather(1, idx)
            return inputs[idx], labels[idx]

        def losses(ps, xy):
            if xy is not None:
                x, y = xy
            elif subsets is None:
                x, y = inputs, labels.expand(len(tasks), n)
            else:
                x, y = inputs[subsets], labels[subsets]
            h = mlp_forward(ps, x, activation)  # (K, B or N, classes)
            per_example = F.cross_entropy(h.reshape(-1, h.shape[-1]), y.reshape(-1), reduction="none")
            return per_example.view(len(tasks), -1).mean(1)

        return TaskStack(stacked, losses, [None] * len(stacked), len(tasks), new_stream, batch)


@register_family("mlp")
def synthetic_mlp(hidden: Sequence[int] = (20,), activation: str = "sigmoid", batch_size: int = 128,
                  n: int = 4096, dim: int = 32, examples_per_task: int | None = None) -> MLPFamily:
    """The MLP task on the embedded synthetic classification set (no files needed)."""
    return MLPFamily(synthetic_classification(n=n, dim=dim), hidden, activation, batch_size, name="mlp",
                     examples_per_task=examples_per_task)


#: The fixed split of the 10,000-image MNIST test set: meta-training sees only the first part.
MNIST_META_TRAIN_SIZE, MNIST_SPLIT_SEED = 8000, 0
MNIST_PARTS = ("all", "meta-train", "held-out")


@register_family("mnist-mlp")
def mnist_mlp(hidden: Sequence[int] = (20,), activation: str = "sigmoid", batch_size: int = 128,
              root: str | os.PathLike | None = None, part: str = "all",
              examples_per_task: int | None = None) -> MLPFamily:
    """The paper's MNIST MLP on the t10k set under ``root`` (or $LEARNED_OPTIM_DATA).

    ``part``: "all" 10,000 images; "meta-train" the 8,000 a learned optimizer is meta-trained
    on; "held-out" the other 2,000, for benchmarks (one fixed split, seed 0).
    ``examples_per_task``: each task trains on a random subset of that many images of the part.
    """
    if part not in MNIST_PARTS:
        raise ValueError(f"part must be one of {MNIST_PARTS}, got {part!r}")
    data = load_mnist(root)
    if part != "all":
        meta_train, held_out = data.split(MNIST_META_TRAIN_SIZE, seed=MNIST_SPLIT_SEED)
        data = meta_train if part == "meta-train" else held_out
    return MLPFamily(data, hidden, activation, batch_size, name="mnist-mlp", examples_per_task=examples_per_task)


_SUBSET_SEED_OFFSET = 314_159  # keeps a task's subset draw apart from its θ₀ draw


def _check_examples_per_task(value: int | None, available: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= available:
        raise ValueError(f"examples_per_task must be an integer in [1, {available}] (the examples available), "
                         f"got {value!r}")


class MixedMLPFamily(TaskFamily):
    """MLPs whose architecture is drawn per task: hidden widths, depth and activation.

    For meta-training a rule that generalizes across nets rather than fitting one (the paper's
    optimizer, trained on one sigmoid net, failed on ReLU). Task ``seed`` draws a depth from
    ``depths``, a width per layer from ``widths`` and an activation from ``activations``, then
    is ``MLPFamily(...).sample(seed)`` for that architecture.
    """

    def __init__(self, data: ClassificationData, widths: Sequence[int] = (20, 40), depths: Sequence[int] = (1, 2),
                 activations: Sequence[str] = ("sigmoid", "relu"), batch_size: int = 128, name: str = "mlp-mix",
                 examples_per_task: int | None = None) -> None:
        for act in activations:
            if act not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        _check_examples_per_task(examples_per_task, len(data))
        self.data, self.widths, self.depths = data, tuple(widths), tuple(depths)
        self.activations, self.batch_size, self.name = tuple(activations), batch_size, name
        self.examples_per_task = examples_per_task

    def architecture(self, seed: int) -> tuple[tuple[int, ...], str]:
        """The (hidden widths, activation) of task ``seed``."""
        g = torch.Generator().manual_seed(seed * 7 + 3)
        pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
        depth = pick(self.depths)
        return tuple(pick(self.widths) for _ in range(depth)), pick(self.activations)

    def _family(self, seed: int) -> MLPFamily:
        hidden, activation = self.architecture(seed)
        return MLPFamily(self.data, hidden, activation, self.batch_size, name=self.name,
                         examples_per_task=self.examples_per_task)

    def sample(self, seed: int) -> Task:
        return self._family(seed).sample(seed)

    def stack(self, seeds: Sequence[int], device: torch.device | str | None = None) -> TaskStack:
        """Vectorized when every task has the same architecture, else the generic stack (CPU)."""
        if len({self.architecture(s) for s in seeds}) == 1:
            return self._family(seeds[0]).stack(seeds, device)
        return super().stack(seeds, device)


@register_family("mnist-mlp-mix")
def mnist_mlp_mix(widths: Sequence[int] = (20, 40), depths: Sequence[int] = (1, 2),
                  activations: Sequence[str] = ("sigmoid", "relu"), batch_size: int = 128,
                  root: str | os.PathLike | None = None, part: str = "meta-train",
                  examples_per_task: int | None = None) -> MixedMLPFamily:
    """MNIST MLPs of mixed widths, depths and activations (meta-training split by default)."""
    return MixedMLPFamily(mnist_mlp(root=root, part=part).data, widths, depths, activations, batch_size,
                          name="mnist-mlp-mix", examples_per_task=examples_per_task)
