"""Small host values onto the device without a host synchronisation (pure torch).

The runtime turns a few host numbers into device tensors in the round path (a round's
measured cost) and in the slot hooks (the slots of requests that joined or left). Built
the obvious way (``torch.tensor(values, device="cuda")``) each is a copy from pageable
host memory, which the CUDA driver performs synchronously: the CPU waits for the stream,
and under SGLang's overlap scheduler that voids the overlap.

``HostToDevice`` writes the values into *pinned* host memory and enqueues a
``non_blocking`` copy on the current stream. PyTorch's caching host allocator is the ring
of buffers: a pinned block used by an asynchronous copy records an event on that stream
and is not handed out again until the event has completed, so a later value never
overwrites one still in flight, and the CPU never waits. On a CPU device the values are
used where they are; on any other device (``meta`` in the audit test) the copy is the
same ``non_blocking`` one, from unpinned memory.
"""

from __future__ import annotations

from typing import Sequence

import torch


class HostToDevice:
    """``stage(values, dtype)`` -> a device tensor of ``values`` (module docstring)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"

    def __call__(self, values: Sequence, dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype, pin_memory=self.pinned)
        if self.device.type == "cpu":
            return host
        return host.to(self.device, non_blocking=True)
