"""Peak memory of a computation, measured: CUDA's allocator statistics on a GPU, the
profiler's allocation and free events on the CPU (torch has no CPU peak counter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["peak_memory"]

T = TypeVar("T")


def peak_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn()``; return its result and the peak bytes it had allocated at once on ``device``.

    Counts tensors allocated inside ``fn`` (beyond what was allocated before it started).
    On the CPU this replays the profiler's memory events in time order (each allocation
    is charged when its op starts), so it costs a profiled run.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures the CPU or a CUDA device, not {device.type!r}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:  # allocations as ops' own (self) memory, frees as "[memory]" events (negative)
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return result, int(peak)
