"""``num_threads(n)``: run torch on ``n`` intra-op threads inside a block, restoring the setting afterwards.

The package's runners use one thread: their tensors are small, and on a 2-core CPU shared with other jobs
spinning OpenMP workers made LAPACK calls 10–2000× slower (a 10 × 4 QR: 11 ms with 2 threads, 6 µs with one).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def num_threads(n: int = 1) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
