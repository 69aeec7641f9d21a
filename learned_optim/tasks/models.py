"""Built-in families of the models people train, as :class:`ModuleFamily`s of torch's own layers:
MNIST convnets (with and without batch norm), MLPs with ReLU/GELU/tanh (with and without
LayerNorm), and byte-level causal transformer and GRU language models on standard-library text.

Each family draws architecture details per seed (a width and a depth from the given options)
and an initialization scale (log-uniform on ``init_scale``, multiplying every weight matrix,
embedding and kernel of torch's default initialization), so meta-training on a family does not
fit one net. Sizes keep one training step on a 2-core CPU at a few to a few tens of
milliseconds. ``part`` picks the data: ``"meta-train"`` for meta-training, ``"held-out"`` for
benchmarks (MNIST: the fixed 8,000/2,000 split of the t10k set; text: the standard library's
files split by path).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register_family
from .data import ClassificationData
from .mlp import mnist_mlp
from .module import ModuleFamily
from .text import TEXT_PARTS, stdlib_text, text_windows

__all__ = ["ConvNet", "MLP", "TransformerLM", "GRULM", "mnist_conv", "mnist_mlp_nn", "text_transformer",
           "text_gru", "classification_loss", "language_model_loss", "ArchitectureDraw"]

VOCAB = 256  # bytes


class ConvNet(nn.Module):
    """Two 3×3 stride-2 convolutions (each optionally batch-normed) with ReLU, global average
    pooling and a linear classifier: 28×28 → 14×14 → 7×7 → classes."""

    def __init__(self, channels: Sequence[int] = (8, 16), batch_norm: bool = False, num_classes: int = 10,
                 in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *channels[:-1]], channels):
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


MLP_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Linear layers with an activation (and optionally LayerNorm before it) between them."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu", layer_norm: bool = False) -> None:
        super().__init__()
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(MLP_ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                if layer_norm:
                    layers.append(nn.LayerNorm(n_out))
                layers.append(MLP_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerLM(nn.Module):
    """A byte-level causal transformer: token and learned position embeddings, pre-LN
    ``nn.TransformerEncoderLayer``s (GELU, no dropout) under a causal mask, a final LayerNorm
    and a linear read-out to the 256 byte logits."""

    mask: Tensor  # (context, context) causal mask, a non-persistent buffer

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[-1]
        h = self.embed(tokens) + self.position.weight[:t]
        mask = self.mask[:t, :t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class GRULM(nn.Module):
    """A byte-level recurrent language model: an embedding, ``nn.GRU`` and a linear read-out."""

    def __init__(self, width: int = 64, depth: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.GRU(width, width, num_layers=depth, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        h, _ = self.rnn(self.embed(tokens))
        return self.head(h)


def classification_loss(model, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of ``model(x)`` against labels ``y``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def language_model_loss(model, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-byte cross-entropy in nats (ln 256 ≈ 5.55 for uniform predictions)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class ArchitectureDraw:
    """Per-seed draws of a width, a depth and an initialization scale (log-uniform in a range)."""

    def __init__(self, widths: Sequence[int], depths: Sequence[int], init_scale: tuple[float, float]) -> None:
        for what, options in (("widths", widths), ("depths", depths)):
            if not options or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in options):
                raise ValueError(f"{what} must be a non-empty list of positive integers, got {options!r}")
        low, high = init_scale
        if not 0 < low <= high:
            raise ValueError(f"init_scale must be a range (low, high) with 0 < low <= high, got {init_scale!r}")
        self.widths, self.depths, self.init_scale = tuple(widths), tuple(depths), (float(low), float(high))

    def __call__(self, seed: int) -> tuple[int, int, float]:
        g = torch.Generator().manual_seed(seed * 7 + 5)
        width = self.widths[int(torch.randint(len(self.widths), (1,), generator=g))]
        depth = self.depths[int(torch.randint(len(self.depths), (1,), generator=g))]
        low, high = self.init_scale
        scale = math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(torch.rand(1, generator=g)))
        return width, depth, scale


def scale_init(module: nn.Module, scale: float) -> nn.Module:
    """Multiply every weight matrix, embedding and kernel (params of 2 or more dimensions) by ``scale``."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return module


def _images(data: ClassificationData) -> tuple[Tensor, Tensor]:
    side = int(math.isqrt(data.inputs.shape[1]))
    return data.inputs.view(-1, 1, side, side), data.labels


