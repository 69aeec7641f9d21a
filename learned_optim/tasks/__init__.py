"""Task families shared by the benchmark harness and the meta-trainer."""

from .base import Task, TaskFamily, TaskStack, families, get_family, load_family, register_family
from .data import ClassificationData, download_mnist, load_mnist, synthetic_classification
from .mixture import SUITE_MIX_COMPONENTS, MixtureFamily
from .mlp import MixedMLPFamily, MLPFamily, mlp_forward
from .models import GRULM, MLP, ConvNet, TransformerLM, classification_loss, language_model_loss
from .module import BoundModule, ModuleFamily
from .reparametrize import random_scales, reparametrized
from .synthetic import (
    IllConditionedQuadraticFamily,
    NoisyLeastSquaresFamily,
    NoisyQuadraticFamily,
    QuadraticFamily,
    RosenbrockFamily,
    SinusoidFamily,
)
from .text import stdlib_text

__all__ = [
    "BoundModule",
    "ClassificationData",
    "ConvNet",
    "GRULM",
    "MLP",
    "ModuleFamily",
    "TransformerLM",
    "classification_loss",
    "language_model_loss",
    "load_family",
    "stdlib_text",
    "IllConditionedQuadraticFamily",
    "MLPFamily",
    "MixtureFamily",
    "SUITE_MIX_COMPONENTS",
    "random_scales",
    "reparametrized",
    "MixedMLPFamily",
    "NoisyLeastSquaresFamily",
    "NoisyQuadraticFamily",
    "QuadraticFamily",
    "RosenbrockFamily",
    "SinusoidFamily",
    "Task",
    "TaskFamily",
    "TaskStack",
    "download_mnist",
    "families",
    "get_family",
    "load_mnist",
    "mlp_forward",
    "register_family",
    "synthetic_classification",
]
