"""Torch's intra-op thread count, pinned for a block of work: results must not depend on the caller's state.

Float reductions (matmul, conv) split differently over threads, so a model stage or a trainer that runs in the
driver gives bits that depend on whatever `torch.set_num_threads` the calling process did before. A node's
`resources.torch_threads` (0: leave torch as it is) pins the count while its work runs, and restores it after;
Ray workers pin it the same way (Ray itself sets OMP_NUM_THREADS from `num_cpus` when a worker starts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def pinned_torch_threads(count: int) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(count)` (count <= 0: unchanged), then restore the old count.

    torch is imported only when `count` > 0 (CPU stages without torch stay torch-free).
    """
    if count <= 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
