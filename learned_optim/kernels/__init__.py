"""Fused GPU kernels for the learned optimizers' in-place steps (Triton).

Triton is an optional extra (``pip install learned_optim[gpu]``). The kernels run on CUDA
tensors, and on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` set before Python
imports triton), which is how they are tested without a GPU. Without triton, or on the CPU
outside the interpreter, the rules' eager in-place step runs, unchanged.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["triton_available", "interpreting", "fused_unavailable", "use_fused"]


def triton_available() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_unavailable(device: torch.device) -> str | None:
    """Why the fused step cannot run on ``device`` (None: it can)."""
    if not triton_available():
        return "triton is not installed (pip install 'learned_optim[gpu]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    if device.type == "cpu":
        return ("on the CPU the Triton kernels run only in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before Python imports triton")
    return f"the Triton kernels run on CUDA (or on the CPU in Triton's interpreter), not on {device.type}"


def use_fused(fused: bool | None, device: torch.device) -> bool:
    """Resolve an optimizer's ``fused`` flag on ``device``: None picks the Triton step where it
    can run (CUDA with triton installed, or the interpreter), True requires it (a clear error
    if it cannot run), False is the eager step."""
    if fused is False:
        return False
    reason = fused_unavailable(device)
    if fused is None:
        return reason is None
    if reason is not None:
        raise RuntimeError(f"fused=True: {reason}")
    return True