def _minibatches(inputs: Tensor, labels: Tensor):
    def batches(gen: torch.Generator, b: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(inputs.shape[0], (b,), generator=gen)
        return inputs[idx], labels[idx]

    return batches


def _mnist_part(root: str | os.PathLike | None, part: str) -> ClassificationData:
    if part not in ("meta-train", "held-out"):
        raise ValueError(f"part must be 'meta-train' or 'held-out', got {part!r}")
    return mnist_mlp(root=root, part=part).data


@register_family("mnist-conv")
def mnist_conv(batch_norm: bool = False, widths: Sequence[int] = (4, 8), depths: Sequence[int] = (2,),
               init_scale: tuple[float, float] = (0.5, 2.0), batch_size: int = 64,
               root: str | os.PathLike | None = None, part: str = "meta-train") -> ModuleFamily:
    """MNIST convnets: ``depth`` stride-2 convolutions of ``width``, 2·``width``, … channels
    (two by default), batch-normed if ``batch_norm``; per seed a width, depth and init scale."""
    inputs, labels = _images(_mnist_part(root, part))
    draw = ArchitectureDraw(widths, depths, init_scale)

    def model(seed: int) -> nn.Module:
        width, depth, scale = draw(seed)
        return scale_init(ConvNet([width * 2**i for i in range(depth)], batch_norm), scale)

    name = "mnist-conv-bn" if batch_norm else "mnist-conv"
    return ModuleFamily(model, classification_loss, _minibatches(inputs, labels), batch_size, name=name)


@register_family("mnist-mlp-nn")
def mnist_mlp_nn(activation: str = "relu", layer_norm: bool = False, widths: Sequence[int] = (32, 64),
                 depths: Sequence[int] = (1, 2), init_scale: tuple[float, float] = (0.5, 2.0),
                 batch_size: int = 128, image_side: int = 28, root: str | os.PathLike | None = None,
                 part: str = "meta-train") -> ModuleFamily:
    """MNIST MLPs of ``nn.Linear`` layers with ReLU, GELU or tanh (LayerNorm before it if
    ``layer_norm``); per seed ``depth`` hidden layers of one width, and an init scale.
    ``image_side`` 14 (or 7) average-pools the images first: 4× (16×) fewer first-layer weights."""
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(MLP_ACTIVATIONS)}, got {activation!r}")
    if image_side not in (7, 14, 28):
        raise ValueError(f"image_side must be 28, 14 or 7, got {image_side!r}")
    data = _mnist_part(root, part)
    images, labels = _images(data)
    inputs = F.avg_pool2d(images, 28 // image_side).flatten(1) if image_side != 28 else data.inputs
    draw = ArchitectureDraw(widths, depths, init_scale)

    def model(seed: int) -> nn.Module:
        width, depth, scale = draw(seed)
        sizes = [inputs.shape[1], *[width] * depth, data.num_classes]
        return scale_init(MLP(sizes, activation, layer_norm), scale)

    name = f"mnist-mlp-{activation}" + ("-ln" if layer_norm else "")
    return ModuleFamily(model, classification_loss, _minibatches(inputs, labels), batch_size, name=name)


def _text(part: str, max_bytes: int) -> Tensor:
    if part not in TEXT_PARTS:
        raise ValueError(f"part must be one of {TEXT_PARTS}, got {part!r}")
    return stdlib_text(part, max_bytes)


def _text_batches(text: Tensor, context: int):
    def batches(gen: torch.Generator, b: int) -> tuple[Tensor, Tensor]:
        return text_windows(text, gen, b, context)

    return batches


@register_family("text-transformer")
def text_transformer(widths: Sequence[int] = (24, 32), depths: Sequence[int] = (1, 2), head_width: int = 8,
                     context: int = 32, init_scale: tuple[float, float] = (0.5, 2.0), batch_size: int = 16,
                     part: str = "meta-train", max_bytes: int = 1 << 21) -> ModuleFamily:
    """Byte-level causal transformer LMs on standard-library source; per seed a width (heads of
    ``head_width``), a depth and an init scale."""
    text = _text(part, max_bytes)
    draw = ArchitectureDraw(widths, depths, init_scale)
    if any(w % head_width for w in widths):
        raise ValueError(f"every width must be a multiple of head_width ({head_width}), got {tuple(widths)}")

    def model(seed: int) -> nn.Module:
        width, depth, scale = draw(seed)
        return scale_init(TransformerLM(width, depth, width // head_width, context), scale)

    return ModuleFamily(model, language_model_loss, _text_batches(text, context), batch_size,
                        name="text-transformer")


@register_family("text-gru")
def text_gru(widths: Sequence[int] = (32, 48), depths: Sequence[int] = (1,), context: int = 32,
             init_scale: tuple[float, float] = (0.5, 2.0), batch_size: int = 16, part: str = "meta-train",
             max_bytes: int = 1 << 21) -> ModuleFamily:
    """Byte-level GRU LMs on standard-library source; per seed a width, a depth and an init
    scale. (torch has no vmap rule for ``nn.GRU``: stacks loop over tasks.)"""
    text = _text(part, max_bytes)
    draw = ArchitectureDraw(widths, depths, init_scale)

    def model(seed: int) -> nn.Module:
        width, depth, scale = draw(seed)
        return scale_init(GRULM(width, depth), scale)

    return ModuleFamily(model, language_model_loss, _text_batches(text, context), batch_size, name="text-gru",
                        vectorize=False)
