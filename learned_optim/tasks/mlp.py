"""The MLP classification family (the paper's MNIST optimizee, configurable)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Task, TaskFamily, register_family
from .data import ClassificationData, load_mnist, synthetic_classification

__all__ = ["MLPFamily", "mlp_forward", "ACTIVATIONS"]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}


def mlp_forward(params: Sequence[Tensor], x: Tensor, activation: str = "sigmoid") -> Tensor:
    """Logits of an MLP whose params are [W1, b1, W2, b2, ...] with W of shape (out, in)."""
    act = ACTIVATIONS[activation]
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = F.linear(h, params[2 * i], params[2 * i + 1])
        if i < n_layers - 1:
            h = act(h)
    return h


class MLPFamily(TaskFamily):
    """Cross-entropy MLP on a classification set; tasks differ in θ₀ and minibatch stream.

    Weights are IID Gaussian with std ``init_scale``/√fan_in, biases zero; minibatches are
    drawn uniformly with replacement. The paper's setting is ``hidden=(20,)``,
    ``activation="sigmoid"``, ``batch_size=128`` on MNIST.
    """

    def __init__(
        self,
        data: ClassificationData,
        hidden: Sequence[int] = (20,),
        activation: str = "sigmoid",
        batch_size: int = 128,
        init_scale: float = 1.0,
        name: str = "mlp",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.data, self.hidden, self.activation = data, tuple(hidden), activation
        self.batch_size, self.init_scale, self.name = batch_size, init_scale, name

    def sample(self, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        sizes = [self.data.inputs.shape[1], *self.hidden, self.data.num_classes]
        params: list[Tensor] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            params.append(torch.randn(fan_out, fan_in, generator=g) * (self.init_scale / fan_in**0.5))
            params.append(torch.zeros(fan_out))
        inputs, labels, activation = self.data.inputs, self.data.labels, self.activation

        def batch(gen: torch.Generator, b: int) -> tuple[Tensor, Tensor]:
            idx = torch.randint(inputs.shape[0], (b,), generator=gen)
            return inputs[idx], labels[idx]

        def loss(ps, xy):
            x, y = xy if xy is not None else (inputs, labels)
            return F.cross_entropy(mlp_forward(ps, x, activation), y)

        return Task(params, loss, batch, self.batch_size, seed)


@register_family("mlp")
def synthetic_mlp(hidden: Sequence[int] = (20,), activation: str = "sigmoid", batch_size: int = 128,
                  n: int = 4096, dim: int = 32) -> MLPFamily:
    """The MLP task on the embedded synthetic classification set (no files needed)."""
    return MLPFamily(synthetic_classification(n=n, dim=dim), hidden, activation, batch_size, name="mlp")


@register_family("mnist-mlp")
def mnist_mlp(hidden: Sequence[int] = (20,), activation: str = "sigmoid", batch_size: int = 128,
              root: str | os.PathLike | None = None) -> MLPFamily:
    """The paper's MNIST MLP on the t10k set under ``root`` (or $LEARNED_OPTIM_DATA)."""
    return MLPFamily(load_mnist(root), hidden, activation, batch_size, name="mnist-mlp")
