"""The one CUDA-graph helper: warm a step up on a side stream, capture it, hand back its replay.
The train step (training/step.py) and the sampler (sampling.py) both capture through it."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a fresh stream that waits for the current one and is waited for after:
    warm-up before a capture must not run on the default stream (PyTorch's CUDA-graph notes)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


def capture(step: Callable[[], object], warmup: int, device: torch.device,
            reset: Callable[[], object] | None = None) -> tuple[Callable[[], None], object]:
    """Run `step` `warmup` times on a side stream (allocator pools, cuDNN plans, compile), then
    record one call of it in a CUDA graph. Returns (replay, what the recorded call returned: the
    graph's static outputs). `reset()`, when given, runs before the capture and after it, so the
    warm-up calls leave no trace in the state the replays start from. The capture itself does
    not run the step; each replay does.

    `step` must not read the device from the host (no .item(), no indexing by a 0-dim tensor):
    a capture forbids it."""
    with side_stream(device):
        for _ in range(warmup):
            step()
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    # thread_local: a DataLoader's pin-memory thread calls CUDA (host allocations, events) while
    # we capture (the train step; sample grids drawn mid-training); the default "global" mode
    # would invalidate the capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = step()
    if reset is not None:
        reset()
    return graph.replay, out
